"""Step checkpoints (worker/checkpoint.py): a run resumed from a checkpoint equals the
uninterrupted run: bit for bit with the same split, within 1e-5 re-split over another worker
count (the latents and UniPC's multistep history are cut per latent frame and glued again).
Real gloo ranks; tiny-wan (UniPC keeps a history of model outputs, so a resume that lost it
would differ), 17 frames -> 5 latent frames."""

from __future__ import annotations

import pytest
import torch

from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import planned
from ranks import run_ranks

FRAMES, SIDE, STEPS, SEED, LATENT = 17, 32, 5, 99, 5
TOL = 1e-5


def _plan(world_size: int, strategy: str, every: int = 2, resume_step: int = 0) -> pb.RenderPlan:
    req = pb.SubmitJobRequest(prompt="a kite over dunes", negative_prompt="blurry", num_frames=FRAMES, height=SIDE,
                              width=SIDE, num_inference_steps=STEPS, guidance_scale=5.0, seed=SEED, model="tiny-wan",
                              strategy=strategy, num_workers=world_size, checkpoint_every=every)
    if strategy == "clip_parallel":
        req.clip_parallel.CopyFrom(pb.ClipParallelOptions(local_halo=1, global_frames=1, global_phase=0.5,
                                                          phase_bias=10.0, entropy_scaling=False,
                                                          noise_reschedule=False, spectral_blend=False,
                                                          global_rope="native"))
    return planned(req, world_size, f"ckpt-{strategy}-{world_size}-{resume_step}", start_step=resume_step)


def _rank(mesh, folder, strategy, resume_step, parts):
    """Denoise this rank's clip (from `parts` at `resume_step`, else from noise); return the whole
    video's latents, the steps run and this rank's checkpoint parts."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model = load_adapter(folder, "cpu", torch.float32)
    plan, steps, written = _plan(mesh.world_size, strategy, resume_step=resume_step), [], []
    resume = [data for step, _, _, data in parts if step == resume_step] if resume_step else None
    latents = denoise(model, plan, mesh.rank, mesh, on_step=lambda r: steps.append(r.step), resume=resume,
                      on_checkpoint=lambda p: written.append((p.step, p.start, p.end, p.data)))
    return latents.numpy(), steps, written


def _run(world_size, folder, strategy, resume_step=0, parts=()):
    out = run_ranks(_rank, world_size, str(folder), strategy, resume_step, list(parts),
                    group=f"ckpt-{strategy}-{world_size}-{resume_step}")
    return torch.from_numpy(out[0][0]), [out[r][1] for r in sorted(out)], [p for r in sorted(out) for p in out[r][2]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_wan_folder):
    """2 ranks, checkpoints every 2 steps: at 2 and 4 (not after the last step)."""
    return {s: _run(2, tiny_wan_folder, s) for s in ("exact", "clip_parallel")}


@pytest.mark.parametrize("strategy", ["exact", "clip_parallel"])
def test_checkpoints_are_written_every_k_steps_by_every_rank(uninterrupted, strategy):
    _, steps, parts = uninterrupted[strategy]
    assert steps == [list(range(1, STEPS + 1))] * 2
    assert sorted((step, start, end) for step, start, end, _ in parts) == [(2, 0, 3), (2, 3, 5), (4, 0, 3), (4, 3, 5)]


@pytest.mark.parametrize("strategy", ["exact", "clip_parallel"])
def test_resume_with_the_same_split_is_bitwise(uninterrupted, tiny_wan_folder, strategy):
    full, _, parts = uninterrupted[strategy]
    resumed, steps, _ = _run(2, tiny_wan_folder, strategy, 2, parts)
    assert steps == [[3, 4, 5]] * 2  # only the steps after the checkpoint ran
    assert torch.equal(resumed, full)


@pytest.mark.parametrize(("strategy", "world_size", "step"), [("exact", 3, 2), ("exact", 1, 4),
                                                               ("clip_parallel", 1, 2)])
def test_resume_re_split_over_another_count(uninterrupted, tiny_wan_folder, strategy, world_size, step):
    full, _, parts = uninterrupted[strategy]
    resumed, steps, _ = _run(world_size, tiny_wan_folder, strategy, step, parts)
    assert steps == [list(range(step + 1, STEPS + 1))] * world_size
    diff = (resumed - full).abs().max().item()
    print(f"{strategy} 2 -> {world_size} ranks from step {step}: max|diff| {diff:.2e}")
    assert diff <= TOL


def test_a_resume_without_the_history_would_differ(uninterrupted, tiny_wan_folder):
    """The oracle can fail: drop UniPC's history from the parts and the resumed video changes."""
    from clipmesh.worker import checkpoint

    full, _, parts = uninterrupted["exact"]
    stripped = []
    for step, start, end, data in parts:
        loaded = checkpoint.loads(data)
        latents = loaded["latents"]

        class Fresh:  # a scheduler state with an empty history
            model_outputs = [None] * len(loaded["frames"]["model_outputs"])
        part = checkpoint.save(step, start, end, latents, Fresh())
        stripped.append((step, start, end, part.data))
    resumed, _, _ = _run(2, tiny_wan_folder, "exact", 2, stripped)
    assert (resumed - full).abs().max().item() > 1e-3


def test_parts_that_miss_frames_are_refused():
    from clipmesh.worker import checkpoint

    class Scheduler:
        pass

    part = checkpoint.save(2, 0, 3, torch.zeros(1, 4, 3, 2, 2), Scheduler())
    with pytest.raises(ValueError, match="cover 3 of latent frames \\[0, 5\\)"):
        checkpoint.restore([part.data], 0, 5, Scheduler())


def test_the_coordinator_keeps_only_the_last_complete_checkpoint(tmp_path):
    """coordinator/checkpoints.py on a real SQLite store: a step counts once its parts cover
    every latent frame, earlier steps' files then go; a part that lies is refused and not kept."""
    import asyncio

    from clipmesh.coordinator.checkpoints import Checkpoints
    from clipmesh.coordinator.errors import InvalidArgument
    from clipmesh.coordinator.store import Store

    store = Store(tmp_path / "db.sqlite")
    checkpoints = Checkpoints(store, tmp_path / "checkpoints")

    async def upload(step, start, end, data: bytes, size=None):
        header = pb.CheckpointHeader(job_id="j", attempt=1, worker_id="w", step=step, latent_start=start,
                                     latent_end=end, size=len(data) if size is None else size)

        async def chunks():
            yield data

        return await checkpoints.receive(header, chunks(), 5)

    async def scenario():
        assert not await upload(2, 0, 3, b"a" * 10)
        assert checkpoints.latest("j", 5) is None           # [3, 5) missing
        assert await upload(2, 3, 5, b"b" * 7)              # complete
        assert [(p.latent_start, p.latent_end, p.size) for p in checkpoints.latest("j", 5).parts] == [(0, 3, 10),
                                                                                                       (3, 5, 7)]
        assert not await upload(4, 0, 3, b"c" * 10)
        assert checkpoints.latest("j", 5).step == 2         # step 4 not complete: step 2 stays
        assert await upload(4, 3, 5, b"d" * 7)
        assert checkpoints.latest("j", 5).step == 4
        assert not (tmp_path / "checkpoints" / "j" / "2" / "0-3.part").exists()  # the older step's files went
        assert checkpoints.read("j", 4, 0, 3).read_bytes() == b"c" * 10
        with pytest.raises(InvalidArgument, match="latent_start/latent_end"):
            await upload(6, 3, 9, b"e")
        with pytest.raises(InvalidArgument, match="expected 5 bytes"):
            await upload(6, 0, 5, b"e" * 3, size=5)
        assert checkpoints.latest("j", 5).step == 4 and not store.checkpoint_parts("j", 6)
        checkpoints.drop("j")
        assert checkpoints.latest("j", 5) is None and not (tmp_path / "checkpoints" / "j").exists()

    asyncio.run(scenario())


# -- block_pipeline: rank 0's queue ------------------------------------------------------------

BP_FRAMES, BP_STEPS = 33, 4  # 9 latent frames: 5 blocks of 2 (the last of 1), 8 iterations


def _bp_plan(world_size: int, frames_in_video: int = 0, resume=None) -> pb.RenderPlan:
    req = pb.SubmitJobRequest(prompt="a river in spring", negative_prompt="blurry", num_frames=BP_FRAMES,
                              height=SIDE, width=SIDE, num_inference_steps=BP_STEPS, guidance_scale=5.0, seed=SEED,
                              model="tiny-wan", strategy="block_pipeline", fps=8, checkpoint_every=2,
                              block_pipeline=pb.BlockPipelineOptions(block_frames=2, context_frames=1))
    return planned(req, world_size, f"bpckpt{world_size}", frames_in_video=frames_in_video)


def _bp_rank(mesh, folder, plan_bytes, resume):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render

    plan, blocks, written = pb.RenderPlan.FromString(plan_bytes), [], []
    render(load_adapter(folder, "cpu", torch.float32), plan, mesh.rank, mesh, decode=False,
           resume=resume if mesh.rank == 0 else None,
           on_latents=lambda p: blocks.append((p.start, p.end, p.latents.numpy().copy())),
           on_checkpoint=lambda p: written.append((p.step, p.data)))
    return blocks, written


def _bp_run(folder, plan, resume=None):
    out = run_ranks(_bp_rank, plan.world_size, str(folder), plan.SerializeToString(), resume,
                    group=f"bpckpt-{plan.world_size}-{plan.frames_in_video}-{bool(resume)}")
    blocks = sorted(b for rank in sorted(out) for b in out[rank][0])
    return {(s, e): torch.from_numpy(x) for s, e, x in blocks}, [p for rank in sorted(out) for p in out[rank][1]]


@pytest.fixture(scope="module")
def bp_uninterrupted(tiny_wan_folder):
    return _bp_run(tiny_wan_folder, _bp_plan(2))


@pytest.mark.parametrize("world_size", [2, 1, 3])
def test_block_pipeline_resumes_the_queue(bp_uninterrupted, tiny_wan_folder, world_size):
    """Resumed after iteration 6 (blocks 0, 1 and 2 have left the queue) with the video holding
    block 0's frames only: blocks 1 and 2 are handed out again, then the queue goes on; every
    block's final latents equal the uninterrupted run's, bit for bit on the same 2 stages,
    within 1e-5 on 1 or 3."""
    from clipmesh.plan import num_output_frames
    from clipmesh.worker import checkpoint

    full, parts = bp_uninterrupted
    assert [step for step, _ in parts] == [2, 4, 6, 8]  # rank 0 writes the queue every 2 iterations
    data = dict(parts)[6]
    state = checkpoint.loads(data)
    assert [(s, e) for s, e, _ in state["recent"]] == [(0, 2), (2, 4), (4, 6)] and state["entered"] == 5
    blocks, _ = _bp_run(tiny_wan_folder, _bp_plan(world_size, frames_in_video=num_output_frames(2, 4)), [data])
    assert sorted(blocks) == [(2, 4), (4, 6), (6, 8), (8, 9)]  # block 0 is in the video already
    for span, latents in blocks.items():
        diff = (latents - full[span]).abs().max().item()
        assert (diff == 0.0) if world_size == 2 else (diff <= TOL), f"{span}: {diff}"
