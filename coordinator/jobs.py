"""Job lifecycle: submit, get, list, watch, cancel, and how a placed job ends.

A job is QUEUED until scheduler.py places it; from then until every member has
reported (or was lost) it has an ActiveJob here, with the video being written. Every
state change and event goes through `set_state`/`emit`, so the store's event log and
the WatchJob streams (woken by the hub) always agree. `end` is the one place a
placed job gets its final state and its video closed, whoever ends it (a cancel, a
failure, the last member's result).

Faults: a placement is an attempt (numbered from 1; the number is in the group name and
in every message of it, so a late message of an old attempt is dropped). A member lost or
failed ends the attempt, not the job: the members left are told to abort, and the job is
queued again (after a short backoff) to resume from its last complete checkpoint on
whatever workers are idle, with its video kept, until `max_attempts` (clipmesh.faults).
After a coordinator restart a RUNNING job waits for its members to re-attach and is
adopted; the members that do not come back within the grace are lost as above.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from clipmesh import faults, specs
from clipmesh.v1 import clipmesh_pb2 as pb

from .checkpoints import Checkpoints
from .errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from . import metrics
from .limits import Limits
from .hub import ProgressHub
from .stitcher import FramePart, VideoWriter
from .store import FINAL_STATES, Store, now_ts
from .validate import validate_request
from .workers import WorkerRegistry

log = logging.getLogger("clipmesh.coordinator")

STATE_NAMES = {v: k for k, v in pb.JobState.items()}

# A member's outcome that does not fail the attempt: done, or stopped once the job had ended anyway.
# (ABORTED does: a rank that finds a peer gone before the coordinator does ends the attempt.)
_NOT_A_FAILURE = (pb.JOB_OUTCOME_DONE, pb.JOB_OUTCOME_CANCELLED, pb.JOB_OUTCOME_FAILED_AFTER_CANCEL)
RETRY_BACKOFF_S = 1.0  # before attempt n + 1: this * 2**(n - 1) seconds


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
    # After a coordinator restart: the members not back by `adopt_by` (monotonic) are lost.
    adopted: set[str] = field(default_factory=set)
    adopt_by: float | None = None
    delete_when_over: bool = False              # DeleteJob came while members were still stopping
    latest_frame: tuple[int, bytes] | None = None  # (index, RGB24 bytes) of the newest frame received

    @property
    def attempt(self) -> int:
        return self.plan.attempt


@dataclass
class JobBook:
    """What the coordinator holds of a job in memory beside its store row, from its submit until
    it is over and unwatched: one record, so nothing of a job outlives it in a dict of its own."""

    queued_since: float = 0.0                   # monotonic time it was (re)queued
    not_before: float = 0.0                     # a retry in its backoff is not placed before this
    kept_video: VideoWriter | None = None       # of a job queued again after a fault
    active: ActiveJob | None = None             # its placed attempt
    step_fraction: dict[str, float] = field(default_factory=dict)  # member -> its last step / total
    watchers: int = 0                           # WatchJob streams open on it


class Jobs:
    def __init__(self, store: Store, data_dir: Path, workers: WorkerRegistry, checkpoints: Checkpoints,
                 limits: Limits = Limits()):
        self.limits = limits
        self.store = store
        self.data_dir = data_dir
        self.workers = workers  # to tell a job's members to stop, and which models exist
        self.checkpoints = checkpoints
        self.hub = ProgressHub()
        self._books: dict[str, JobBook] = {}

    def _book(self, job_id: str) -> JobBook:
        return self._books.setdefault(job_id, JobBook(queued_since=time.monotonic()))

    def __len__(self) -> int:
        """How many jobs the coordinator holds in memory: queued, running, or watched."""
        return len(self._books)

    def running(self, job_id: str) -> ActiveJob | None:
        """The job's placed attempt, if one is running."""
        book = self._books.get(job_id)
        return book.active if book else None

    def _running(self) -> list[tuple[str, ActiveJob]]:
        return [(job_id, book.active) for job_id, book in self._books.items() if book.active is not None]

    # -- what the scheduler asks of a queued job -------------------------------------
    def queued(self) -> list[pb.Job]:
        """The queued jobs, oldest first."""
        return self.store.queued_jobs()

    def backing_off(self, job_id: str, now: float) -> bool:
        """A retry still in its backoff after a fault: not to be placed yet."""
        return self._book(job_id).not_before > now

    def waited(self, job_id: str, now: float) -> float:
        """Seconds the job has been queued (since its submit, or its last re-queue)."""
        return now - self._book(job_id).queued_since

    def recover(self, grace_s: float) -> None:
        """After a restart: a RUNNING job's members may still be rendering it; it waits `grace_s`
        for them to re-attach (adopt), with its video as far as it was encoded."""
        for job in self.store.jobs_in_state(pb.RUNNING):
            last = self.store.last_attempt(job.id)
            if last is None or last[0].attempt != job.attempt:
                self._queue_again(job, "coordinator restarted; job re-queued")
                continue
            plan, members = last
            video = self._recovered_video(job)
            self._book(job.id).active = ActiveJob(plan=plan, members=members, pending=set(members), video=video,
                                                  adopt_by=time.monotonic() + grace_s)
            self.store.append_event(pb.JobEvent(job_id=job.id, state=pb.StateChange(
                state=pb.RUNNING, detail=f"coordinator restarted; waiting {grace_s:g}s for {', '.join(members)} "
                                         f"to re-attach with attempt {plan.attempt}")))

    def _recovered_video(self, job: pb.Job) -> VideoWriter:
        """The video as the dead coordinator left it, with the parts it held (waiting for a gap)."""
        video = VideoWriter.resume(self._video_file(job.id), job.request.fps)
        req = job.request
        for path in sorted(self.scratch_dir(job.id).glob("frames-*.rgb")):
            first, frames = int(path.name.split("-")[1]), path.stat().st_size // (req.height * req.width * 3)
            try:
                video.add(FramePart(first, frames, req.height, req.width, path))
            except (ValueError, RuntimeError):  # already encoded before the restart, or unusable
                path.unlink(missing_ok=True)
        return video

    async def _video_on_disk(self, job: pb.Job) -> VideoWriter:
        """A retried job's video after a coordinator restart: what the dead one's ffmpeg closed."""
        return await asyncio.to_thread(VideoWriter.resume, self._video_file(job.id), job.request.fps)

    def _queue_again(self, job: pb.Job, detail: str) -> None:
        job.state = pb.QUEUED
        del job.worker_ids[:]
        job.ClearField("started_at")
        self.store.change_state(job, pb.JobEvent(job_id=job.id, state=pb.StateChange(state=pb.QUEUED, detail=detail)))
        self._book(job.id).queued_since = time.monotonic()

    def scratch_dir(self, job_id: str) -> Path:
        """Where a job's uploaded parts wait for the video; removed when the job is over."""
        return self.data_dir / "jobs" / job_id

    # -- events -------------------------------------------------------------
    async def emit(self, job_id: str, **kind) -> None:
        self.store.append_event(pb.JobEvent(job_id=job_id, **kind))
        await self._emitted(job_id, kind)

    async def _emitted(self, job_id: str, kind: dict) -> None:
        """What follows an event in the store: metrics, progress, the watchers woken."""
        active = self.running(job_id)
        if "step" in kind and active is not None:
            metrics.step(kind["step"], active.plan)
            if kind["step"].total_steps > 0:
                self._books[job_id].step_fraction[kind["step"].worker_id] = kind["step"].step / kind["step"].total_steps
        if "frames" in kind:
            metrics.FRAMES_ENCODED.inc(kind["frames"].num_frames)
        await self.hub.notify(job_id)

    def progress(self, job: pb.Job) -> float:
        """0..1 from real events: a running job's mean over its members of the last step each
        reported; under block_pipeline (or endless), the share of the video's frames received."""
        if job.state == pb.SUCCEEDED:
            return 1.0
        active = self.running(job.id)
        if active is None:
            return 0.0
        if specs.work_of(active.plan) == specs.QUEUE:  # its blocks finish in order, each at its own step
            frames = active.video.frames_written if active.video else 0
            return min(frames / job.request.num_frames, 1.0) if job.request.num_frames else 0.0
        steps = self._books[job.id].step_fraction
        return sum(steps.get(m, 0.0) for m in active.members) / max(len(active.members), 1)

    def frames_received(self, job: pb.Job) -> int:
        """Frames in the job's video so far: while it runs, those encoded (a block_pipeline or
        endless job's grow block by block; a frames strategy's land at the end); then its video's."""
        active = self.running(job.id)
        return active.video.frames_written if active is not None and active.video else job.video_frames

    async def set_state(self, job: pb.Job, state: int, detail: str = "", error: str = "") -> None:
        job.state = state
        if error:
            job.error = error
        if state == pb.RUNNING:
            job.started_at.CopyFrom(now_ts())
        if state in FINAL_STATES:
            job.finished_at.CopyFrom(now_ts())
            metrics.job_ended(job)
        change = pb.StateChange(state=state, detail=detail or error)
        self.store.change_state(job, pb.JobEvent(job_id=job.id, state=change))
        await self._emitted(job.id, dict(state=change))

    # -- client API ---------------------------------------------------------
    async def submit(self, req: pb.SubmitJobRequest, owner: str = "") -> pb.Job:
        validate_request(req, self.workers.model_info(req.model), self.workers.known_models())
        registered = self.workers.registered_for(req.model)
        if registered and req.num_workers > registered:
            raise InvalidArgument("num_workers", f"must be at most {registered}: only {registered} workers are "
                                                 f"registered for {req.model}, so {req.num_workers} could never run it")
        if req.loras and registered:  # (before any worker came, as for num_workers: what comes may hold it)
            held = self.workers.loras_for(req.model)
            missing = next((ref.name for ref in req.loras if ref.name not in held), None)
            if missing is not None:
                raise InvalidArgument("loras", f"{missing!r} is held by no worker serving {req.model} (held: "
                                               f"{', '.join(sorted(held)) or 'none'}; a worker's --lora-dir)")
        if self.store.count_jobs(pb.QUEUED) >= self.limits.max_queued_jobs:
            raise ResourceExhausted(f"the queue holds {self.limits.max_queued_jobs} jobs, the most it takes; "
                                    "submit again once some have run")
        job = self.store.create_job(req, owner)
        self._book(job.id)
        await self.hub.notify(job.id)
        log.info("job %s queued: %d frames %dx%d, %d steps", job.id, req.num_frames, req.width, req.height,
                 req.num_inference_steps)
        return job

    def get(self, job_id: str) -> pb.Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def list(self, limit: int, owner: str | None = None) -> list[pb.Job]:
        return self.store.list_jobs(limit if limit > 0 else 100, owner)

    async def watch(self, job_id: str) -> AsyncIterator[pb.JobEvent]:
        """Replays the job's events, then follows live; ends once the job is final."""
        self.get(job_id)
        book = self._book(job_id)
        if book.watchers >= self.limits.max_watchers_per_job:
            raise ResourceExhausted(f"job {job_id} has {self.limits.max_watchers_per_job} watchers, the most it takes")
        book.watchers += 1
        try:
            seq = 0
            while True:
                for event in self.store.events_after(job_id, seq):
                    seq = event.seq
                    yield event
                if self.get(job_id).state in FINAL_STATES and not self.store.events_after(job_id, seq):
                    return
                await self.hub.wait(job_id, timeout=1.0)
        finally:
            book.watchers -= 1
            self._drop_if_over(job_id)

    def already_ended(self, job_id: str) -> FailedPrecondition:
        """The refusal of anything that needs the job still going."""
        return FailedPrecondition(f"job {job_id} is already {STATE_NAMES[self.get(job_id).state]}")

    @shielded
    async def cancel(self, job_id: str) -> pb.Job:
        job = self.get(job_id)
        if job.state in FINAL_STATES:
            raise self.already_ended(job_id)
        book = self._book(job_id)
        if book.active is None:  # queued (maybe between attempts, with frames kept)
            kept, book.kept_video = book.kept_video, None
            kept = kept or (await self._video_on_disk(job) if job.attempt else None)
            if kept is not None and kept.frames_written:
                book.active = ActiveJob(plan=pb.RenderPlan(request=job.request), members=[], pending=set(), video=kept)
                await self.end(job_id, pb.CANCELLED, detail="cancelled by client")
                book.active = None
            else:
                await self.set_state(job, pb.CANCELLED, detail="cancelled by client")
            self._forget(job_id)
            return self.get(job_id)
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
        """Attempt plan.attempt of the job is placed on `members` (rank order): RUNNING, with its
        video open (kept from the attempt before, if any), resuming from its last checkpoint."""
        book = self._book(job.id)
        video, book.kept_video = book.kept_video, None
        video = video or (
            await self._video_on_disk(job) if job.attempt else VideoWriter(self._video_file(job.id), job.request.fps))
        checkpoint = self.checkpoints.latest(job.id, specs.checkpoint_frames(plan)) if plan.checkpoint_every else None
        if checkpoint is not None:
            if specs.work_of(plan) == specs.CLIPS:  # a queue holds each block's own step
                plan.start_step = checkpoint.step
            plan.resume.CopyFrom(checkpoint)
        plan.frames_in_video = video.frames_written
        self.store.save_attempt(job.id, plan, members)
        book.active = ActiveJob(plan=plan, members=members, pending=set(members), video=video)
        book.not_before = 0.0
        job.strategy, job.attempt = plan.strategy, plan.attempt
        job.worker_ids[:] = members
        resumed = f", resuming at step {plan.resume.step}" if plan.HasField("resume") else ""
        kept = f", {video.frames_written} frames kept" if video.frames_written else ""
        mesh = f"; {plan.parallel.why}" if plan.parallel.why else ""
        await self.set_state(job, pb.RUNNING, detail=f"placed on {', '.join(members)} ({plan.strategy}{mesh}), "
                                                     f"attempt {plan.attempt}{resumed}{kept}")

    def member_of(self, session, job_id: str, worker_id: str, attempt: int) -> ActiveJob:
        """The running attempt of the job, if the session's worker is its member: a call on a
        job (upload, checkpoint) is refused unless it comes from that member's own session."""
        if worker_id != session.info.id:
            raise PermissionDenied(f"worker_id {worker_id!r}: this session is worker {session.info.id!r}'s")
        active = self.running(job_id)
        if active is not None and (worker_id not in active.members or session.info.current_job_id != job_id):
            raise PermissionDenied(f"job {job_id!r} is not assigned to worker {worker_id!r} (this session)")
        if active is None or active.attempt != attempt:  # over, or an attempt before: a member's late call
            raise FailedPrecondition(f"attempt {attempt} of job {job_id!r} is not running on worker {worker_id!r}")
        return active

    def is_member(self, worker_id: str, job_id: str) -> bool:
        active = self.running(job_id)
        return active is not None and worker_id in active.members

    def is_current(self, job_id: str, attempt: int) -> bool:
        active = self.running(job_id)
        return active is not None and active.attempt == attempt

    def adopt(self, running: pb.RunningJob, worker_id: str) -> bool:
        """A worker re-attached while rendering `running`: True if that is the job's current
        attempt and the worker its member at that rank (it goes on as before)."""
        active = self.running(running.job_id)
        if (active is None or active.attempt != running.attempt or worker_id not in active.pending
                or active.members[running.rank] != worker_id):
            return False
        active.adopted.add(worker_id)
        return True

    def not_adopted(self) -> list[tuple[str, str]]:
        """(job, member) of recovered jobs whose grace is over and whose member did not come back."""
        now, out = time.monotonic(), []
        for job_id, active in self._running():
            if active.adopt_by is not None and now > active.adopt_by:
                active.adopt_by = None
                out += [(job_id, m) for m in sorted(active.pending - active.adopted)]
        return out

    async def member_reported(self, worker_id: str, result: pb.JobResult) -> bool:
        """A member's result: a failure fails the attempt. True when that finished the job."""
        active = self.running(result.job_id)
        if active is None or worker_id not in active.pending or result.attempt != active.attempt:
            return False  # a late or repeated result, or one of an older attempt
        error = "" if result.outcome in _NOT_A_FAILURE else f"worker {worker_id}: {result.error}"
        # a refusal would fail again on any retry
        return await self.member_left(result.job_id, worker_id, error, retry=result.outcome != pb.JOB_OUTCOME_REFUSED)

    async def member_left(self, job_id: str, worker_id: str, error: str = "", retry: bool = True) -> bool:
        """A member is out of the job (reported, or lost): `error` ends the attempt (the job is
        retried, or FAILED after its last attempt), and the last member out finishes it. True
        when the job finished or was queued again."""
        active = self.running(job_id)
        if active is None:
            return False
        active.pending.discard(worker_id)
        if error:
            return await self.fault(job_id, error, retry)
        return await self._finish_if_done(job_id)

    async def fault(self, job_id: str, error: str, retry: bool = True) -> bool:
        """A member of the running attempt was lost or failed: the others abort; the job is queued
        again unless this was its last attempt or `retry` is off (then it FAILS, first error wins)."""
        active, job = self.running(job_id), self.get(job_id)
        if active is None or job.state in FINAL_STATES:
            return await self._finish_if_done(job_id)
        self.workers.cancel(job_id, active.pending, active.attempt, abort=True)
        limit = faults.max_attempts(job.request)
        if active.attempt >= limit or not retry:
            why = "" if retry else "; not retried: the plan or the model is refused, a retry would fail the same way"
            await self.end(job_id, pb.FAILED, error=f"{error} (attempt {active.attempt} of {limit}{why})")
            return await self._finish_if_done(job_id)
        book = self._books[job_id]
        book.active = None
        async with active.video_lock:  # (an upload of this attempt may be writing)
            active.video.drop_held()  # only frames in the video count; the next attempt renders the rest
        book.kept_video = active.video
        backoff = RETRY_BACKOFF_S * 2 ** (active.attempt - 1)
        book.not_before = time.monotonic() + backoff
        checkpoint = self.checkpoints.latest(job_id, specs.checkpoint_frames(active.plan))
        where = f"step {checkpoint.step}" if checkpoint else "step 0"
        self._queue_again(job, f"attempt {active.attempt} of {limit} failed: {error}; attempt {active.attempt + 1} "
                               f"resumes from {where} in {backoff:g}s")
        await self.hub.notify(job_id)
        log.warning("job %s: attempt %d failed (%s); queued again", job_id, active.attempt, error)
        return True

    async def _finish_if_done(self, job_id: str) -> bool:
        active = self.running(job_id)
        if active is None or active.pending:
            return False
        await self.end(job_id, pb.SUCCEEDED)  # a cancelled or failed job has ended already
        self._books[job_id].active = None
        self._forget(job_id)
        if active.delete_when_over:
            self.delete(job_id)
        return True

    def expire(self, retention_s: float) -> int:
        """Deletes the jobs that ended more than `retention_s` ago: video, events, row. Returns how many."""
        cutoff = time.time() - retention_s
        expired = [job for job in self.store.final_jobs() if job.finished_at.ToSeconds() < cutoff
                   and job.id not in self._books]
        for job in expired:
            self.delete(job.id)
        if expired:
            log.info("retention: deleted %d jobs that ended over %gs ago", len(expired), retention_s)
        return len(expired)

    def delete(self, job_id: str) -> None:
        """An ended job goes entirely: its video, scratch parts, checkpoints, events and record
        (once its members have reported, where they are still stopping)."""
        active = self.running(job_id)
        if active is not None:
            active.delete_when_over = True
            return
        self._video_file(job_id).unlink(missing_ok=True)
        self._forget(job_id)
        self.store.delete_job(job_id)

    def _forget(self, job_id: str) -> None:
        """The job is over: its scratch parts, checkpoints and book go (the book once unwatched)."""
        shutil.rmtree(self.scratch_dir(job_id), ignore_errors=True)
        self.checkpoints.drop(job_id)
        book = self._books.get(job_id)
        if book is not None:
            book.kept_video, book.active = None, None
        self._drop_if_over(job_id)

    def _drop_if_over(self, job_id: str) -> None:
        book = self._books.get(job_id)
        if book is not None and not book.watchers and book.active is None and book.kept_video is None and (
                (job := self.store.get_job(job_id)) is None or job.state in FINAL_STATES):
            del self._books[job_id]

    def checkpointed(self, job_id: str, step: int) -> None:
        """Every part of the job's checkpoint at `step` has arrived: a retry resumes from there."""
        job = self.get(job_id)
        job.checkpoint_step = step
        self.store.save_job(job)

    async def fail(self, job_id: str, error: str) -> None:
        """Tells the members to stop and marks the job FAILED (first error wins): a failure no
        retry can mend (the video cannot be encoded)."""
        self._stop_members(job_id)
        await self.end(job_id, pb.FAILED, error=error)

    def _stop_members(self, job_id: str) -> None:
        active = self.running(job_id)
        if active:
            self.workers.cancel(job_id, active.pending, active.attempt)

    async def end(self, job_id: str, state: int, detail: str = "", error: str = "") -> bool:
        """Closes a placed job's video and sets its final state, once: False if the job had ended.
        Success needs every frame (a bounded job) or an unbroken run of them; a job that ends
        otherwise keeps the frames finished so far as a playable video."""
        active = self.running(job_id)
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
