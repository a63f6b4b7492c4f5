"""Job lifecycle: submit, get, list, watch, cancel, and how a placed job ends.

A job is QUEUED until scheduler.py places it; from then until every member has
reported (or was lost) it has an ActiveJob here, with the video being written. Every
state change and event goes through `set_state`/`emit`, so the store's event log and
the WatchJob streams (woken by the hub) always agree. `end` is the one place a
placed job gets its final state and its video closed, whoever ends it (a cancel, a
failure, the last member's result).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import FailedPrecondition, NotFound
from .hub import ProgressHub
from .stitcher import VideoWriter
from .store import FINAL_STATES, Store, now_ts
from .validate import validate_request
from .workers import WorkerRegistry

log = logging.getLogger("clipmesh.coordinator")

STATE_NAMES = {v: k for k, v in pb.JobState.items()}

# A member's outcome that does not fail the job: done, or stopped once the job had ended anyway.
_NOT_A_FAILURE = (pb.JOB_OUTCOME_DONE, pb.JOB_OUTCOME_CANCELLED, pb.JOB_OUTCOME_FAILED_AFTER_CANCEL)


def shielded(method):
    """Runs a transition to its end even if its caller is cancelled: ending a job awaits video
    threads, and a worker's closing stream cancels the task that reads it mid-message."""
    @functools.wraps(method)
    async def run(*args, **kwargs):
        return await asyncio.shield(method(*args, **kwargs))
    return run


@dataclass
class ActiveJob:
    """Book-keeping of a placed job until every member reported its result."""

    plan: pb.RenderPlan
    members: list[str]                          # worker ids in rank order
    pending: set[str]                           # members that have not reported yet
    video: VideoWriter                          # written while the job runs
    # One video call at a time; the job ends under it, so a part is either in the video or refused.
    video_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Jobs:
    def __init__(self, store: Store, data_dir: Path, workers: WorkerRegistry):
        self.store = store
        self.data_dir = data_dir
        self.workers = workers  # to tell a job's members to stop, and which models exist
        self.hub = ProgressHub()
        self.active: dict[str, ActiveJob] = {}

    def recover(self) -> None:
        """After a restart nothing can still be running: a RUNNING job is queued again."""
        for job in self.store.jobs_in_state(pb.RUNNING):
            job.state = pb.QUEUED
            del job.worker_ids[:]
            job.ClearField("started_at")
            self.store.save_job(job)
            self.store.append_event(pb.JobEvent(job_id=job.id, state=pb.StateChange(
                state=pb.QUEUED, detail="coordinator restarted; job re-queued")))

    def scratch_dir(self, job_id: str) -> Path:
        """Where a job's uploaded parts wait for the video; removed when the job is over."""
        return self.data_dir / "jobs" / job_id

    # -- events -------------------------------------------------------------
    async def emit(self, job_id: str, **kind) -> None:
        self.store.append_event(pb.JobEvent(job_id=job_id, **kind))
        await self.hub.notify(job_id)

    async def set_state(self, job: pb.Job, state: int, detail: str = "", error: str = "") -> None:
        job.state = state
        if error:
            job.error = error
        if state == pb.RUNNING:
            job.started_at.CopyFrom(now_ts())
        if state in FINAL_STATES:
            job.finished_at.CopyFrom(now_ts())
        self.store.save_job(job)
        await self.emit(job.id, state=pb.StateChange(state=state, detail=detail or error))

    # -- client API ---------------------------------------------------------
    async def submit(self, req: pb.SubmitJobRequest) -> pb.Job:
        validate_request(req, self.workers.model_info(req.model), self.workers.known_models())
        job = self.store.create_job(req)
        await self.emit(job.id, state=pb.StateChange(state=pb.QUEUED, detail="accepted"))
        log.info("job %s queued: %d frames %dx%d, %d steps", job.id, req.num_frames, req.width, req.height,
                 req.num_inference_steps)
        return job

    def get(self, job_id: str) -> pb.Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def list(self, limit: int) -> list[pb.Job]:
        return self.store.list_jobs(limit if limit > 0 else 100)

    async def watch(self, job_id: str) -> AsyncIterator[pb.JobEvent]:
        """Replays the job's events, then follows live; ends once the job is final."""
        self.get(job_id)
        seq = 0
        while True:
            for event in self.store.events_after(job_id, seq):
                seq = event.seq
                yield event
            if self.get(job_id).state in FINAL_STATES and not self.store.events_after(job_id, seq):
                return
            await self.hub.wait(job_id, timeout=1.0)

    def already_ended(self, job_id: str) -> FailedPrecondition:
        """The refusal of anything that needs the job still going."""
        return FailedPrecondition(f"job {job_id} is already {STATE_NAMES[self.get(job_id).state]}")

    @shielded
    async def cancel(self, job_id: str) -> pb.Job:
        job = self.get(job_id)
        if job.state in FINAL_STATES:
            raise self.already_ended(job_id)
        if job_id not in self.active:
            await self.set_state(job, pb.CANCELLED, detail="cancelled by client")
            return job
        self._stop_members(job_id)
        if not await self.end(job_id, pb.CANCELLED, detail="cancelled by client"):
            raise self.already_ended(job_id)
        return self.get(job_id)

    def video_path(self, job_id: str) -> Path:
        """Any job with a finished video: a cancelled or failed one keeps the frames finished before."""
        job = self.get(job_id)
        if not job.video_size:
            raise FailedPrecondition(f"job {job_id} is {STATE_NAMES[job.state]} without a video; one exists once "
                                     "SUCCEEDED, or once stopped after frames were finished")
        return self._video_file(job_id)

    def _video_file(self, job_id: str) -> Path:
        return self.data_dir / "videos" / f"{job_id}.mp4"

    # -- a placed job ---------------------------------------------------------
    async def start(self, job: pb.Job, plan: pb.RenderPlan, members: list[str]) -> None:
        """The job is placed on `members` (rank order): RUNNING, with its video open."""
        video = VideoWriter(self._video_file(job.id), job.request.fps)
        self.active[job.id] = ActiveJob(plan=plan, members=members, pending=set(members), video=video)
        job.strategy = plan.strategy
        job.worker_ids[:] = members
        await self.set_state(job, pb.RUNNING, detail=f"placed on {', '.join(members)} ({plan.strategy})")

    def is_member(self, worker_id: str, job_id: str) -> bool:
        return job_id in self.active and worker_id in self.active[job_id].members

    async def member_reported(self, worker_id: str, result: pb.JobResult) -> bool:
        """A member's result: a failure fails the job. True when that finished the job."""
        active = self.active.get(result.job_id)
        if active is None or worker_id not in active.pending:
            return False  # a late or repeated result
        error = "" if result.outcome in _NOT_A_FAILURE else f"worker {worker_id}: {result.error}"
        return await self.member_left(result.job_id, worker_id, error)

    async def member_left(self, job_id: str, worker_id: str, error: str = "") -> bool:
        """A member is out of the job (reported, or lost): `error` fails the job, and the last
        member out finishes it. True when the job finished."""
        active = self.active.get(job_id)
        if active is None:
            return False
        active.pending.discard(worker_id)
        if error:
            await self.fail(job_id, error)
        return await self._finish_if_done(job_id)

    async def _finish_if_done(self, job_id: str) -> bool:
        active = self.active.get(job_id)
        if active is None or active.pending:
            return False
        await self.end(job_id, pb.SUCCEEDED)  # a cancelled or failed job has ended already
        self.active.pop(job_id, None)
        shutil.rmtree(self.scratch_dir(job_id), ignore_errors=True)
        return True

    async def fail(self, job_id: str, error: str) -> None:
        """Tells the members to stop and marks the job FAILED (first error wins)."""
        self._stop_members(job_id)
        await self.end(job_id, pb.FAILED, error=error)

    def _stop_members(self, job_id: str) -> None:
        active = self.active.get(job_id)
        self.workers.cancel(job_id, active.pending if active else ())

    async def end(self, job_id: str, state: int, detail: str = "", error: str = "") -> bool:
        """Closes a placed job's video and sets its final state, once: False if the job had ended.
        Success needs every frame (a bounded job) or an unbroken run of them; a job that ends
        otherwise keeps the frames finished so far as a playable video."""
        active = self.active.get(job_id)
        if active is None:
            return False
        async with active.video_lock:
            job = self.get(job_id)
            if job.state in FINAL_STATES:
                return False
            video = active.video
            if state == pb.SUCCEEDED:
                missing = video.missing(job.request.num_frames)
                if missing or not video.frames_written:
                    state, error = pb.FAILED, missing or "no frames received"
            outcome = ""
            if video.frames_written:
                try:
                    size, sha = await asyncio.to_thread(video.finish)
                except Exception as exc:  # an encoding failure fails the job, never the coordinator
                    log.exception("job %s: finishing the video failed", job_id)
                    state = pb.FAILED if state == pb.SUCCEEDED else state
                    error = error or f"video encoding failed: {exc}"
                else:
                    job.video_size, job.video_sha256, job.video_frames = size, sha, video.frames_written
                    outcome = (f"video {size} bytes, {video.frames_written} frames" if state == pb.SUCCEEDED
                               else f"kept {video.frames_written} frames")
            else:
                await asyncio.to_thread(video.abort)
            await self.set_state(job, state, detail="; ".join(filter(None, (detail or error, outcome))), error=error)
            return True
