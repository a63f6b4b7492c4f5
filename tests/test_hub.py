"""The progress hub holds the jobs being watched, not every job it has seen: 1,000 jobs
through a real coordinator core (real SQLite), each watched to its end."""

from __future__ import annotations

import asyncio

from clipmesh.v1 import clipmesh_pb2 as pb

REQUEST = dict(num_frames=17, height=64, width=64, num_inference_steps=2, guidance_scale=1.0, fps=8, model="tiny-wan")


def test_the_hub_is_bounded_by_the_live_watchers(tmp_path):
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
            sizes.append(len(hub))
            for job in jobs:
                await core.cancel(job.id)
            events = await asyncio.gather(*watchers)
            assert all(e[-1].state.state == pb.CANCELLED for e in events)
        after = len(hub)
        core.store.close()
        return sizes, after

    sizes, after = asyncio.run(scenario())
    assert sizes == [10] * 100  # while watched: one entry per live job
    assert after == 0  # after: none (the old hub kept an entry per job it had seen: 1,000)
