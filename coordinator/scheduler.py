"""Placement: which queued job runs next, and on which idle workers.

FIFO per model: a job that cannot be placed yet blocks the later jobs of its model (so a
big job never starves), not the jobs of other models. Kept apart from jobs.py and
workers.py because it is the one policy that reads both; a new policy replaces this file.
The render plan itself comes from planner.py.
"""

from __future__ import annotations

from clipmesh.v1 import clipmesh_pb2 as pb

from .jobs import Jobs
from .planner import make_plan, workers_wanted
from .workers import WorkerRegistry


class Scheduler:
    def __init__(self, jobs: Jobs, workers: WorkerRegistry, collective_timeout: int):
        self.jobs = jobs
        self.workers = workers
        self.collective_timeout = collective_timeout

    async def schedule(self) -> None:
        """Places queued jobs FIFO. A job that cannot be placed blocks later jobs of the same
        model (no starvation), not jobs of other models."""
        blocked: set[str] = set()
        for job in self.jobs.store.jobs_in_state(pb.QUEUED):
            req = job.request
            if req.model in blocked:
                continue
            idle = self.workers.idle_for(req.model)
            model = self.workers.model_info(req.model)
            wanted = workers_wanted(req, model, len(idle))
            if wanted == 0 or len(idle) < wanted:
                blocked.add(req.model)
                continue
            await self._place(job, idle[:wanted], model)

    async def _place(self, job: pb.Job, members: list[str], model: pb.ModelInfo) -> None:
        plan = make_plan(job, self.workers.infos(members), model, self.collective_timeout)
        await self.jobs.start(job, plan, members)
        self.workers.assign(job.id, plan, members)
