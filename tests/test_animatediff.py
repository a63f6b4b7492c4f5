"""AnimateDiff family (SD 1.5-style UNet + MotionAdapter): the tiny-animatediff preset, its
adapter, and `exact` clip parallelism, which must equal vanilla diffusers AnimateDiffPipeline.

8 latent frames (= 8 video frames: no temporal compression). 2 ranks split 4+4, 3 ranks
3+3+2: every clip but the first starts past frame 0, so its motion modules' sinusoidal
positions must be the global ones (a clip that restarts them at 0 is off by far more than
the bound: test_local_positions_are_wrong).

Tolerances as in test_unet3d.py: float64 within 1e-10 (the algorithm is exact: ~1e-14), float32
within the project's 1e-5. The float32 margin is thinner than UNet3D's: AnimateDiff's linear
betas leave sqrt(alpha_bar) = 0.04 at t = 999, and a random UNet's noise prediction does not
cancel the noise as a trained one does, so DDIM scales the latents up to ~43, where one float32
ulp is 3.8e-6. test_rounding_floor measures it: float32 against float64 is ~6e-6 (1.5 ulps),
`exact` on 2 or 3 ranks ~6e-6, under the bound, while clip-local positions are off by ~3e-2.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.adapters.animatediff import global_positions
from clipmesh.worker.noise import initial_noise
from conftest import planned
from ranks import run_ranks, single_thread_model, solo_mesh

MODEL = "tiny-animatediff"
FRAMES, SIDE, STEPS, GUIDANCE, SEED = 8, 64, 3, 7.5, 2468
CLIPS = {1: [(0, 8)], 2: [(0, 4), (4, 8)], 3: [(0, 3), (3, 6), (6, 8)]}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _request(**fields) -> pb.SubmitJobRequest:
    base = dict(prompt="a paper boat on a stream", negative_prompt="blurry", num_frames=FRAMES, height=SIDE,
                width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, fps=8, model=MODEL,
                strategy="exact")
    return pb.SubmitJobRequest(**{**base, **fields})


def _plan(world_size: int) -> pb.RenderPlan:
    plan = planned(_request(num_workers=world_size), world_size, f"animatediff-{world_size}")
    assert [(c.start, c.end) for c in plan.clips] == CLIPS[world_size]
    return plan


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # a private cache: the test also exercises building the preset from scratch
    from clipmesh.presets import model_folder
    with mock.patch.dict(os.environ, {"CLIPMESH_CACHE": str(tmp_path_factory.mktemp("cache"))}):
        return model_folder(MODEL)


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


@torch.no_grad()
def _vanilla(model) -> torch.Tensor:
    """AnimateDiffPipeline.__call__ itself (its own prompt encoding too), from the split-independent
    initial noise (which it scales by init_noise_sigma, as the runner does)."""
    req = _request()
    noise = initial_noise(SEED, 0, FRAMES, 4, SIDE // 8, SIDE // 8, model.denoiser.dtype)
    return model.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, latents=noise, height=SIDE,
                      width=SIDE, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      output_type="latent").frames


@pytest.fixture(scope="module")
def references(folder, model):
    """dtype -> the pipeline's final latents: float32 (the ranks' model) and float64."""
    from clipmesh.worker.adapters import load_adapter
    return {torch.float64: _vanilla(load_adapter(folder, "cpu", torch.float64)), torch.float32: _vanilla(model)}


@pytest.fixture(scope="module")
def reference(references):
    return references[torch.float32]


@pytest.fixture(scope="module")
def pipeline_frames(model, reference):
    """The pipeline's own decode of the reference latents (decode_latents, postprocess), as uint8."""
    with torch.no_grad():
        video = model.pipe.video_processor.postprocess_video(model.pipe.decode_latents(reference), output_type="np")[0]
    return (video * 255.0).round().clip(0, 255).astype("uint8")


def test_rounding_floor(references):
    """The pipeline against itself, float32 against float64: an ulp or two of the latents' size
    (the random weights amplify nothing), under the bound. (1 against 2 threads is no floor for
    this model: its operators are too small to be split, the latents are bitwise equal.)"""
    reference = references[torch.float32]
    top = reference.abs().max()
    vs64 = (reference.double() - references[torch.float64]).abs().max().item()
    ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(top)).item()
    print(f"vanilla float32 vs float64: max|diff|={vs64:.3e} = {vs64 / ulp:.2f} ulp of max|latents|={top:.2f} "
          f"(guidance {GUIDANCE}, {STEPS} DDIM steps)")
    assert vs64 <= min(2 * ulp, TOL[torch.float32])


def _local_positions(frame_start: int):
    """The bug the positions hook prevents: every clip's positions restart at 0."""
    return global_positions(0)


def _rank_main(mesh, folder):
    """One worker process: denoise its clip in float64 and float32, and decode its own clip;
    on 2 ranks also with clip-local positions (the negative control)."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise, render

    plan, out = _plan(mesh.world_size), {}
    for dtype in (torch.float64, torch.float32):
        model = load_adapter(folder, "cpu", dtype)
        out[dtype] = denoise(model, plan, mesh.rank, mesh).numpy()
    if mesh.world_size == 2:
        with mock.patch("clipmesh.worker.adapters.animatediff.global_positions", _local_positions):
            out["local_positions"] = denoise(model, plan, mesh.rank, mesh).numpy()
    pieces = []  # the worker's path: every rank decodes and uploads its own clip
    render(model, plan, mesh.rank, mesh, on_step=lambda report: None, should_stop=lambda: False,
           on_frames=pieces.append)
    (frames,) = pieces
    return out, frames


@pytest.fixture(scope="module")
def ranks(folder):
    """world size -> rank -> (latents per dtype, decoded frames): each world size run once."""
    runs = {}

    def run(world_size):
        if world_size not in runs:
            runs[world_size] = run_ranks(_rank_main, world_size, str(folder), group=f"animatediff-{world_size}")
        return runs[world_size]
    return run


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exact_matches_vanilla(world_size, ranks, references, pipeline_frames):
    for rank, (latents, frames) in sorted(ranks(world_size).items()):
        for dtype, ref in references.items():
            diff = (torch.from_numpy(latents[dtype]) - ref).abs().max().item()
            print(f"world_size={world_size} rank={rank} clips={CLIPS[world_size]} {dtype} max|diff|={diff:.3e}")
            assert diff <= TOL[dtype], f"rank {rank}: {dtype} max abs diff {diff} > {TOL[dtype]}"
        start, end = CLIPS[world_size][rank]
        # each rank decodes its own clip (frame-wise VAE): the pipeline's decode of the whole video
        assert frames.first_frame == start and frames.frames.shape == (end - start, SIDE, SIDE, 3)
        assert abs(frames.frames.astype(int) - pipeline_frames[start:end].astype(int)).max() <= 1


def test_local_positions_are_wrong(ranks, reference):
    """Negative control: with positions restarting at 0 in every clip, 2 ranks miss the bound by far."""
    for rank, (latents, _) in ranks(2).items():
        diff = (torch.from_numpy(latents["local_positions"]) - reference).abs().max().item()
        print(f"clip-local positions, rank {rank}: max|diff|={diff:.3e}")
        assert diff > 100 * TOL[torch.float32]


def test_install_remove_restores_vanilla(model, reference):
    """In-process, one rank: the strategy is installed and removed twice (once by a cancel)."""
    from clipmesh.worker.render import Cancelled, denoise

    unet, mixers = model.denoiser, model.frame_mixers()
    kinds = [m.kind for m in mixers]
    # tiny: 2 down + 4 up + 1 mid motion modules, one transformer block each
    assert (kinds.count("frame_norm"), kinds.count("positions"), kinds.count("attention")) == (7, 7, 14)
    attns = [m.module for m in mixers if m.kind == "attention"]
    stock = [a.processor for a in attns]
    with solo_mesh("animatediff-restore") as mesh:
        latents = denoise(model, _plan(1), 0, mesh)
        with pytest.raises(Cancelled):  # removal must also happen when the loop is interrupted
            denoise(model, _plan(1), 0, mesh, should_stop=lambda: True)
    assert (latents - reference).abs().max().item() <= TOL[torch.float32]
    assert [a.processor for a in attns] == stock
    assert not [name for name, m in unet.named_modules() if "forward" in m.__dict__ or m._forward_hooks]
    assert torch.equal(_vanilla(model), reference)


def test_decode_per_clip_equals_whole(model, reference, pipeline_frames):
    assert model.decodes_per_frame
    whole = model.decode(reference)
    assert whole.shape == (FRAMES, SIDE, SIDE, 3) and whole.dtype.name == "uint8"
    assert abs(whole.astype(int) - pipeline_frames.astype(int)).max() <= 1
    for s, e in CLIPS[3]:
        assert abs(model.decode(reference[:, :, s:e]).astype(int) - whole[s:e].astype(int)).max() <= 1


def test_adapter_pieces(model):
    from diffusers import DPMSolverMultistepScheduler

    info = model.model_info(MODEL)
    assert (info.family, info.spatial_multiple, info.temporal_stride, info.max_frames, info.native_latent_frames) == \
        ("animatediff", 8, 1, 32, 16)
    assert list(info.strategies) == ["exact"] and model.latent_shape(64, 96) == (4, 8, 12)
    config = model.new_scheduler().config
    assert type(model.new_scheduler()).__name__ == "DDIMScheduler"
    assert (config.beta_schedule, config.clip_sample, config.timestep_spacing, config.steps_offset) == \
        ("linear", False, "linspace", 1)
    model.pipe.scheduler, stock = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), model.pipe.scheduler
    try:
        with pytest.raises(NotImplementedError, match="split"):
            model.new_scheduler()
    finally:
        model.pipe.scheduler = stock
    # the positions hook: the rows of global frames, and none past the table
    pos = next(m.module for m in model.frame_mixers() if m.kind == "positions")
    x = torch.randn(3, 4, pos.pe.shape[-1])
    assert torch.equal(global_positions(5)(pos, (x,), None), x + pos.pe[:, 5:9])
    assert torch.equal(global_positions(0)(pos, (x,), None), pos(x))
    with pytest.raises(ValueError, match="positions"):
        global_positions(29)(pos, (x,), None)


def test_validation_refuses_clip_parallel_and_frames_beyond_the_table():
    from clipmesh.coordinator.errors import InvalidArgument
    from clipmesh.coordinator.validate import validate_request
    from clipmesh.presets import model_limits

    info = pb.ModelInfo(**model_limits(MODEL))

    def refused(**fields) -> InvalidArgument:
        with pytest.raises(InvalidArgument) as err:
            validate_request(_request(**fields), info, [MODEL])
        return err.value

    err = refused(strategy="clip_parallel")
    assert err.field == "strategy" and "Video-Infinity" in str(err) and "position embeddings" in str(err)
    assert "allowed: exact" in str(err)
    assert refused(strategy="block_pipeline").field == "strategy"
    err = refused(num_frames=33)
    assert err.field == "num_frames" and "[1, 32]" in str(err)
    for frames in (1, 24, 32):  # beyond the 16 native frames: still exact (no long-video strategy)
        validate_request(_request(num_frames=frames, strategy=""), info, [MODEL])


def test_limits_from_folder_configs(folder):
    """The preset's limits as its folder's configs give them, and a real v1.5-2 folder's."""
    import json

    from clipmesh.presets import PRESETS, limits_from_configs, model_limits

    derived, preset = model_limits(str(folder)), PRESETS[MODEL]["limits"]
    assert json.loads((folder / "unet" / "config.json").read_text())["_class_name"] == "UNetMotionModel"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "AnimateDiffPipeline"
    same = ("family", "spatial_multiple", "temporal_stride", "max_frames", "native_latent_frames", "strategies",
            "attention_heads")
    assert {k: derived[k] for k in same} == {k: preset[k] for k in same}
    # the keys that matter of an SD 1.5 + animatediff-motion-adapter-v1-5-2 unet/ and vae/
    unet = {"_class_name": "UNetMotionModel", "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlockMotion"] * 3 + ["DownBlockMotion"],
            "motion_max_seq_length": 32, "motion_num_attention_heads": 8, "use_motion_mid_block": True}
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}
    real = limits_from_configs(unet, vae, "/models/animatediff-v1-5-2")
    assert (real["family"], real["spatial_multiple"], real["temporal_stride"], real["max_frames"],
            real["native_latent_frames"], real["strategies"], real["attention_heads"]) == \
        ("animatediff", 8, 1, 32, 16, ["exact"], 8)
    unnamed = {k: v for k, v in unet.items() if k != "_class_name"}  # recognised by its motion table too
    assert limits_from_configs({**unnamed, "motion_max_seq_length": 24}, vae)["max_frames"] == 24
