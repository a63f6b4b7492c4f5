"""The coordinator core, in process (real SQLite): the progress hub holds the jobs being
watched, not every job it has seen; and who may see a job is decided by the core itself."""

from __future__ import annotations

import asyncio

from clipmesh.v1 import clipmesh_pb2 as pb

REQUEST = dict(num_frames=17, height=64, width=64, num_inference_steps=2, guidance_scale=1.0, fps=8, model="tiny-wan")


def test_the_hub_is_bounded_by_the_live_watchers(tmp_path):
    """And so is what Jobs holds of a job in memory (its book): dropped once the job is over and
    unwatched."""
    from clipmesh.coordinator.core import CoordinatorCore

    async def scenario():
        core = CoordinatorCore(tmp_path)
        hub, sizes = core.jobs.hub, []

        async def follow(job_id):
            return [event async for event in core.watch(job_id)]

        for batch in range(100):  # 10 live watchers at a time
            jobs = [await core.submit(pb.SubmitJobRequest(prompt=f"job {batch}.{i}", **REQUEST)) for i in range(10)]
            watchers = [asyncio.create_task(follow(job.id)) for job in jobs]
            while len(hub) < len(jobs):  # every watcher has replayed and waits for news
                await asyncio.sleep(0.001)
            sizes.append((len(hub), len(core.jobs)))
            for job in jobs:
                await core.cancel(job.id)
            events = await asyncio.gather(*watchers)
            assert all(e[-1].state.state == pb.CANCELLED for e in events)
        after = len(hub), len(core.jobs)
        core.store.close()
        return sizes, after

    sizes, after = asyncio.run(scenario())
    assert sizes == [(10, 10)] * 100  # while watched: one entry per live job
    assert after == (0, 0)  # after: none (the old hub kept an entry per job it had seen: 1,000)


def test_the_core_decides_who_sees_a_job(tmp_path):
    """Access is the core's, for every transport: a client's call on another client's job is
    refused by the core itself (gRPC and HTTP only name the caller)."""
    import pytest

    from clipmesh.coordinator.access import Caller
    from clipmesh.coordinator.core import CoordinatorCore
    from clipmesh.coordinator.errors import PermissionDenied

    async def scenario():
        core = CoordinatorCore(tmp_path)
        alice, bob, admin = Caller("client", "alice"), Caller("client", "bob"), Caller("admin", "ops")
        job = await core.submit(pb.SubmitJobRequest(prompt="alice's", **REQUEST), owner="alice")
        assert core.get_job(job.id, alice).id == core.get_job(job.id, admin).id == job.id
        assert [j.id for j in core.list_jobs(10, alice)] == [job.id] and core.list_jobs(10, bob) == []
        for refused in (lambda: core.get_job(job.id, bob), lambda: core.watch(job.id, bob),
                        lambda: core.video_path(job.id, bob)):
            with pytest.raises(PermissionDenied):
                refused()
        for refused in (core.cancel(job.id, bob), core.delete(job.id, bob)):
            with pytest.raises(PermissionDenied):
                await refused
        assert core.get_job(job.id).state == pb.QUEUED  # nothing bob asked for happened
        assert (await core.cancel(job.id, alice)).state == pb.CANCELLED
        core.store.close()

    asyncio.run(scenario())
