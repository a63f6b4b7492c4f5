"""Wan 2.2 A14B's two experts (tiny-wan22: a diffusers-saved WanPipeline with `transformer_2` and
`boundary_ratio` 0.875) under every strategy.

3 steps of UniPC at shift 3 are t = 999, 857, 600: the high-noise expert runs the first step and
the low-noise expert the other two, so the boundary falls inside the steps (asserted). At 17
frames (5 latent frames, below the native 21) clip_parallel is exact, so every frames strategy,
at every worker count, must give the stock pipeline's latents within 1e-5. block_pipeline has
blocks at different steps in flight at once, each run on its own step's expert: 2 and 3 stages
(each holding its layers of both experts) equal 1 stage, which uses both.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from clipmesh import presets
from clipmesh.plan import num_latent_frames
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from conftest import planned, wait_until
from ranks import run_ranks, single_thread_model, solo_mesh

MODEL = "tiny-wan22"
FRAMES, SIDE, STEPS, GUIDANCE, GUIDANCE_2, SEED = 17, 64, 3, 5.0, 2.0, 4321
LATENT = num_latent_frames(FRAMES, 4)
TOL = 1e-5


def _request(world_size: int, strategy: str, frames: int = FRAMES) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", num_frames=frames,
                               height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                               seed=SEED, model=MODEL, strategy=strategy, num_workers=world_size, fps=8,
                               guidance_scale_2=GUIDANCE_2)


def _plan(world_size: int, strategy: str, guidance_2: float | None = GUIDANCE_2, start_step: int = 0,
          every: int = 0) -> pb.RenderPlan:
    req = _request(world_size, strategy)
    req.ClearField("guidance_scale_2")
    if guidance_2 is not None:
        req.guidance_scale_2 = guidance_2
    req.checkpoint_every = every
    return planned(req, world_size, f"wan22-{strategy}-{world_size}", start_step=start_step)


@pytest.fixture(scope="module")
def folder():
    return presets.model_folder(MODEL)


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


def _stock(model, guidance_2: float | None = GUIDANCE_2) -> torch.Tensor:
    """The stock WanPipeline from the same noise: the reference."""
    cond, uncond = model.encode_prompt("a lighthouse at dusk", "blurry", GUIDANCE)
    noise = initial_noise(SEED, 0, LATENT, 16, SIDE // 8, SIDE // 8)
    return model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                      num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      guidance_scale_2=guidance_2, output_type="latent").frames


@pytest.fixture(scope="module")
def reference(model):
    return _stock(model)


def _rank(mesh, folder, strategy):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model = load_adapter(folder, "cpu", torch.float32)
    return denoise(model, _plan(mesh.world_size, strategy), mesh.rank, mesh).numpy()


@pytest.mark.parametrize("strategy,world_size", [("exact", 2), ("exact", 3), ("ulysses", 2),
                                                 ("clip_parallel", 2), ("clip_parallel", 3)])
def test_two_experts_match_the_stock_pipeline(folder, reference, strategy, world_size):
    results = run_ranks(_rank, world_size, str(folder), strategy, group=f"wan22-{strategy}-{world_size}")
    for rank, latents in sorted(results.items()):
        diff = (torch.from_numpy(latents) - reference).abs().max().item()
        print(f"{strategy} world_size={world_size} rank={rank} max|diff|={diff:.3e}")
        assert diff <= TOL, f"{strategy} rank {rank}: max abs diff {diff} > {TOL}"


def test_both_experts_run_each_at_its_steps(model, reference):
    """One worker (in process) equals the stock pipeline, and the boundary falls inside the steps:
    the high-noise expert runs step 1 (cond and uncond),
    the low-noise one steps 2 and 3; the result differs from one expert throughout and from one
    guidance throughout, so a run that ignored either would fail the equivalence above."""
    from clipmesh.worker.render import denoise

    calls = []
    hooks = [t.register_forward_hook(lambda mod, args, out, i=i: calls.append(i)) for i, t in enumerate(model.denoisers)]
    try:
        with solo_mesh("wan22-calls") as mesh:
            latents = denoise(model, _plan(1, "exact"), 0, mesh)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 0, 1, 1, 1, 1]
    assert (latents - reference).abs().max().item() <= TOL
    one_guidance = _stock(model, guidance_2=None)
    assert (one_guidance - reference).abs().max().item() > 100 * TOL
    second = model.pipe.transformer_2
    model.pipe.transformer_2 = model.pipe.transformer
    try:
        one_expert = _stock(model)
    finally:
        model.pipe.transformer_2 = second
    assert (one_expert - reference).abs().max().item() > 100 * TOL


def test_a_resume_across_the_switch_equals_the_whole_run(model, reference):
    """A checkpoint after step 1 (the high-noise expert's last) resumed on the low-noise expert."""
    from clipmesh.worker.render import denoise

    parts = []
    with solo_mesh("wan22-ckpt") as mesh:
        denoise(model, _plan(1, "exact", every=1), 0, mesh, on_checkpoint=parts.append)
        resume = [p.data for p in parts if p.step == 1]
        resumed = denoise(model, _plan(1, "exact", start_step=1), 0, mesh, resume=resume)
    assert resume and (resumed - reference).abs().max().item() <= TOL


def _render_blocks(model, mesh, plan: pb.RenderPlan) -> list[tuple[int, np.ndarray]]:
    from clipmesh.worker.render import render

    blocks = []
    render(model, plan, mesh.rank, mesh, decode=False,
           on_latents=lambda piece: blocks.append((piece.start, piece.latents.numpy().copy())))
    return blocks


def _blocks(mesh, folder, plan_bytes):
    from clipmesh.worker.adapters import load_adapter

    return _render_blocks(load_adapter(folder, "cpu", torch.float32), mesh, pb.RenderPlan.FromString(plan_bytes))


def _block_plan(world_size: int) -> pb.RenderPlan:
    """block_pipeline on 25 frames (7 latent frames: blocks of 2, 2, 2, 1; 1 frame of context)
    from the real planner."""
    req = _request(world_size, "block_pipeline", frames=25)
    req.block_pipeline.CopyFrom(pb.BlockPipelineOptions(block_frames=2, context_frames=1))
    return planned(req, world_size, f"bp22-{world_size}")


def _video(blocks) -> torch.Tensor:
    return torch.cat([torch.from_numpy(x) for _, x in sorted(blocks, key=lambda b: b[0])], dim=2)


@pytest.fixture(scope="module")
def one_stage(model):
    with solo_mesh("bp22-one") as mesh:
        return _video(_render_blocks(model, mesh, _block_plan(1)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_block_pipeline_stages_equal_one_stage(folder, one_stage, world_size):
    by_rank = run_ranks(_blocks, world_size, str(folder), _block_plan(world_size).SerializeToString(),
                        group=f"bp22-{world_size}")
    latents = _video([b for blocks in by_rank.values() for b in blocks])
    assert latents.shape == one_stage.shape and latents.shape[2] == num_latent_frames(25, 4)
    diff = (latents - one_stage).abs().max().item()
    print(f"block_pipeline stages={world_size} max|diff|={diff:.3e}")
    assert diff <= TOL


def test_block_pipeline_runs_each_block_on_its_steps_expert(model, one_stage):
    """Each of the 4 blocks' 3 steps: the first on the high-noise expert, the others on the
    low-noise one (cond and uncond batched: one call a step); one expert throughout differs."""
    from clipmesh.worker.adapters.wan import WanStages

    calls, original = [], WanStages.blocks

    def counting(self, hidden, *args):
        calls.append(model.denoisers.index(self.t))
        return original(self, hidden, *args)

    with pytest.MonkeyPatch.context() as patch, solo_mesh("bp22-calls") as mesh:
        patch.setattr(WanStages, "blocks", counting)
        assert (_video(_render_blocks(model, mesh, _block_plan(1))) - one_stage).abs().max().item() <= TOL
    assert sorted(calls) == [0] * 4 + [1] * 8
    second = model.pipe.transformer_2
    model.pipe.transformer_2 = model.pipe.transformer
    try:
        with solo_mesh("bp22-one-expert") as mesh:
            one_expert = _video(_render_blocks(model, mesh, _block_plan(1)))
    finally:
        model.pipe.transformer_2 = second
    assert (one_expert - one_stage).abs().max().item() > 100 * TOL


def test_limits_and_refusals_at_submit():
    from clipmesh.coordinator.errors import InvalidArgument
    from clipmesh.coordinator.validate import validate_request

    two, one = pb.ModelInfo(**presets.model_limits(MODEL)), pb.ModelInfo(**presets.model_limits("tiny-wan"))
    assert two.experts == 2 and one.experts == 1
    assert two.strategies == one.strategies  # every strategy runs two experts
    base = dict(prompt="p", num_frames=17, height=64, width=64, num_inference_steps=3, guidance_scale=5.0, fps=8)
    with pytest.raises(InvalidArgument, match="guidance_scale_2.*two-expert"):
        validate_request(pb.SubmitJobRequest(model="tiny-wan", guidance_scale_2=2.0, **base), one, ["tiny-wan"])
    with pytest.raises(InvalidArgument, match=r"guidance_scale_2.*\[0, 50\]"):
        validate_request(pb.SubmitJobRequest(model=MODEL, guidance_scale_2=-1.0, **base), two, [MODEL])
    assert validate_request(pb.SubmitJobRequest(model=MODEL, guidance_scale_2=2.0, **base), two, [MODEL]) == LATENT


def test_the_cli_sends_guidance_2_only_when_given():
    from clipmesh.cli import _request_fields, build_parser

    parse = build_parser().parse_args
    assert _request_fields(parse(["generate", "p", "--output", "v.mp4", "--guidance-2", "2.5"]))["guidance_scale_2"] == 2.5
    assert "guidance_scale_2" not in _request_fields(parse(["generate", "p", "--output", "v.mp4"]))


def test_a_saved_two_expert_folder_reports_its_experts(folder):
    """A folder (not a preset name) is read from its model_index.json, as a real Wan2.2-T2V-A14B-Diffusers is."""
    limits = presets.model_limits(str(folder))
    assert limits["experts"] == 2


def test_a_two_expert_job_through_real_daemons(daemons, tmp_path):
    """Coordinator and 2 worker daemons serving tiny-wan22: a bad guidance_scale_2 is refused at
    submit, nothing queued; a block_pipeline job with guidance_scale_2 succeeds."""
    daemons.coordinator()
    for name in ("w0", "w1"):
        daemons.worker(name, MODEL)
    client = daemons.client()
    daemons.wait_idle(client, {"w0", "w1"})
    with pytest.raises(grpc.RpcError) as refused:
        client.submit("a cat", model=MODEL, num_frames=17, height=64, width=64, guidance_scale_2=99.0)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "guidance_scale_2" in refused.value.details()
    assert client.jobs() == []
    job = client.submit("a cat", model=MODEL, strategy="block_pipeline", num_workers=2, num_frames=25, height=64,
                        width=64, num_inference_steps=3, guidance_scale=5.0, guidance_scale_2=2.0)
    wait_until(lambda: client.get(job.id).state in (pb.SUCCEEDED, pb.FAILED), 120, "the job", daemons)
    done = client.get(job.id)
    assert done.state == pb.SUCCEEDED, done.error
    assert client.fetch(job.id, tmp_path / "v.mp4") == done.video_size > 0
