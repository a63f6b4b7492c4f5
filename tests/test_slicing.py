"""The feature slicer (worker/savers/slicing.py) is exact, composes with the strategies, leaves
the model as it found it, and lowers the per-step peak memory.

Per family and world size (1, 2: uneven clips), the ranks load the model once and run, for
every strategy, the same job with slice_chunks 0, 2, 3, 7 and 0 again, as a worker serves many
jobs with one model: every sliced run's final latents equal the unsliced run's within 1e-6
(fp32) times their scale (max(1, max |latents|): tiny-animatediff's reach 32, where one ulp is
4e-6, and a 1x1 convolution's rounding depends on its batch on CPU), the slicer really ran
(its forwards are in place during the job, and only then), and the second unsliced run
equals the first bit for bit. Wan's chunked decode is one vae.decode
call bit for bit. One real run with and one without slicing, each in a fresh process, at a
size where activations dominate: the sliced run's peak is lower.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from clipmesh import presets
from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import planned
from ranks import run_ranks, single_thread_model, solo_mesh

CHUNKS = (0, 2, 3, 7, 0)  # 0 twice: the model is restored after the sliced jobs
TOL = 1e-6
STEPS, GUIDANCE, SEED = 2, 5.0, 11
# family preset -> (frames, side, strategies): 17 frames are 5 latent frames for Wan (3 + 2 over
# two ranks, 16 tokens a frame), 9 for UNet3D (5 + 4); tiny-wan has 2 heads, so ulysses runs on 2
FAMILIES = {
    "tiny-wan": (17, 64, ("exact", "clip_parallel", "ulysses", "block_pipeline")),
    "tiny-unet3d": (9, 32, ("exact", "clip_parallel")),
    "tiny-animatediff": (9, 32, ("exact",)),  # clip_parallel refuses AnimateDiff (its frame positions)
}
OPTIONS = {"clip_parallel": dict(clip_parallel=pb.ClipParallelOptions(local_halo=1, global_frames=2)),
           "block_pipeline": dict(block_pipeline=pb.BlockPipelineOptions(block_frames=2, context_frames=1))}


def _plan(name: str, strategy: str, world_size: int, chunks: int, frames=None, side=None, steps=STEPS) -> pb.RenderPlan:
    """The coordinator's own plan (resolved options, clips or layers), slice_chunks as asked."""
    f, s, _ = FAMILIES[name]
    req = pb.SubmitJobRequest(prompt="a fox in the snow", negative_prompt="blurry", num_frames=frames or f,
                              height=side or s, width=side or s, num_inference_steps=steps, guidance_scale=GUIDANCE,
                              seed=SEED, model=name, strategy=strategy, num_workers=world_size, fps=8,
                              savers=pb.SaverOptions(slice_chunks=chunks), **OPTIONS.get(strategy, {}))
    plan = planned(req, world_size, f"slice-{strategy}-{chunks}")
    assert plan.strategy == strategy and plan.savers.slice_chunks == chunks
    return plan


def _patched(model) -> list[str]:
    """What of the model carries a job's patches: instance forwards, non-stock processors, hooks."""
    found = [f"{name}.forward" for name, m in model.denoiser.named_modules() if "forward" in m.__dict__]
    found += [f"{name}: {type(m.processor).__name__}" for name, m in model.denoiser.named_modules()
              if type(getattr(m, "processor", None)).__module__.startswith("clipmesh")]
    return found + [f"{name} hook" for name, m in model.denoiser.named_modules() if m._forward_hooks]


def _family_main(mesh, name: str):
    """One rank: every strategy of the family, every chunk count, one loaded model. Returns
    {(strategy, i): (this rank's final latents, sliced groups in place at each step)} and what
    was left patched after all the jobs."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render

    model = load_adapter(presets.model_folder(name), "cpu", torch.float32)
    groups, out = model.slice_groups(), {}
    stock = _patched(model)
    for strategy in FAMILIES[name][2]:
        for i, chunks in enumerate(CHUNKS):
            pieces, in_place = [], []
            render(model, _plan(name, strategy, mesh.world_size, chunks), mesh.rank, mesh,
                   on_step=lambda r: in_place.append(sum("forward" in g.module.__dict__ for g in groups)),
                   on_latents=pieces.append, decode=False)
            latents = torch.cat([p.latents for p in sorted(pieces, key=lambda p: p.start)], 2) if pieces else None
            out[strategy, i] = (None if latents is None else latents.numpy(), in_place)
    return out, len(groups), stock, _patched(model)


@pytest.fixture(scope="module")
def family_runs():
    cache = {}

    def get(name, world_size):
        if (name, world_size) not in cache:
            cache[name, world_size] = run_ranks(_family_main, world_size, name, group=f"slice-{name}-{world_size}",
                                                timeout=400)
        return cache[name, world_size]
    return get


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name,strategy", [(n, s) for n, (_, _, strategies) in FAMILIES.items() for s in strategies])
def test_slicing_is_exact(name, strategy, world_size, family_runs):
    results = family_runs(name, world_size)
    for rank, (runs, n_groups, stock, left) in sorted(results.items()):
        assert n_groups > 0
        assert left == stock, f"rank {rank}: left patched after the jobs: {sorted(set(left) - set(stock))}"
        reference, unsliced_in_place = runs[strategy, 0]
        assert set(unsliced_in_place) == {0}
        again, _ = runs[strategy, len(CHUNKS) - 1]
        if reference is None:  # a block_pipeline stage that finishes no latents
            assert again is None
            continue
        assert np.array_equal(again, reference), "the unsliced run after sliced jobs differs"
        for i, chunks in enumerate(CHUNKS[1:-1], 1):
            latents, in_place = runs[strategy, i]
            diff, scale = float(np.abs(latents - reference).max()), max(1.0, float(np.abs(reference).max()))
            print(f"{name} {strategy} world_size={world_size} rank={rank} chunks={chunks}: max|diff|={diff:.3e} "
                  f"(max|latents| {scale:.3g}, relative {diff / scale:.2e})")
            assert set(in_place) == {n_groups}, f"chunks={chunks}: the slicer was not in place at every step"
            assert diff <= TOL * scale, f"{name} {strategy} rank {rank} chunks={chunks}: {diff} > {TOL} * {scale}"


def test_spans():
    from clipmesh.worker.savers.slicing import MIN_CHUNK_ROWS, spans

    for rows in (0, 1, 3, 4, 9, 20, 80):
        for chunks in (1, 2, 3, 7):
            cuts = spans(rows, chunks)
            assert cuts[0][0] == 0 and cuts[-1][1] == rows and all(b == c for (_, b), (c, _) in zip(cuts, cuts[1:]))
            assert len(cuts) == max(1, min(chunks, rows // MIN_CHUNK_ROWS))
            assert len(cuts) == 1 or min(b - a for a, b in cuts) >= MIN_CHUNK_ROWS
    assert spans(20, 3) == [(0, 7), (7, 14), (14, 20)]


@pytest.fixture(scope="module")
def wan():
    yield from single_thread_model(presets.model_folder("tiny-wan"))


@pytest.mark.parametrize("frames,side,chunk", [(5, 8, 2), (9, 16, 4)])
def test_wan_decode_in_chunks_is_one_vae_call(wan, frames, side, chunk):
    """The chunked decode (the causal cache carried across chunks) is bit for bit one vae.decode,
    before uint8 too; here in chunks of 2, 2, 1 and 4, 4, 1 latent frames."""
    from clipmesh.worker.adapters import wan as wan_module

    latents = torch.randn(1, 16, frames, side, side, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = wan.pipe.vae.decode(wan.unnormalize(latents), return_dict=False)[0]
    as_float = lambda video: video[0].permute(1, 2, 3, 0).numpy()  # noqa: E731 [N, H, W, 3], unrounded
    with mock.patch.object(wan_module, "DECODE_CHUNK", chunk), mock.patch.object(wan, "to_uint8", as_float):
        chunked = wan.decode(latents)
    assert chunked.shape == (4 * frames - 3, 8 * side, 8 * side, 3) and np.array_equal(chunked, as_float(whole))
    assert np.array_equal(wan.decode(latents), wan.to_uint8(whole))


@pytest.mark.parametrize("per_token", [False, True])
def test_wan_block_in_chunks_is_the_stock_block(wan, per_token):
    """TokenChunks against WanTransformerBlock.forward itself, with the [B, 6, dim] timestep and
    with Wan 2.2's per-token [B, tokens, 6, dim] one (which the jobs above do not reach)."""
    from clipmesh.worker.savers.slicing import TokenChunks

    gen = torch.Generator().manual_seed(9)
    block, transformer = wan.denoiser.blocks[1], wan.denoiser
    rotary = transformer.rope(torch.zeros(1, 16, 5, 8, 8))  # 5 frames of 4 x 4 patches: 80 tokens
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    hidden, text = torch.randn(1, 80, dim, generator=gen), torch.randn(1, 7, dim, generator=gen)
    temb = torch.randn((1, 80, 6, dim) if per_token else (1, 6, dim), generator=gen)
    with torch.no_grad():
        stock = type(block).forward(block, hidden, text, temb, rotary)
        for chunks in (2, 3, 7):
            # within float rounding, not bit for bit: on some CPUs a matmul over fewer rows takes
            # another kernel (this failed bitwise on a 2-core EPYC with the code before and after)
            diff = (TokenChunks(block, chunks)(hidden, text, temb, rotary) - stock).abs().max().item()
            assert diff <= 1e-6, (chunks, diff)


def test_with_taylorseer_the_wan_blocks_run_whole(wan):
    """TaylorSeer forecasts attn2 and the FFN, taking each of their calls for a step: with it the
    blocks run in one chunk (the same latents as without slicing, where chunks would break it)."""
    from clipmesh.worker.render import denoise

    def latents(chunks, reports):
        plan = _plan("tiny-wan", "exact", 1, chunks, steps=4)
        plan.savers.step_cache = "taylorseer:2"  # step 2 of 4 is forecast
        return denoise(wan, plan, 0, mesh, on_step=lambda r: reports.append(r.full_pass))

    with solo_mesh("slice-taylorseer") as mesh:
        plain, sliced = [], []
        assert torch.equal(latents(0, plain), latents(3, sliced))
    assert plain == sliced and not all(plain)  # some step was forecast


def test_a_frame_mixer_inside_a_per_frame_group_is_refused(wan):
    from clipmesh.worker.adapters.base import PER_FRAME, SliceGroup
    from clipmesh.worker.patches import Patches
    from clipmesh.worker.savers.slicing import install_slicing

    block = wan.denoiser.blocks[0]
    job = mock.Mock(model=mock.Mock(frame_mixers=wan.frame_mixers, family="wan",
                                    slice_groups=lambda: [SliceGroup(PER_FRAME, block)]))
    with Patches() as patches, pytest.raises(ValueError, match="frame-mixing"):
        install_slicing(job, patches, 2)
    assert "forward" not in block.__dict__


MEMORY = dict(name="tiny-unet3d", frames=8, side=256, steps=2)  # activations of ~100 MiB against a ~500 MiB process


def _peak_main(mesh, chunks):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model, reports = load_adapter(presets.model_folder(MEMORY["name"]), "cpu", torch.float32), []
    plan = _plan(MEMORY["name"], "exact", 1, chunks, MEMORY["frames"], MEMORY["side"], MEMORY["steps"])
    denoise(model, plan, 0, mesh, on_step=reports.append)
    return [r.peak_memory_bytes for r in reports]


def test_slicing_lowers_the_peak():
    """Each run in a fresh process (so earlier allocations do not hide its peak); the max over steps."""
    peaks = {chunks: max(run_ranks(_peak_main, 1, chunks, group=f"slice-peak-{chunks}", fresh=True)[0])
             for chunks in (0, 4)}
    print(f"per-step peak memory, {MEMORY}: unsliced {peaks[0] / 2**20:.0f} MiB, "
          f"slice_chunks=4 {peaks[4] / 2**20:.0f} MiB")
    if not peaks[0]:
        pytest.skip("no peak memory reading on this platform")
    assert peaks[4] < 0.95 * peaks[0]
