"""UNet3D family (zeroscope / ModelScope / VideoCrafter2): the tiny-unet3d preset, its adapter,
and `exact` clip parallelism, which must equal vanilla diffusers TextToVideoSDPipeline.

9 latent frames (= 9 video frames: no temporal compression). 2 ranks split 5+4 (every clip at
least the 4-frame conv halo: plain neighbour exchange); 3 ranks 2+1+6, so rank 0's right halo
and rank 2's left halo reach past the 1-frame middle clip into the rank beyond.

Tolerances: in float64 `exact` equals the pipeline to ~1e-13, which is the proof that the
algorithm is exact (a missing halo frame or unsynchronised GroupNorm statistics shows up at
1e-4 or more). In float32 the project's bound holds: N workers within 1e-5 of the pipeline
(and so of each other). A bound is only checkable by a model whose own rounding floor lies
below it: `test_rounding_floor` measures the pipeline against itself with 2 threads instead
of 1 (a different reduction order, nothing else) and requires that floor to be well under
the bound. (At PyTorch's default init the random UNet's floor was 4e-5 at CFG 9, see
presets._init_like_trained; now it is ~2e-6, 2 ulps of the latents' magnitude of ~13.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from clipmesh.plan import num_latent_frames, split_clips
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from conftest import planned
from ranks import run_ranks, single_thread_model, solo_mesh

FRAMES, SIDE, STEPS, GUIDANCE, SEED = 9, 64, 3, 9.0, 4321
LATENT = num_latent_frames(FRAMES, 1)
CLIPS = {1: [(0, 9)], 2: split_clips(LATENT, 2), 3: [(0, 2), (2, 3), (3, 9)]}
SPEEDS = {1: None, 2: None, 3: [2.0, 1.0, 6.0]}  # the planner splits by speed: 3 ranks uneven
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _plan(world_size: int, name: str = "unet3d") -> pb.RenderPlan:
    req = pb.SubmitJobRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", num_frames=FRAMES,
                              height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                              model="tiny-unet3d", strategy="exact", num_workers=world_size)
    plan = planned(req, world_size, f"{name}-{world_size}", speeds=SPEEDS[world_size])
    assert [(c.start, c.end) for c in plan.clips] == CLIPS[world_size]
    return plan


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # a private cache: the test also exercises building the preset from scratch
    from clipmesh.presets import model_folder
    with mock.patch.dict(os.environ, {"CLIPMESH_CACHE": str(tmp_path_factory.mktemp("cache"))}):
        return model_folder("tiny-unet3d")


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


@pytest.fixture(scope="module")
def model64(folder, model):
    from clipmesh.worker.adapters import load_adapter
    return load_adapter(folder, "cpu", torch.float64)


@torch.no_grad()
def _vanilla(model) -> torch.Tensor:
    req, dtype = _plan(1).request, model.denoiser.dtype
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    noise = initial_noise(SEED, 0, LATENT, 4, SIDE // 8, SIDE // 8, dtype)  # the pipeline scales by init_noise_sigma
    return model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                      num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      output_type="latent").frames


@pytest.fixture(scope="module")
def reference(model):
    return _vanilla(model)


@pytest.fixture(scope="module")
def reference64(model64):
    return _vanilla(model64)


def test_rounding_floor(model, reference, reference64):
    """The pipeline against itself: 2 threads instead of 1 (the floor any split must live
    with), and float32 against float64. Both well under the float32 bound, or the bound
    could not tell a rounding difference from a bug."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = _vanilla(model)
    finally:
        torch.set_num_threads(threads)
    floor = (two - reference).abs().max().item()
    vs64 = (reference.double() - reference64).abs().max().item()
    print(f"vanilla float32, 1 vs 2 threads: max|diff|={floor:.3e}; float32 vs float64: {vs64:.3e}; "
          f"max|latents|={reference.abs().max().item():.2f} (guidance {GUIDANCE}, {STEPS} DDIM steps)")
    assert floor <= TOL[torch.float32] / 2 and vs64 <= TOL[torch.float32] / 2


def _halo_check(mesh, lengths: list[int]) -> tuple[float, bool]:
    """frame_ops alone on a random float64 TemporalConvLayer (a random last conv: diffusers
    zero-initialises it): this rank's clip of the layer's output against the whole video's.
    Returns (max abs diff, whether the layer is still patched after remove)."""
    from diffusers.models.resnet import TemporalConvLayer

    from clipmesh.worker.strategies.frame_ops import TemporalOps
    from clipmesh.worker.patches import Patches

    torch.manual_seed(0)
    layer = TemporalConvLayer(8, 8, norm_num_groups=4).double().eval()
    torch.nn.init.normal_(layer.conv4[-1].weight)
    x = torch.randn(2 * sum(lengths), 8, 3, 3, dtype=torch.float64)  # [B*F, C, H, W], B = 2
    with torch.no_grad():
        want = layer(x, num_frames=sum(lengths))
    start = sum(lengths[:mesh.rank])
    mine = lambda t: t.unflatten(0, (2, -1))[:, start:start + lengths[mesh.rank]].flatten(0, 1)  # noqa: E731
    patches = Patches()
    TemporalOps(mesh, lengths, patches).halo_conv(layer)
    with torch.no_grad():
        got = layer(mine(x), num_frames=lengths[mesh.rank])
    patches.remove()
    return (got - mine(want)).abs().max().item(), any("forward" in m.__dict__ for m in layer.modules())


def _norm_check(mesh, lengths: list[int]) -> tuple[float, float]:
    """sync_group_norm on this rank's clip of a float32 [B, C, F, H, W] (non-contiguous, as
    UNet3D's norms get it) against torch's GroupNorm over the whole video: (max abs diff,
    fraction of bitwise-equal outputs). It repeats torch's arithmetic, so only torch's own
    float32 statistics (an ulp off here and there) make outputs differ."""
    from clipmesh.worker.strategies.frame_ops import sync_group_norm

    torch.manual_seed(1)
    norm = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        x = (torch.randn(2, sum(lengths), 16, 6, 6) * 3 + 1.5).permute(0, 2, 1, 3, 4)
        start, n = sum(lengths[:mesh.rank]), lengths[mesh.rank]
        want = norm(x)[:, :, start:start + n]
        got = sync_group_norm(x[:, :, start:start + n], norm, mesh)
    return (got - want).abs().max().item(), (got == want).double().mean().item()


def _rank_main(mesh, folder):
    """One worker process: denoise its clip in float32 and in float64, and decode its own clip."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.job import RenderedFrames
    from clipmesh.worker.render import denoise, render

    plan, out = _plan(mesh.world_size), {}
    for dtype in (torch.float64, torch.float32):
        model = load_adapter(folder, "cpu", dtype)
        out[dtype] = denoise(model, plan, mesh.rank, mesh).numpy()
    # the worker's path: every rank decodes and uploads its own clip
    pieces = []
    render(model, plan, mesh.rank, mesh, on_step=lambda report: None, should_stop=lambda: False,
           on_frames=pieces.append)
    # decoded in bounded chunks, in order: the clip's frames, piece after piece
    assert [p.first_frame for p in pieces] == [pieces[0].first_frame + sum(len(q.frames) for q in pieces[:i])
                                               for i in range(len(pieces))]
    frames = RenderedFrames(pieces[0].first_frame, np.concatenate([p.frames for p in pieces]))
    out["first_frame"] = frames.first_frame
    out["halo"] = _halo_check(mesh, [c.end - c.start for c in plan.clips])
    out["norm"] = _norm_check(mesh, [c.end - c.start for c in plan.clips])
    return "ok", out, frames


def _run_ranks(world_size, folder):
    return run_ranks(_rank_main, world_size, str(folder), group=f"unet3d-{world_size}")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exact_matches_vanilla(world_size, folder, model, reference, reference64):
    results = _run_ranks(world_size, folder)
    whole = model.decode(reference)
    for rank, (_, latents, frames) in sorted(results.items()):
        for dtype, ref in ((torch.float64, reference64), (torch.float32, reference)):
            diff = (torch.from_numpy(latents[dtype]) - ref).abs().max().item()
            print(f"world_size={world_size} rank={rank} clips={CLIPS[world_size]} {dtype} max|diff|={diff:.3e}")
            assert diff <= TOL[dtype], f"rank {rank}: {dtype} max abs diff {diff} > {TOL[dtype]}"
        halo_diff, still_patched = latents["halo"]
        print(f"  temporal conv alone: max|diff|={halo_diff:.3e}")
        assert halo_diff <= 1e-12 and not still_patched
        norm_diff, norm_equal = latents["norm"]
        print(f"  synchronised GroupNorm alone (float32): max|diff|={norm_diff:.3e}, {norm_equal:.0%} bitwise equal")
        assert norm_diff <= 2e-6 and norm_equal >= 0.5  # values up to ~10: an ulp or two
        start, end = CLIPS[world_size][rank]
        # each rank decodes its own clip (frame-wise VAE): the frames of the whole video's decode
        assert latents["first_frame"] == start and frames.frames.shape == (end - start, SIDE, SIDE, 3)
        assert abs(frames.frames.astype(int) - whole[start:end].astype(int)).max() <= 1


def test_install_remove_restores_vanilla(model, reference):
    """In-process, one rank: the strategy is installed and removed twice (once by a cancel)."""
    from clipmesh.worker.render import Cancelled, denoise

    unet = model.denoiser
    attns, stock = model.temporal_attentions(), [a.processor for a in model.temporal_attentions()]
    assert len(attns) == 10 and len(model.temporal_convs()) == 8 and len(model.frame_norms()) == 5 + 8 * 4
    with solo_mesh("unet3d-restore") as mesh:
        latents = denoise(model, _plan(1), 0, mesh)
        with pytest.raises(Cancelled):  # removal must also happen when the loop is interrupted
            denoise(model, _plan(1), 0, mesh, should_stop=lambda: True)
    assert (latents - reference).abs().max().item() <= TOL[torch.float32]
    assert [a.processor for a in attns] == stock
    assert not [name for name, m in unet.named_modules() if "forward" in m.__dict__]
    assert torch.equal(_vanilla(model), reference)


def test_decode_per_clip_equals_whole(model, reference):
    assert model.decodes_per_frame
    whole = model.decode(reference)
    assert whole.shape == (FRAMES, SIDE, SIDE, 3) and whole.dtype.name == "uint8"
    parts = [model.decode(reference[:, :, s:e]) for s, e in CLIPS[3]]
    for (s, e), part in zip(CLIPS[3], parts):
        assert abs(part.astype(int) - whole[s:e].astype(int)).max() <= 1
    # and the float decode is the pipeline's own, frame for frame
    video = model.pipe.decode_latents(reference)
    ours = torch.cat([model.pipe.decode_latents(reference[:, :, s:e]) for s, e in CLIPS[3]], dim=2)
    assert (video - ours).abs().max().item() <= 1e-5


def test_adapter_pieces(model):
    info = model.model_info("tiny-unet3d")
    assert (info.family, info.spatial_multiple, info.temporal_stride, info.native_latent_frames) == ("unet3d", 8, 1, 16)
    assert model.latent_shape(64, 96) == (4, 8, 12)
    scheduler = model.new_scheduler()
    assert type(scheduler).__name__ == "DDIMScheduler" and not scheduler.config.thresholding
    from diffusers import DPMSolverMultistepScheduler
    model.pipe.scheduler, stock = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), model.pipe.scheduler
    try:
        with pytest.raises(NotImplementedError, match="split"):
            model.new_scheduler()
    finally:
        model.pipe.scheduler = stock


def test_videocrafter2_fps_embedding(folder, tmp_path):
    """A VideoCrafter2 folder in diffusers layout: extra fps_embedding.* unet weights, a custom
    unet class name and pipeline name. The adapter adds fps_embedding(24) to the time embedding."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from safetensors.torch import load_file, save_file

    from clipmesh.worker.adapters import load_adapter

    vc2 = tmp_path / "vc2"
    shutil.copytree(folder, vc2)
    weights_file = vc2 / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights_file)
    torch.manual_seed(7)
    reference = TimestepEmbedding(32, 128, act_fn="silu")
    state.update({f"fps_embedding.{k}": v.contiguous() for k, v in reference.state_dict().items()})
    save_file(state, weights_file)
    for path, name in ((vc2 / "unet" / "config.json", "UNetVideoCrafter"), (vc2 / "model_index.json", "VideoCrafterPipeline")):
        cfg = json.loads(path.read_text())
        cfg["_class_name"] = name
        if name == "UNetVideoCrafter":
            cfg["fps_cond"] = True
        path.write_text(json.dumps(cfg))

    plain = load_adapter(folder, "cpu")
    model = load_adapter(vc2, "cpu")
    assert plain.fps_embedding is None and model.fps_embedding is not None and model.fps == 24
    t_emb = torch.randn(2, 32)
    with torch.no_grad():
        fps_emb = reference(Timesteps(32, True, 0)(torch.tensor([24.0], dtype=torch.float64)).float())
        want = plain.denoiser.time_embedding(t_emb) + fps_emb
        got = model.denoiser.time_embedding(t_emb)
        assert torch.allclose(got, want, atol=1e-6)
        x = torch.randn(1, 4, 2, 8, 8)
        cond, uncond = plain.encode_prompt("a cat", "", 9.0)
        t = torch.tensor(500)
        scheduler = plain.new_scheduler()
        assert not torch.allclose(model.predict(x, t, scheduler, cond, uncond, 9.0),
                                  plain.predict(x, t, scheduler, cond, uncond, 9.0))
    assert model.model_info("my-vc2").native_latent_frames == 16


def test_preset_limits_without_torch(folder):
    code = ("import sys, clipmesh.presets as p; "
            "print(p.model_limits('tiny-unet3d'), p.model_limits(sys.argv[1]), p.model_limits('tiny-wan')); "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True).stdout
    assert out.count("'family': 'unet3d'") == 2 and out.count("'temporal_stride': 1") == 2
    assert "'native_latent_frames': 21" in out and "'spatial_multiple': 8" in out
    assert out.count("'strategies': ['exact', 'clip_parallel']") >= 2  # the preset and its folder (tiny-wan: its own)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "TextToVideoSDPipeline"


def test_limits_of_real_folder_configs():
    """zeroscope_v2_576w / ModelScope configs (the keys that matter) and a Wan 2.1 folder's."""
    from clipmesh.presets import limits_from_configs

    unet = {"_class_name": "UNet3DConditionModel", "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"], "cross_attention_dim": 1024}
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}
    zs = limits_from_configs(unet, vae, "/models/zeroscope_v2_576w")
    ms = limits_from_configs(unet, vae, "/models/text-to-video-ms-1.7b")
    assert (zs["family"], zs["spatial_multiple"], zs["temporal_stride"], zs["native_latent_frames"]) == ("unet3d", 8, 1, 24)
    assert ms["native_latent_frames"] == 16
    assert zs["strategies"] == ms["strategies"] == ["exact", "clip_parallel"]
    wan = limits_from_configs({"patch_size": [1, 2, 2], "rope_max_seq_len": 1024}, {"z_dim": 16})
    assert (wan["family"], wan["spatial_multiple"], wan["temporal_stride"], wan["native_latent_frames"]) == ("wan", 16, 4, 21)
