"""The oracle: clip-parallel `exact` rendering equals vanilla diffusers WanPipeline.

N real processes (gloo over loopback) each denoise their clip of the tiny-wan preset; the
gathered latents must match `WanPipeline.__call__` on the whole video from the same noise.
17 frames -> 5 latent frames: 2 ranks split 3+2, 3 ranks 2+2+1 (uneven both times).
"""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from clipmesh.plan import num_latent_frames, split_clips
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from ranks import run_ranks, single_thread_model

FRAMES, SIDE, STEPS, GUIDANCE, SEED = 17, 64, 3, 5.0, 1234
LATENT = num_latent_frames(FRAMES, 4)
TOL = 1e-5


def _plan(world_size: int, name: str = "equiv") -> pb.RenderPlan:
    req = pb.SubmitJobRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", num_frames=FRAMES,
                              height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                              model="tiny-wan", strategy="exact", num_workers=world_size)
    clips = [pb.ClipRange(start=s, end=e) for s, e in split_clips(LATENT, world_size)]
    return pb.RenderPlan(request=req, strategy="exact", world_size=world_size, num_latent_frames=LATENT,
                         clips=clips, start_step=0, decode_rank=0, group_name=f"{name}-{world_size}",
                         timeout_seconds=60)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # a private cache: the test also exercises building the preset from scratch
    from clipmesh.presets import model_folder
    with mock.patch.dict(os.environ, {"CLIPMESH_CACHE": str(tmp_path_factory.mktemp("cache"))}):
        return model_folder("tiny-wan")


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


def _vanilla(model) -> torch.Tensor:
    req = _plan(1).request
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    noise = initial_noise(SEED, 0, LATENT, 16, SIDE // 8, SIDE // 8)
    return model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").frames


@pytest.fixture(scope="module")
def reference(model):
    return _vanilla(model)


def _rank_main(mesh, folder, stop_after):
    """One worker process: load, denoise its clip; `stop_after`: the last rank alone asks to stop
    once it has done that many steps."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import Cancelled, denoise

    model, plan, steps = load_adapter(folder, "cpu", torch.float32), _plan(mesh.world_size), []
    wants_stop = stop_after is not None and mesh.rank == mesh.world_size - 1
    try:
        latents = denoise(model, plan, mesh.rank, mesh, on_step=lambda report: steps.append(report.step),
                          should_stop=lambda: wants_stop and len(steps) >= stop_after)
        return "ok", latents.numpy(), steps
    except Cancelled:
        return "cancelled", None, steps


def _run_ranks(world_size, folder, stop_after=None):
    return run_ranks(_rank_main, world_size, str(folder), stop_after, group=f"equiv-{world_size}")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exact_matches_vanilla(world_size, folder, reference):
    results = _run_ranks(world_size, folder)
    for rank, (status, latents, steps) in sorted(results.items()):
        assert status == "ok" and steps == list(range(1, STEPS + 1))
        diff = (torch.from_numpy(latents) - reference).abs().max().item()
        print(f"world_size={world_size} rank={rank} clips={split_clips(LATENT, world_size)} max|diff|={diff:.3e}")
        assert diff <= TOL, f"rank {rank}: max abs diff {diff} > {TOL}"


def test_cancel_on_one_rank_stops_all_at_same_step(folder):
    results = _run_ranks(2, folder, stop_after=1)
    assert [results[r][0] for r in (0, 1)] == ["cancelled", "cancelled"]
    assert [results[r][2] for r in (0, 1)] == [[1], [1]]  # both stopped at the same boundary


def test_install_remove_restores_vanilla(model, reference):
    from clipmesh.worker.mesh import Mesh, host_store
    from clipmesh.worker.render import Cancelled, denoise

    attns = model.self_attentions()
    stock = [a.processor for a in attns]
    store, port = host_store("127.0.0.1", timeout_s=30)
    with Mesh.open("127.0.0.1", port, 0, 1, "restore", timeout_s=30, store=store) as mesh:
        denoise(model, _plan(1), 0, mesh)
        with pytest.raises(Cancelled):  # removal must also happen when the loop is interrupted
            denoise(model, _plan(1), 0, mesh, should_stop=lambda: True)
    assert [a.processor for a in attns] == stock
    assert not model.denoiser.rope._forward_hooks
    assert torch.equal(_vanilla(model), reference)


def test_plan_math_and_noise_independent_of_split():
    assert LATENT == 5
    assert split_clips(5, 2) == [(0, 3), (3, 5)]
    assert split_clips(5, 3) == [(0, 2), (2, 4), (4, 5)]
    whole = initial_noise(SEED, 0, 5, 16, 4, 4)
    assert torch.equal(whole, torch.cat([initial_noise(SEED, 0, 2, 16, 4, 4), initial_noise(SEED, 2, 5, 16, 4, 4)], 2))
    assert not torch.equal(whole[:, :, 0], whole[:, :, 1])
    assert not torch.equal(whole, initial_noise(SEED + 1, 0, 5, 16, 4, 4))


def test_model_limits_without_torch(folder):
    code = ("import sys, clipmesh.presets as p; "
            "print(p.model_limits('tiny-wan'), p.model_limits(sys.argv[1])); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True).stdout
    assert "'spatial_multiple': 16" in out and "'temporal_stride': 4" in out
