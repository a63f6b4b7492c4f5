"""Placement: which queued job runs next, and on which idle workers.

FIFO per model with backfill: a job that cannot be placed yet (it wants more workers than
are idle) does not hold back later jobs of its model that fit the idle workers, so workers
do not sit IDLE behind it; but once it has waited `backfill_wait_s`, its model's later jobs
wait too, so the idle workers gather for it and a big job is never starved. Jobs of other
models are never held back. A retry waits out its backoff (jobs.py). Kept apart from
jobs.py and workers.py because it is the one policy that reads both; a new policy replaces
this file. The render plan itself comes from planner.py.
"""

from __future__ import annotations

import asyncio
import time

from clipmesh.v1 import clipmesh_pb2 as pb

from .jobs import Jobs
from .planner import make_plan, workers_wanted
from .workers import WorkerRegistry

BACKFILL_WAIT_S = 30.0  # default: how long a job that does not fit lets later jobs pass it


class Scheduler:
    def __init__(self, jobs: Jobs, workers: WorkerRegistry, collective_timeout: int,
                 backfill_wait_s: float = BACKFILL_WAIT_S):
        self.jobs = jobs
        self.workers = workers
        self.collective_timeout = collective_timeout
        self.backfill_wait_s = backfill_wait_s  # 0: plain FIFO per model
        # one pass at a time: placing awaits, and a second pass must not see the first's workers idle
        self._lock = asyncio.Lock()

    async def schedule(self) -> None:
        """Places what fits, oldest first (see the module's docstring for the policy)."""
        async with self._lock:
            await self._schedule()

    async def _schedule(self) -> None:
        # A pass runs on every result, attach and submit: with every worker busy it reads nothing,
        # and it stops reading the queue once no idle worker is left (2000 queued jobs: bench_load).
        idle = self.workers.idle_by_model()
        now = time.monotonic()
        reserved: set[str] = set()  # models whose idle workers are kept for a starving job
        for job in self.jobs.queued() if idle else ():
            req = job.request
            if req.model in reserved or self.jobs.backing_off(job.id, now):
                continue
            free = idle.get(req.model, [])
            if req.loras:  # only workers holding its LoRA files
                free = self.workers.holding(free, req.loras)
            model = self.workers.model_info(req.model)
            wanted = workers_wanted(req, model, len(free))
            if wanted == 0 or len(free) < wanted:
                if self.jobs.waited(job.id, now) >= self.backfill_wait_s:
                    reserved.add(req.model)
                continue
            placed = free[:wanted]
            await self._place(job, placed, model)
            idle[req.model] = [w for w in idle[req.model] if w not in placed]
            if not any(idle.values()):
                break

    async def _place(self, job: pb.Job, members: list[str], model: pb.ModelInfo) -> None:
        plan = make_plan(job, self.workers.infos(members), model, self.collective_timeout)
        await self.jobs.start(job, plan, members)
        self.workers.assign(job.id, plan, members)
