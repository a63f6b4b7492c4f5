"""Faults do not lose work, through real daemons and real signals: a coordinator and three
tiny-wan workers on loopback, `kill -9` and SIGSTOP of workers and of the coordinator.

The oracle is the video of the same job run without a fault: bit for bit (sha256) where the
resumed attempt has the same split and the video was encoded in one go, decoded within the
suite's tolerance where the split changed (test_cluster's comparison) or a coordinator
restart joined two encodes."""

from __future__ import annotations

import random
import signal
import time

import grpc
import imageio.v3 as iio
import pytest

from clipmesh import presets
from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import Daemons, wait_until

HEARTBEAT_S = 4.0  # short for the tests; long enough that a busy 2-core machine does not miss beats
WORKERS = ("f0", "f1", "f2")
JOB = dict(num_frames=9, height=32, width=48, num_inference_steps=40, fps=8.0, seed=5, checkpoint_every=2)


@pytest.fixture(scope="module")
def farm(tmp_path_factory, tiny_wan_folder):
    d = Daemons(tmp_path_factory.mktemp("farm"))
    d.coordinator_args = ("--heartbeat-timeout", str(HEARTBEAT_S), "--collective-timeout", "60",
                          "--backfill-wait", "3")
    d.coordinator(*d.coordinator_args)
    d.port = int(d.address.rsplit(":", 1)[1])
    d.workers = {name: d.worker(name) for name in WORKERS}
    with d.client() as client:
        d.wait_idle(client, set(WORKERS), timeout=180)
    d.references = {}
    yield d
    d.stop()


def restart_coordinator(farm) -> None:
    farm.procs.remove(farm.coordinator_proc)
    farm.coordinator(*farm.coordinator_args, port=farm.port)


def restore(farm) -> None:
    """The farm whole again: a live coordinator, every worker alive, thawed and IDLE, no job left."""
    if farm.coordinator_proc.poll() is not None:
        restart_coordinator(farm)
    with farm.client() as client:
        wait_until(lambda: client.workers() is not None, 30, "the coordinator", farm)
        for job in client.jobs():
            if job.state in (pb.QUEUED, pb.RUNNING):
                try:
                    client.cancel(job.id)
                except grpc.RpcError:
                    pass

        def whole() -> bool:
            states = {w.id: w.state for w in client.workers()}
            for name in WORKERS:
                proc = farm.workers[name]
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                elif states.get(name, pb.LOST) == pb.LOST:
                    farm.procs.remove(proc)
                    farm.workers[name] = farm.worker(name)
            return all(states.get(name) == pb.IDLE for name in WORKERS)

        wait_until(whole, 120, "the farm back and idle", farm)


@pytest.fixture
def whole_farm(farm):
    restore(farm)
    yield farm
    restore(farm)


def run_to_end(client, job_id: str) -> pb.Job:
    for _ in client.watch(job_id):
        pass
    return client.get(job_id)


def reference(farm, strategy: str, workers: int, steps: int = JOB["num_inference_steps"]) -> pb.Job:
    """The job without a fault (computed once per setting)."""
    key = (strategy, workers, steps)
    if key not in farm.references:
        with farm.client() as client:
            job = client.submit("a paper boat on a pond", strategy=strategy, num_workers=workers,
                                **{**JOB, "num_inference_steps": steps})
            job = run_to_end(client, job.id)
            assert job.state == pb.SUCCEEDED, job.error
            farm.references[key] = job
    return farm.references[key]


def wait_for_step(client, job_id: str, step: int) -> pb.Job:
    for event in client.watch(job_id):
        if event.HasField("step") and event.step.step >= step:
            return client.get(job_id)
    raise AssertionError(f"job {job_id} ended before step {step}: {client.get(job_id)}")


def same_video_decoded(client, job_id: str, want_id: str, tmp_path) -> bool:
    """test_cluster's comparison: the same shape, mean |difference| < 0.5 levels (H.264 noise)."""
    videos = []
    for name in (job_id, want_id):
        client.fetch(name, tmp_path / f"{name}.mp4")
        videos.append(iio.imread(tmp_path / f"{name}.mp4").astype(float))
    return videos[0].shape == videos[1].shape and abs(videos[0] - videos[1]).mean() < 0.5


def states(client, job_id: str) -> list[str]:
    return [e.state.detail for e in client.watch(job_id) if e.HasField("state")]


@pytest.mark.parametrize("strategy", ["exact", "clip_parallel", "block_pipeline"])
def test_killed_worker_job_resumes_and_makes_the_same_video(whole_farm, strategy):
    farm = whole_farm
    want = reference(farm, strategy, 2)
    with farm.client() as client:
        job = client.submit("a paper boat on a pond", strategy=strategy, num_workers=2, **JOB)
        job = wait_for_step(client, job.id, 7)
        victim = job.worker_ids[1]
        farm.workers[victim].kill()
        killed = time.time()
        job = run_to_end(client, job.id)
        assert job.state == pb.SUCCEEDED, job.error
        assert job.attempt == 2 and victim not in job.worker_ids
        resumed = min(e.time.ToNanoseconds() / 1e9 for e in client.watch(job.id)
                      if e.HasField("step") and e.step.attempt == 2)
        print(f"{strategy}: kill -9 to the resumed attempt's first step: {resumed - killed:.2f}s")
        placed = [d for d in states(client, job.id) if d.startswith("placed")]
        assert len(placed) == 2 and "attempt 2" in placed[1]
        assert "resuming at step" in placed[1], placed  # block_pipeline: at an iteration of its queue
        resumed_at = int(placed[1].split("resuming at step ")[1].split(",")[0])
        assert resumed_at >= 2
        if strategy != "block_pipeline":  # (its steps are per block)
            steps = [e.step for e in client.watch(job.id) if e.HasField("step") and e.step.attempt == 2]
            assert min(s.step for s in steps) == resumed_at + 1  # the steps done before were not run again
        assert (job.video_sha256, job.video_frames) == (want.video_sha256, want.video_frames)


def test_killed_worker_of_a_cfg_parallel_mesh_resumes_and_makes_the_same_video(whole_farm):
    """A kill inside a mesh: cfg 2 x 1, the unconditional branch's worker killed; the job resumes
    from the conditional branch's checkpoint on a new pair and makes the unfaulted video."""
    farm = whole_farm
    mesh = dict(JOB, cfg_parallel=True, guidance_scale=5.0)
    with farm.client() as client:
        want = run_to_end(client, client.submit("a paper boat on a pond", num_workers=2, **mesh).id)
        assert want.state == pb.SUCCEEDED, want.error
        job = wait_for_step(client, client.submit("a paper boat on a pond", num_workers=2, **mesh).id, 7)
        victim = job.worker_ids[1]  # rank 1: branch 1 of cfg 2 x 1
        farm.workers[victim].kill()
        job = run_to_end(client, job.id)
        assert job.state == pb.SUCCEEDED, job.error
        assert job.attempt == 2 and victim not in job.worker_ids
        placed = [d for d in states(client, job.id) if d.startswith("placed")]
        assert "cfg 2 x 1: asked" in placed[1] and "resuming at step" in placed[1], placed
        assert (job.video_sha256, job.video_frames) == (want.video_sha256, want.video_frames)


def test_killed_worker_job_resumes_re_split_over_fewer_workers(whole_farm, tmp_path):
    farm = whole_farm
    want = reference(farm, "exact", 3)
    with farm.client() as client:
        job = client.submit("a paper boat on a pond", strategy="exact", num_workers=0, **JOB)
        job = wait_for_step(client, job.id, 7)
        assert len(job.worker_ids) == 3
        farm.workers[job.worker_ids[0]].kill()  # rank 0: the one hosting the group's store
        job = run_to_end(client, job.id)
        assert job.state == pb.SUCCEEDED, job.error
        assert job.attempt == 2 and len(job.worker_ids) < 3
        assert same_video_decoded(client, job.id, want.id, tmp_path)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_survivors_of_a_lost_peer_are_idle_within_the_heartbeat_timeout(whole_farm, fault):
    """max_attempts 1: the job fails at once; the survivors left their collectives (a frozen
    peer never answers them) within heartbeat timeout + 5 s, not the 60 s collective timeout."""
    farm = whole_farm
    with farm.client() as client:
        job = client.submit("a paper boat on a pond", num_workers=3, max_attempts=1,
                            **{**JOB, "num_inference_steps": 200})
        job = wait_for_step(client, job.id, 3)
        victim = job.worker_ids[1]
        began = time.monotonic()
        farm.workers[victim].send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        survivors = set(job.worker_ids) - {victim}
        farm.wait_idle(client, survivors, timeout=HEARTBEAT_S + 5)
        print(f"{fault}: survivors idle {time.monotonic() - began:.1f}s after the fault")
        job = run_to_end(client, job.id)
        assert job.state == pb.FAILED and victim in job.error and "attempt 1 of 1" in job.error


def submit_long(client) -> pb.Job:
    """An 80-step job on 2 workers: long enough for a coordinator to die and come back in it."""
    return client.submit("a paper boat on a pond", strategy="exact", num_workers=2,
                         **{**JOB, "num_inference_steps": 80})


def test_coordinator_restart_keeps_the_running_job(whole_farm, tmp_path):
    farm = whole_farm
    want = reference(farm, "exact", 2, steps=80)
    with farm.client() as client:
        job = wait_for_step(client, submit_long(client).id, 5)
        farm.coordinator_proc.kill()
    restart_coordinator(farm)
    with farm.client() as client:
        job = run_to_end(client, job.id)
        assert job.state == pb.SUCCEEDED, job.error
        assert job.attempt == 1  # adopted, not re-queued
        events = list(client.watch(job.id))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))  # every event kept, in order
        details = [e.state.detail for e in events if e.HasField("state")]
        assert any(d.startswith("coordinator restarted; waiting") for d in details), details
        for worker in job.worker_ids:  # no step ran twice: each worker's steps only go up
            steps = [e.step.step for e in events if e.HasField("step") and e.step.worker_id == worker]
            assert steps == sorted(steps) and len(steps) == len(set(steps))
        assert job.video_frames == want.video_frames
        assert same_video_decoded(client, job.id, want.id, tmp_path)


def test_coordinator_and_a_worker_killed_at_once(whole_farm):
    farm = whole_farm
    want = reference(farm, "exact", 2, steps=80)
    with farm.client() as client:
        job = wait_for_step(client, submit_long(client).id, 7)
        farm.coordinator_proc.kill()
        victim = job.worker_ids[1]
        farm.workers[victim].kill()
    restart_coordinator(farm)
    with farm.client() as client:
        job = run_to_end(client, job.id)
        assert job.state == pb.SUCCEEDED, job.error
        assert job.attempt == 2 and victim not in job.worker_ids
        assert (job.video_sha256, job.video_frames) == (want.video_sha256, want.video_frames)


def test_backfill_and_a_cancelled_blocker(whole_farm):
    farm = whole_farm
    with farm.client() as client:
        with pytest.raises(grpc.RpcError) as refused:  # no registered set of workers could serve it
            client.submit("too big", num_workers=4, **{**JOB, "num_frames": 17})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "registered" in refused.value.details()
        busy = client.submit("long", num_workers=1, **{**JOB, "num_frames": 129, "height": 96, "width": 128,
                                                       "num_inference_steps": 200})  # outlasts the test: cancelled at its end
        wait_for_step(client, busy.id, 1)
        big = client.submit("big", num_workers=3, **JOB)
        small = client.submit("small", num_workers=2, **JOB)
        wait_until(lambda: client.get(small.id).state != pb.QUEUED, 1.5, "the small job backfilled", farm)
        assert client.get(big.id).state == pb.QUEUED
        assert run_to_end(client, small.id).state == pb.SUCCEEDED
        time.sleep(3.5)  # the big job has now waited past --backfill-wait: the idle workers are kept for it
        later = client.submit("later", num_workers=2, **JOB)
        time.sleep(1.5)
        assert client.get(later.id).state == pb.QUEUED
        client.cancel(big.id)  # the blocker goes: the job behind it is placed at once
        wait_until(lambda: client.get(later.id).state != pb.QUEUED, 1.5, "the job behind the blocker placed", farm)
        client.cancel(busy.id)
        assert run_to_end(client, later.id).state == pb.SUCCEEDED


def test_a_worker_restarted_under_its_name_takes_over(whole_farm):
    """The old process is frozen (its session attached until its heartbeats are missed) when a
    new one registers under its name: the new one takes over; the old one, thawed, is told
    ALREADY_EXISTS (its session replaced, or its registration older) and exits for good."""
    farm = whole_farm
    old = farm.workers["f2"]
    old.send_signal(signal.SIGSTOP)
    farm.procs.remove(old)
    attached_before = _attached_since(farm, "f2")
    farm.workers["f2"] = new = farm.worker("f2")
    with farm.client() as client:
        # whichever comes first, the new process's registration or the old session's heartbeat loss,
        # the thawed old process must not take the name back
        wait_until(lambda: _attached_since(farm, "f2") > attached_before and new.poll() is None and
                   any(w.id == "f2" and w.state == pb.IDLE for w in client.workers()), 120, "the new f2 attached",
                   farm)
        old.send_signal(signal.SIGCONT)
        old.wait(timeout=30)
        assert new.poll() is None
        job = run_to_end(client, client.submit("after the takeover", num_workers=3, **JOB).id)
        assert job.state == pb.SUCCEEDED and "f2" in job.worker_ids


def _attached_since(farm, name: str) -> int:
    log = (farm.tmp / "coordinator.log").read_text()
    return log.count(f"worker {name} attached")


@pytest.mark.slow
def test_chaos_random_kills_of_workers_and_the_coordinator(whole_farm, tmp_path):
    """Seeded rounds: a job, a kill of one of its workers or of the coordinator at a random
    step, the killed daemon started again. Every job ends SUCCEEDED with the reference video
    (decoded, as a coordinator restart may join two encodes) or FAILED only after max_attempts."""
    farm, rng, survived = whole_farm, random.Random(11), 0
    refs = {s: reference(farm, s, 2) for s in ("exact", "clip_parallel")}
    deadline = time.monotonic() + 240
    for round_ in range(5):
        if time.monotonic() > deadline:
            break
        strategy, step, target = rng.choice(sorted(refs)), rng.randint(2, 30), rng.choice(["worker", "coordinator"])
        with farm.client() as client:
            job = client.submit("a paper boat on a pond", strategy=strategy, num_workers=2, **JOB)
            try:
                job = wait_for_step(client, job.id, step)
            except AssertionError:
                continue
            if target == "worker":
                farm.workers[rng.choice(list(job.worker_ids))].kill()
            else:
                farm.coordinator_proc.kill()
        survived += 1
        if target == "coordinator":
            restart_coordinator(farm)
        with farm.client() as client:
            job = run_to_end(client, job.id)
            assert job.state == pb.SUCCEEDED or (job.state == pb.FAILED and "attempt 3 of 3" in job.error), job.error
            if job.state == pb.SUCCEEDED:
                assert same_video_decoded(client, job.id, refs[strategy].id, tmp_path)
        restore(farm)
        print(f"round {round_}: {strategy}, killed the {target} at step {step}: {pb.JobState.Name(job.state)}")
    print(f"faults survived: {survived}")
    assert survived >= 3


def test_a_name_follows_the_newest_process(tmp_path):
    """The registry's fencing, both orders: a newer process replaces an attached session (which
    then ends with ALREADY_EXISTS); an older process registering later is refused."""
    import asyncio

    from clipmesh.coordinator.errors import AlreadyExists
    from clipmesh.coordinator.store import Store
    from clipmesh.coordinator.workers import WorkerRegistry

    model = pb.ModelInfo(**presets.model_limits("tiny-wan"))  # a registration names a model the coordinator accepts

    async def scenario():
        registry = WorkerRegistry(Store(tmp_path / "db.sqlite"), heartbeat_timeout=3)
        old, replaced = registry.attach(pb.Register(worker_id="w", incarnation=100, model=model))
        assert replaced is None and registry.current(old)
        new, replaced = registry.attach(pb.Register(worker_id="w", incarnation=200, model=model))
        assert replaced is old and old.replaced and registry.current(new) and not registry.current(old)
        registry.detach("w", "no heartbeat")
        with pytest.raises(AlreadyExists, match="newer process"):
            registry.attach(pb.Register(worker_id="w", incarnation=100, model=model))  # the old one, back from a freeze
        again, _ = registry.attach(pb.Register(worker_id="w", incarnation=200, model=model))  # the same process re-dials
        assert registry.current(again)

    asyncio.run(scenario())


def test_a_refused_plan_fails_the_job_at_once_and_a_failed_one_is_retried(daemons):
    """A rank's error that would repeat (JOB_OUTCOME_REFUSED: a ValueError or NotImplementedError
    of its own, worker.daemon.outcome_of) fails the job at its first attempt; any other error
    fails the attempt, which is retried. Real coordinator, a worker speaking the real protocol."""
    from clipmesh.worker.daemon import outcome_of
    from fake_worker import FakeWorker

    assert outcome_of(ValueError("clips: do not tile"), False) == pb.JOB_OUTCOME_REFUSED
    assert outcome_of(NotImplementedError("a variant it cannot split"), False) == pb.JOB_OUTCOME_REFUSED
    assert outcome_of(RuntimeError("gloo: connection reset"), False) == pb.JOB_OUTCOME_FAILED
    assert outcome_of(ValueError("after a cancel"), True) == pb.JOB_OUTCOME_FAILED_AFTER_CANCEL

    daemons.coordinator()
    worker = FakeWorker(daemons.address, "w0")
    small = dict(num_frames=9, height=32, width=48, num_inference_steps=2, num_workers=1, max_attempts=3)
    with daemons.client() as client:
        refused = client.submit("refused", **small)
        worker.expect("assignment")
        worker.send(result=pb.JobResult(job_id=refused.id, outcome=pb.JOB_OUTCOME_REFUSED,
                                        error="NotImplementedError: no such variant"))
        wait_until(lambda: client.get(refused.id).state == pb.FAILED, 30, "the refused job failed", daemons)
        job = client.get(refused.id)
        assert "attempt 1 of 3" in job.error and "not retried" in job.error and job.attempt == 1

        failed = client.submit("failed once", **small)
        worker.expect("assignment")
        worker.send(result=pb.JobResult(job_id=failed.id, outcome=pb.JOB_OUTCOME_FAILED, error="RuntimeError: x"))
        assignment = worker.expect("assignment")  # the retry, after its backoff
        assert assignment.job_id == failed.id and assignment.attempt == 2
        client.cancel(failed.id)
    worker.close()
