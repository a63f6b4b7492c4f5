"""CoordinatorCore: the one object the servicers talk to; it wires the parts and routes
what crosses them. Knows nothing of gRPC (service.py only translates).

- jobs.py       job lifecycle: submit, watch, cancel, events, how a placed job ends
- scheduler.py  placement: FIFO per model onto idle workers
- workers.py    the registry of attached workers: heartbeats, assignments, rendezvous
- intake.py     frame uploads into the job's video (stitcher.py)
- checkpoints.py  step checkpoints: the parts ranks upload, the parts a resumed attempt fetches

What stays here is what involves more than one part: a worker's stream from register to
detach, the routing of its messages, and scheduling again whenever a worker or a job
frees up. Runs on one asyncio loop, so no state needs locks; the one exception is a
job's video, written in threads across awaits (ActiveJob.video_lock).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import PIL.Image

from clipmesh import specs
from clipmesh.v1 import clipmesh_pb2 as pb

from . import access
from .checkpoints import Checkpoints, stream_part
from .errors import MAX_DETAIL, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .intake import FrameIntake
from .jobs import Jobs, shielded
from .limits import Limits
from .scheduler import BACKFILL_WAIT_S, Scheduler
from .store import FINAL_STATES, Store
from .workers import WorkerRegistry, WorkerSession

log = logging.getLogger("clipmesh.coordinator")


def _stamped(msg, worker_id: str):
    """A copy of a worker's progress or log message, credited to the worker that sent it."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    copy.worker_id = worker_id
    return copy


class CoordinatorCore:
    def __init__(self, data_dir: Path, heartbeat_timeout: float = 15.0, collective_timeout: int = 120,
                 checkpoint_dir: Path | None = None, backfill_wait_s: float = BACKFILL_WAIT_S, limits: Limits = Limits()):
        self.limits = limits
        self.data_dir = Path(data_dir)
        (self.data_dir / "videos").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self.store = Store(self.data_dir / "clipmesh.db")
        self.workers = WorkerRegistry(self.store, heartbeat_timeout)
        self.checkpoints = Checkpoints(self.store, checkpoint_dir or self.data_dir / "checkpoints")
        self.jobs = Jobs(self.store, self.data_dir, self.workers, self.checkpoints, limits)
        self.scheduler = Scheduler(self.jobs, self.workers, collective_timeout, backfill_wait_s)
        self.intake = FrameIntake(self.jobs, limits)
        self.next_expiry = 0.0  # monotonic time of the next retention pass
        self.workers.recover()
        # running jobs wait this long for their members to re-attach (they re-dial every second)
        self.jobs.recover(grace_s=2 * heartbeat_timeout)

    # -- client API ---------------------------------------------------------
    def model_info(self, name: str) -> pb.ModelInfo | None:
        return self.workers.model_info(name)

    async def submit(self, req: pb.SubmitJobRequest, owner: str = "") -> pb.Job:
        job = await self.jobs.submit(req, owner)
        await self.schedule()
        return self.get_job(job.id)

    # Every client call names its caller (access.Caller; OPEN: a coordinator without credentials,
    # or the core's own use): who may see, cancel, delete or fetch a job is decided here, once,
    # for gRPC and HTTP alike.
    def get_job(self, job_id: str, who: access.Caller = access.OPEN) -> pb.Job:
        job = self.jobs.get(job_id)
        access.check_visible(who, job)
        return job

    def preview(self, job_id: str, who: access.Caller = access.OPEN) -> pb.Preview:
        """The newest frame a running job has received, as a PNG; NotFound before the first and
        after the end (its video is then the thing to fetch)."""
        job = self.get_job(job_id, who)
        if job.state in FINAL_STATES:
            raise NotFound(f"job {job_id} has ended: fetch its video")
        active = self.jobs.running(job_id)
        if active is None or active.latest_frame is None:
            raise NotFound(f"job {job_id} has no frame yet")
        frame, rgb = active.latest_frame
        image = PIL.Image.frombytes("RGB", (job.request.width, job.request.height), rgb)
        out = io.BytesIO()
        image.save(out, "PNG")
        return pb.Preview(frame=frame, frames_written=active.video.frames_written, png=out.getvalue())

    def list_jobs(self, limit: int, who: access.Caller = access.OPEN) -> list[pb.Job]:
        """The newest `limit` jobs the caller may see (a client: its own), without their requests'
        images (up to 3 MiB each, a listing would outgrow a message; GetJob has a job's)."""
        jobs = self.jobs.list(limit, None if who.sees_all else who.name)
        for job in jobs:
            job.request.ClearField("image")
        return jobs

    def progress(self, job: pb.Job) -> tuple[float, int]:
        """0..1 from the job's real events (Jobs.progress), and the frames in its video so far."""
        return self.jobs.progress(job), self.jobs.frames_received(job)

    def list_workers(self) -> list[pb.WorkerInfo]:
        return self.workers.list()

    def worker_session(self, key: str, worker: str) -> WorkerSession:
        """The attach session a worker's call names (its key), if the caller is that worker."""
        return self.workers.by_key(key, worker)

    def watch(self, job_id: str, who: access.Caller = access.OPEN) -> AsyncIterator[pb.JobEvent]:
        self.get_job(job_id, who)
        return self.jobs.watch(job_id)

    async def cancel(self, job_id: str, who: access.Caller = access.OPEN) -> pb.Job:
        self.get_job(job_id, who)
        job = await self.jobs.cancel(job_id)
        await self.schedule()  # a cancelled queued job may have blocked the ones behind it
        return job

    async def delete(self, job_id: str, who: access.Caller = access.OPEN) -> bool:
        """Cancels the job if it is not over, then deletes it; True if it was cancelled first."""
        running = self.get_job(job_id, who).state not in FINAL_STATES
        if running:
            try:
                await self.cancel(job_id)
            except FailedPrecondition:  # it ended meanwhile
                pass
        self.jobs.delete(job_id)
        return running

    def video_path(self, job_id: str, who: access.Caller = access.OPEN) -> Path:
        self.get_job(job_id, who)
        return self.jobs.video_path(job_id)

    async def schedule(self) -> None:
        await self.scheduler.schedule()

    # -- workers ------------------------------------------------------------
    async def serve_worker(self, inbound: AsyncIterator[pb.WorkerMessage],
                           identity: str = "") -> AsyncIterator[pb.CoordinatorMessage]:
        """One worker's Attach stream: registers it from the first message, handles what it
        sends while yielding what it is sent, and detaches it when either side ends.
        `identity`: the worker id the caller's credential names, if any (workers.attach)."""
        try:
            first = await asyncio.wait_for(anext(inbound, None), self.limits.register_timeout_s)
        except TimeoutError:
            raise InvalidArgument("register", f"none within {self.limits.register_timeout_s:g}s") from None
        if first is None or first.WhichOneof("kind") != "register":
            raise InvalidArgument("register", "the first message must be register")
        session = await self.attach(first.register, identity)
        worker_id = first.register.worker_id

        async def pump_inbound():
            try:
                async for msg in inbound:
                    await self.on_message(session, msg)
            except Exception as exc:  # stream broken: the finally below reports the loss
                log.info("worker %s stream ended: %s", worker_id, exc)
            finally:
                await self.detach(worker_id, "stream closed", session)

        reader = asyncio.get_running_loop().create_task(pump_inbound())
        try:
            while (out := await session.outbox.get()) is not None:
                yield out
            if session.replaced:  # the old process must not re-dial and take its name back
                raise AlreadyExists(f"worker {worker_id!r} registered again: this session was replaced")
        finally:
            reader.cancel()
            await self.detach(worker_id, "stream closed", session)

    @shielded
    async def attach(self, reg: pb.Register, identity: str = "") -> WorkerSession:
        """Registers the worker (a newer registration under its name takes over); a worker still
        rendering a job goes on with it if that is the job's current attempt, else is told to abort."""
        session, replaced = self.workers.attach(reg, identity)
        running = reg.running if reg.HasField("running") else None
        adopted = running is not None and self.jobs.adopt(running, reg.worker_id)
        if running is not None and not adopted:
            session.send(cancel=pb.Cancel(job_id=running.job_id, attempt=running.attempt, abort=True))
        old_job = replaced.info.current_job_id if replaced else ""
        if old_job and not (adopted and running.job_id == old_job):
            await self.jobs.member_left(old_job, reg.worker_id,
                                        f"worker {reg.worker_id} lost: registered again without its part")
        await self.schedule()
        return session

    @shielded
    async def detach(self, worker_id: str, reason: str, session: WorkerSession | None = None) -> None:
        """The worker's stream ended or it missed heartbeats: it is lost, and so is its part of a
        job. `session`: only if that is still the worker's session (not one a newer replaced)."""
        job_id = self.workers.detach(worker_id, reason, session)
        if job_id:
            await self.jobs.member_left(job_id, worker_id, f"worker {worker_id} lost: {reason}")
        await self.schedule()

    @shielded
    async def on_message(self, session: WorkerSession, msg: pb.WorkerMessage) -> None:
        if not self.workers.seen(session):
            return  # a fenced-off session: a newer registration under its name took over
        worker_id, job_id = session.info.id, session.info.current_job_id
        kind = msg.WhichOneof("kind")
        if kind == "heartbeat":
            self.workers.heartbeat(session)
        elif kind == "store_ready":
            ready = msg.store_ready
            if self.jobs.is_current(ready.job_id, ready.attempt):
                self.workers.broker_rendezvous(worker_id, ready, self.jobs.running(ready.job_id).members)
        elif kind == "progress":
            if self.jobs.is_member(worker_id, job_id) and self.jobs.is_current(job_id, msg.progress.attempt):
                await self.jobs.emit(job_id, step=_stamped(msg.progress, worker_id))
        elif kind == "log":  # a member's note on its job (the worker's own log holds the rest)
            if self.jobs.is_member(worker_id, job_id):
                note = _stamped(msg.log, worker_id)
                note.text = note.text[:MAX_DETAIL]
                await self.jobs.emit(job_id, log=note)
        elif kind == "result":
            result = msg.result
            self.workers.release(worker_id, result.job_id, result.attempt)
            if result.outcome in (pb.JOB_OUTCOME_FAILED, pb.JOB_OUTCOME_UNSPECIFIED):
                self.workers.failed(worker_id)
            await self.jobs.member_reported(worker_id, result)
            await self.schedule()

    async def tick(self) -> None:
        """Every second or so: workers silent too long are lost, recovered jobs' members that did
        not come back are lost, and retries whose backoff is over get placed."""
        for wid in self.workers.missed_heartbeats():
            await self.detach(wid, f"no heartbeat for {self.workers.heartbeat_timeout:g}s")
        for job_id, member in self.jobs.not_adopted():
            await self.jobs.member_left(job_id, member, f"worker {member} did not re-attach after the coordinator "
                                                        "restarted")
        if self.limits.retention_s and time.monotonic() >= self.next_expiry:
            self.next_expiry = time.monotonic() + min(60.0, self.limits.retention_s / 4)
            self.jobs.expire(self.limits.retention_s)
        await self.schedule()

    # -- checkpoints ----------------------------------------------------------
    async def upload_checkpoint(self, session: WorkerSession, chunks: AsyncIterator[pb.CheckpointChunk]) -> bool:
        first = await anext(chunks, None)
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidArgument("header", "the first chunk must be a header")
        header = first.header
        active = self.jobs.member_of(session, header.job_id, header.worker_id, header.attempt)

        async def data():
            async for chunk in chunks:
                yield chunk.data

        complete = await self.checkpoints.receive(header, data(), specs.checkpoint_frames(active.plan))
        if complete:
            self.jobs.checkpointed(header.job_id, header.step)
        return complete

    def fetch_checkpoint(self, session: WorkerSession, req: pb.FetchCheckpointRequest) -> AsyncIterator[pb.CheckpointChunk]:
        """A part of the job's checkpoint, for a member of its running attempt only."""
        active = self.jobs.running(req.job_id)
        self.jobs.member_of(session, req.job_id, session.info.id, active.attempt if active else -1)
        path = self.checkpoints.read(req.job_id, req.step, req.latent_start, req.latent_end)
        return stream_part(path, pb.CheckpointHeader(job_id=req.job_id, step=req.step, latent_start=req.latent_start,
                                                     latent_end=req.latent_end, size=path.stat().st_size))

    # -- frames -------------------------------------------------------------
    async def upload_frames(self, session: WorkerSession, chunks: AsyncIterator[pb.FrameChunk]) -> int:
        return await self.intake.upload(session, chunks)
