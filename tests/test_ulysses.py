"""`ulysses` is exact: N real processes (gloo) exchanging q/k/v by all-to-all over heads equal
vanilla diffusers WanPipeline on the whole video, for 1, 2 and 3 workers with uneven clips.

The model is tiny-wan with 6 attention heads (so 1, 2 and 3 workers divide them), built here
from the real diffusers classes and loaded as a local folder like any model. A head count the
workers do not divide is refused before anything runs: at submit (INVALID_ARGUMENT naming
num_workers and the heads) and by the worker's up-front plan check.
"""

from __future__ import annotations

import pytest
import torch

from clipmesh import presets
from clipmesh.plan import num_latent_frames, split_clips
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from conftest import planned
from ranks import run_ranks, single_thread_model, solo_mesh

FRAMES, SIDE, STEPS, GUIDANCE, SEED, HEADS = 17, 32, 3, 5.0, 77, 6
LATENT = num_latent_frames(FRAMES, 4)
TOL = 1e-5


def _plan(folder: str, world_size: int) -> pb.RenderPlan:
    req = pb.SubmitJobRequest(prompt="a heron over a lake", negative_prompt="blurry", num_frames=FRAMES, height=SIDE,
                              width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, model=folder, fps=8,
                              strategy="ulysses", num_workers=world_size)
    return planned(req, world_size, f"ulysses-{world_size}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """tiny-wan with a 6-head transformer (seeded), saved as a diffusers folder."""
    from diffusers import WanPipeline, WanTransformer3DModel

    out = tmp_path_factory.mktemp("wan6") / "tiny-wan-6-heads"
    pipe = WanPipeline.from_pretrained(presets.model_folder("tiny-wan"))
    torch.manual_seed(6)
    config = dict(presets.PRESETS["tiny-wan"]["transformer"], num_attention_heads=HEADS)
    pipe.register_modules(transformer=WanTransformer3DModel(**config).eval())
    pipe.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


@pytest.fixture(scope="module")
def reference(model, folder):
    req = _plan(folder, 1).request
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    noise = initial_noise(SEED, 0, LATENT, 16, SIDE // 8, SIDE // 8)
    return model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                      num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      output_type="latent").frames


def _rank_main(mesh, folder):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model, reports = load_adapter(folder, "cpu", torch.float32), []
    latents = denoise(model, _plan(folder, mesh.world_size), mesh.rank, mesh, on_step=reports.append)
    return latents.numpy(), [(r.step, r.bytes_sent) for r in reports]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ulysses_matches_vanilla(world_size, folder, reference):
    results = run_ranks(_rank_main, world_size, folder, group=f"ulysses-{world_size}")
    for rank, (latents, reports) in sorted(results.items()):
        diff = (torch.from_numpy(latents) - reference).abs().max().item()
        print(f"world_size={world_size} rank={rank} clips={split_clips(LATENT, world_size)} max|diff|={diff:.3e}")
        assert diff <= TOL
        assert [step for step, _ in reports] == list(range(1, STEPS + 1))
        # the all-to-alls really move data between ranks (and none with one rank)
        assert all((sent > 0) == (world_size > 1) for _, sent in reports)


def test_model_is_restored_after_a_job(model, folder, reference):
    """A job's patches go away: the same loaded model then runs vanilla again, bit for bit."""
    from clipmesh.worker.render import denoise

    with solo_mesh("ulysses-restore") as mesh:
        denoise(model, _plan(folder, 1), 0, mesh)
    assert {type(a.processor).__name__ for a in model.self_attentions()} == {"WanAttnProcessor"}
    assert not model.denoiser.rope._forward_hooks


def test_heads_not_divisible_are_refused_up_front(folder):
    from clipmesh.coordinator.errors import InvalidArgument
    from clipmesh.coordinator.validate import validate_request
    from clipmesh.specs import SpecError, check_plan

    info = pb.ModelInfo(**presets.model_limits(folder))
    assert info.attention_heads == HEADS
    req = _plan(folder, 4).request
    with pytest.raises(InvalidArgument) as err:
        validate_request(req, info, [folder])
    assert "num_workers" in str(err.value) and str(HEADS) in str(err.value)
    # the worker's own check refuses such a plan before any collective
    plan = _plan(folder, 4)
    del plan.clips[:]
    plan.clips.extend(pb.ClipRange(start=s, end=e) for s, e in split_clips(LATENT, 4))
    with pytest.raises(SpecError, match="heads"):
        check_plan(plan, info)
