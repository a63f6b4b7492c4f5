"""The coordinator's logic: jobs, placement, render plans, rendezvous, progress, streaming video.

Knows nothing of gRPC (the servicers in service.py only translate). Runs on one
asyncio loop, so the state below needs no locks; the one exception is a job's video,
written in threads across awaits (ActiveJob.video_lock).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from clipmesh import presets
from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .hub import ProgressHub
from .planner import make_plan, max_workers
from .stitcher import FramePart, VideoClosed, VideoWriter
from .store import FINAL_STATES, Store, now_ts
from .validate import validate_request

log = logging.getLogger("clipmesh.coordinator")

STATE_NAMES = {v: k for k, v in pb.JobState.items()}


def shielded(method):
    """Runs a transition to its end even if its caller is cancelled: ending a job awaits video
    threads, and a worker's closing stream cancels the task that reads it mid-message."""
    @functools.wraps(method)
    async def run(*args, **kwargs):
        return await asyncio.shield(method(*args, **kwargs))
    return run


@dataclass
class WorkerSession:
    """A live Attach stream: what we know of the worker and its outgoing queue."""

    info: pb.WorkerInfo
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # CoordinatorMessage, None closes
    last_seen: float = field(default_factory=time.monotonic)

    def send(self, **kind) -> None:
        self.outbox.put_nowait(pb.CoordinatorMessage(**kind))


@dataclass
class ActiveJob:
    """Book-keeping of a placed job until every member reported its result."""

    plan: pb.RenderPlan
    members: list[str]                          # worker ids in rank order
    pending: set[str]                           # members that have not reported yet
    video: VideoWriter                          # written while the job runs
    # One video call at a time; the job ends under it, so a part is either in the video or refused.
    video_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class CoordinatorCore:
    def __init__(self, data_dir: Path, heartbeat_timeout: float = 15.0, collective_timeout: int = 120):
        self.data_dir = Path(data_dir)
        (self.data_dir / "videos").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self.store = Store(self.data_dir / "clipmesh.db")
        self.hub = ProgressHub()
        self.heartbeat_timeout = heartbeat_timeout
        self.collective_timeout = collective_timeout
        self.sessions: dict[str, WorkerSession] = {}
        self.active: dict[str, ActiveJob] = {}
        self._upload_ids = itertools.count()  # part files never share a name, even for a repeated upload
        self._recover()

    def _recover(self) -> None:
        """After a restart no worker is attached: nothing can still be running."""
        for info in self.store.list_workers():
            if info.state != pb.LOST:
                info.state = pb.LOST
                info.current_job_id = ""
                self.store.save_worker(info)
        for job in self.store.jobs_in_state(pb.RUNNING):
            job.state = pb.QUEUED
            del job.worker_ids[:]
            job.ClearField("started_at")
            self.store.save_job(job)
            self.store.append_event(pb.JobEvent(job_id=job.id, state=pb.StateChange(
                state=pb.QUEUED, detail="coordinator restarted; job re-queued")))

    # -- events -------------------------------------------------------------
    async def _emit(self, job_id: str, **kind) -> None:
        self.store.append_event(pb.JobEvent(job_id=job_id, **kind))
        await self.hub.notify(job_id)

    async def _set_state(self, job: pb.Job, state: int, detail: str = "", error: str = "") -> None:
        job.state = state
        if error:
            job.error = error
        if state == pb.RUNNING:
            job.started_at.CopyFrom(now_ts())
        if state in FINAL_STATES:
            job.finished_at.CopyFrom(now_ts())
        self.store.save_job(job)
        await self._emit(job.id, state=pb.StateChange(state=state, detail=detail or error))

    # -- client API ---------------------------------------------------------
    def model_info(self, name: str) -> pb.ModelInfo | None:
        """Limits of a model: from a worker that serves it, else from a preset or a model
        folder readable here (configs only, no torch), else None (unknown)."""
        for info in self.store.list_workers():
            if info.model.name == name:
                return info.model
        try:
            return pb.ModelInfo(**presets.model_limits(name))
        except (ValueError, OSError, KeyError):
            return None

    async def submit(self, req: pb.SubmitJobRequest) -> pb.Job:
        known = set(presets.PRESETS) | {w.model.name for w in self.store.list_workers()}
        validate_request(req, self.model_info(req.model), sorted(known))
        job = self.store.create_job(req)
        await self._emit(job.id, state=pb.StateChange(state=pb.QUEUED, detail="accepted"))
        log.info("job %s queued: %d frames %dx%d, %d steps", job.id, req.num_frames, req.width, req.height,
                 req.num_inference_steps)
        await self.schedule()
        return self.get_job(job.id)

    def get_job(self, job_id: str) -> pb.Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def list_jobs(self, limit: int) -> list[pb.Job]:
        return self.store.list_jobs(limit if limit > 0 else 100)

    def list_workers(self) -> list[pb.WorkerInfo]:
        return self.store.list_workers()

    async def watch(self, job_id: str) -> AsyncIterator[pb.JobEvent]:
        """Replays the job's events, then follows live; ends once the job is final."""
        self.get_job(job_id)
        seq = 0
        while True:
            for event in self.store.events_after(job_id, seq):
                seq = event.seq
                yield event
            if self.get_job(job_id).state in FINAL_STATES and not self.store.events_after(job_id, seq):
                return
            await self.hub.wait(job_id, timeout=1.0)

    @shielded
    async def cancel(self, job_id: str) -> pb.Job:
        job = self.get_job(job_id)
        if job.state in FINAL_STATES:
            raise FailedPrecondition(f"job {job_id} is already {STATE_NAMES[job.state]}")
        if job_id not in self.active:
            await self._set_state(job, pb.CANCELLED, detail="cancelled by client")
            return job
        self._broadcast_cancel(job_id)
        if not await self._end(job_id, pb.CANCELLED, detail="cancelled by client"):
            raise FailedPrecondition(f"job {job_id} is already {STATE_NAMES[self.get_job(job_id).state]}")
        return self.get_job(job_id)

    def video_path(self, job_id: str) -> Path:
        """Any job with a finished video: a cancelled or failed one keeps the frames finished before."""
        job = self.get_job(job_id)
        if not job.video_size:
            raise FailedPrecondition(f"job {job_id} is {STATE_NAMES[job.state]} without a video; one exists once "
                                     "SUCCEEDED, or once stopped after frames were finished")
        return self.data_dir / "videos" / f"{job_id}.mp4"

    # -- placement ----------------------------------------------------------
    async def schedule(self) -> None:
        """Places queued jobs FIFO. A job that cannot be placed blocks later jobs of the same
        model (no starvation), not jobs of other models."""
        blocked: set[str] = set()
        for job in self.store.jobs_in_state(pb.QUEUED):
            req = job.request
            if req.model in blocked:
                continue
            idle = sorted(wid for wid, s in self.sessions.items()
                          if s.info.state == pb.IDLE and s.info.model.name == req.model)
            model = self.model_info(req.model)
            wanted = req.num_workers or min(len(idle), max_workers(req, model))
            if wanted == 0 or len(idle) < wanted:
                blocked.add(req.model)
                continue
            await self._place(job, idle[:wanted], model)

    async def _place(self, job: pb.Job, members: list[str], model: pb.ModelInfo) -> None:
        plan = make_plan(job, [self.sessions[w].info for w in members], model, self.collective_timeout)
        video = VideoWriter(self.data_dir / "videos" / f"{job.id}.mp4", job.request.fps)
        self.active[job.id] = ActiveJob(plan=plan, members=members, pending=set(members), video=video)
        job.strategy = plan.strategy
        job.worker_ids[:] = members
        await self._set_state(job, pb.RUNNING, detail=f"placed on {', '.join(members)} ({plan.strategy})")
        for rank, wid in enumerate(members):
            session = self.sessions[wid]
            session.info.state = pb.BUSY
            session.info.current_job_id = job.id
            self.store.save_worker(session.info)
            session.send(assignment=pb.Assignment(job_id=job.id, plan=plan, rank=rank))

    # -- workers ------------------------------------------------------------
    async def attach(self, reg: pb.Register) -> WorkerSession:
        if not reg.worker_id:
            raise InvalidArgument("register.worker_id", "must not be empty")
        if reg.worker_id in self.sessions:
            raise AlreadyExists(f"worker {reg.worker_id!r} is already attached")
        info = pb.WorkerInfo(id=reg.worker_id, state=pb.IDLE, host=reg.host, device=reg.device,
                             memory_bytes=reg.memory_bytes, threads=reg.threads, model=reg.model,
                             speed=reg.speed, last_heartbeat=now_ts())
        session = WorkerSession(info=info)
        self.sessions[reg.worker_id] = session
        self.store.save_worker(info)
        session.send(registered=pb.Registered(heartbeat_seconds=max(self.heartbeat_timeout / 4, 0.2)))
        log.info("worker %s attached (%s, %s, model %s)", info.id, info.host, info.device, info.model.name)
        await self.schedule()
        return session

    @shielded
    async def detach(self, worker_id: str, reason: str) -> None:
        """The worker's stream ended or it missed heartbeats: it is lost, and so is its job."""
        session = self.sessions.pop(worker_id, None)
        if session is None:
            return
        session.outbox.put_nowait(None)
        session.info.state = pb.LOST
        job_id, session.info.current_job_id = session.info.current_job_id, ""
        self.store.save_worker(session.info)
        log.warning("worker %s lost: %s", worker_id, reason)
        if job_id in self.active:
            self.active[job_id].pending.discard(worker_id)
            await self._fail(job_id, f"worker {worker_id} lost: {reason}")
            await self._maybe_finish(job_id)

    @shielded
    async def on_message(self, worker_id: str, msg: pb.WorkerMessage) -> None:
        session = self.sessions.get(worker_id)
        if session is None:
            return
        session.last_seen = time.monotonic()
        kind = msg.WhichOneof("kind")
        if kind == "heartbeat":
            session.info.last_heartbeat.CopyFrom(now_ts())
            self.store.save_worker(session.info)
        elif kind == "store_ready":
            await self._on_store_ready(worker_id, msg.store_ready)
        elif kind == "progress":
            if self._is_member(msg.progress.worker_id or worker_id, session.info.current_job_id):
                progress = pb.StepProgress()
                progress.CopyFrom(msg.progress)
                progress.worker_id = worker_id
                await self._emit(session.info.current_job_id, step=progress)
        elif kind == "log":
            if session.info.current_job_id:
                entry = pb.LogMessage()
                entry.CopyFrom(msg.log)
                entry.worker_id = worker_id
                await self._emit(session.info.current_job_id, log=entry)
        elif kind == "result":
            await self._on_result(worker_id, msg.result)

    def _is_member(self, worker_id: str, job_id: str) -> bool:
        return job_id in self.active and worker_id in self.active[job_id].members

    async def _on_store_ready(self, worker_id: str, ready: pb.StoreReady) -> None:
        active = self.active.get(ready.job_id)
        if active is None or active.members[0] != worker_id:
            return
        host = self.sessions[worker_id].info.host
        for wid in active.members:
            if wid in self.sessions:
                self.sessions[wid].send(rendezvous=pb.Rendezvous(job_id=ready.job_id, host=host, port=ready.port))

    async def _on_result(self, worker_id: str, result: pb.JobResult) -> None:
        session = self.sessions[worker_id]
        if session.info.current_job_id == result.job_id:
            session.info.state = pb.IDLE
            session.info.current_job_id = ""
            self.store.save_worker(session.info)
        active = self.active.get(result.job_id)
        if active is not None and worker_id in active.pending:
            active.pending.discard(worker_id)
            if not result.ok and not result.cancelled:
                await self._fail(result.job_id, f"worker {worker_id}: {result.error}")
            await self._maybe_finish(result.job_id)
        await self.schedule()

    async def _fail(self, job_id: str, error: str) -> None:
        """Tells the members to stop and marks the job FAILED (first error wins)."""
        self._broadcast_cancel(job_id)
        await self._end(job_id, pb.FAILED, error=error)

    def _broadcast_cancel(self, job_id: str) -> None:
        active = self.active.get(job_id)
        for wid in active.pending if active else ():
            if wid in self.sessions:
                self.sessions[wid].send(cancel=pb.Cancel(job_id=job_id))

    async def _end(self, job_id: str, state: int, detail: str = "", error: str = "") -> bool:
        """Closes a placed job's video and sets its final state, once: False if the job had ended.
        Success needs every frame (a bounded job) or an unbroken run of them; a job that ends
        otherwise keeps the frames finished so far as a playable video."""
        active = self.active.get(job_id)
        if active is None:
            return False
        async with active.video_lock:
            job = self.get_job(job_id)
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
            await self._set_state(job, state, detail="; ".join(filter(None, (detail or error, outcome))), error=error)
            return True

    async def _maybe_finish(self, job_id: str) -> None:
        active = self.active.get(job_id)
        if active is None or active.pending:
            return
        await self._end(job_id, pb.SUCCEEDED)  # a cancelled or failed job has ended already
        self.active.pop(job_id, None)
        self._drop_frames(job_id)
        await self.schedule()

    def _drop_frames(self, job_id: str) -> None:
        if job_id not in self.active:
            shutil.rmtree(self.data_dir / "jobs" / job_id, ignore_errors=True)

    async def check_heartbeats(self) -> None:
        deadline = time.monotonic() - self.heartbeat_timeout
        for wid, session in list(self.sessions.items()):
            if session.last_seen < deadline:
                await self.detach(wid, f"no heartbeat for {self.heartbeat_timeout:g}s")

    # -- frames -------------------------------------------------------------
    @shielded
    async def _add_part(self, active: ActiveJob, part: FramePart) -> None:
        """The lock is held until the writer thread is done, even if the upload's caller went away."""
        async with active.video_lock:
            await asyncio.to_thread(active.video.add, part)

    async def receive_frames(self, header: pb.FrameHeader, chunks: AsyncIterator[bytes]) -> int:
        active = self.active.get(header.job_id)
        if active is None or header.worker_id not in active.members:
            raise FailedPrecondition(f"job {header.job_id!r} is not running on worker {header.worker_id!r}")
        job = self.get_job(header.job_id)
        if job.state in FINAL_STATES:
            raise FailedPrecondition(f"job {header.job_id} is already {STATE_NAMES[job.state]}")
        req = active.plan.request
        if (header.height, header.width) != (req.height, req.width):
            raise InvalidArgument("header.height/width", f"must be {req.height}x{req.width}")
        end = header.first_frame + header.num_frames
        if header.first_frame < 0 or header.num_frames < 1 or (req.num_frames and end > req.num_frames):
            # an unbounded job (num_frames 0) takes any frame index
            raise InvalidArgument("header.first_frame/num_frames",
                                  f"must lie within [0, {req.num_frames or 'unbounded'})")
        expected = header.num_frames * header.height * header.width * 3
        folder = self.data_dir / "jobs" / header.job_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"frames-{header.first_frame:06d}-{next(self._upload_ids)}.rgb"
        received = 0
        with open(path, "wb") as f:
            async for data in chunks:
                received += len(data)
                if received > expected:
                    break
                f.write(data)
        if received != expected:
            path.unlink(missing_ok=True)
            raise InvalidArgument("data", f"expected {expected} bytes of RGB24, got {received}")
        try:
            await self._add_part(active, FramePart(header.first_frame, header.num_frames, header.height,
                                                   header.width, path))
        except VideoClosed:  # the job ended while this part was on its way
            job = self.get_job(header.job_id)
            raise FailedPrecondition(f"job {header.job_id} is already {STATE_NAMES[job.state]}") from None
        except ValueError as exc:
            raise InvalidArgument("header.first_frame/num_frames", str(exc)) from None
        except RuntimeError as exc:  # ffmpeg died: no video can come of this job
            await self._fail(header.job_id, f"video encoding failed: {exc}")
            raise FailedPrecondition(f"job {header.job_id} failed: video encoding failed") from None
        await self._emit(header.job_id, frames=pb.FramesReceived(
            worker_id=header.worker_id, first_frame=header.first_frame, num_frames=header.num_frames))
        return header.num_frames
