"""CoordinatorCore: the one object the servicers talk to; it wires the parts and routes
what crosses them. Knows nothing of gRPC (service.py only translates).

- jobs.py       job lifecycle: submit, watch, cancel, events, how a placed job ends
- scheduler.py  placement: FIFO per model onto idle workers
- workers.py    the registry of attached workers: heartbeats, assignments, rendezvous
- intake.py     frame uploads into the job's video (stitcher.py)

What stays here is what involves more than one part: a worker's stream from register to
detach, the routing of its messages, and scheduling again whenever a worker or a job
frees up. Runs on one asyncio loop, so no state needs locks; the one exception is a
job's video, written in threads across awaits (ActiveJob.video_lock).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import InvalidArgument
from .intake import FrameIntake
from .jobs import Jobs, shielded
from .scheduler import Scheduler
from .store import Store
from .workers import WorkerRegistry, WorkerSession

log = logging.getLogger("clipmesh.coordinator")


def _stamped(msg, worker_id: str):
    """A copy of a worker's progress or log message, credited to the worker that sent it."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    copy.worker_id = worker_id
    return copy


class CoordinatorCore:
    def __init__(self, data_dir: Path, heartbeat_timeout: float = 15.0, collective_timeout: int = 120):
        self.data_dir = Path(data_dir)
        (self.data_dir / "videos").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self.store = Store(self.data_dir / "clipmesh.db")
        self.workers = WorkerRegistry(self.store, heartbeat_timeout)
        self.jobs = Jobs(self.store, self.data_dir, self.workers)
        self.scheduler = Scheduler(self.jobs, self.workers, collective_timeout)
        self.intake = FrameIntake(self.jobs)
        self.workers.recover()
        self.jobs.recover()

    # -- client API ---------------------------------------------------------
    def model_info(self, name: str) -> pb.ModelInfo | None:
        return self.workers.model_info(name)

    async def submit(self, req: pb.SubmitJobRequest) -> pb.Job:
        job = await self.jobs.submit(req)
        await self.schedule()
        return self.get_job(job.id)

    def get_job(self, job_id: str) -> pb.Job:
        return self.jobs.get(job_id)

    def list_jobs(self, limit: int) -> list[pb.Job]:
        return self.jobs.list(limit)

    def list_workers(self) -> list[pb.WorkerInfo]:
        return self.workers.list()

    def watch(self, job_id: str) -> AsyncIterator[pb.JobEvent]:
        return self.jobs.watch(job_id)

    async def cancel(self, job_id: str) -> pb.Job:
        return await self.jobs.cancel(job_id)

    def video_path(self, job_id: str) -> Path:
        return self.jobs.video_path(job_id)

    async def schedule(self) -> None:
        await self.scheduler.schedule()

    # -- workers ------------------------------------------------------------
    async def serve_worker(self, inbound: AsyncIterator[pb.WorkerMessage]) -> AsyncIterator[pb.CoordinatorMessage]:
        """One worker's Attach stream: registers it from the first message, handles what it
        sends while yielding what it is sent, and detaches it when either side ends."""
        first = await anext(inbound, None)
        if first is None or first.WhichOneof("kind") != "register":
            raise InvalidArgument("register", "the first message must be register")
        session = await self.attach(first.register)
        worker_id = first.register.worker_id

        async def pump_inbound():
            try:
                async for msg in inbound:
                    await self.on_message(worker_id, msg)
            except Exception as exc:  # stream broken: the finally below reports the loss
                log.info("worker %s stream ended: %s", worker_id, exc)
            finally:
                await self.detach(worker_id, "stream closed")

        reader = asyncio.get_running_loop().create_task(pump_inbound())
        try:
            while (out := await session.outbox.get()) is not None:
                yield out
        finally:
            reader.cancel()
            await self.detach(worker_id, "stream closed")

    async def attach(self, reg: pb.Register) -> WorkerSession:
        session = self.workers.attach(reg)
        await self.schedule()
        return session

    @shielded
    async def detach(self, worker_id: str, reason: str) -> None:
        """The worker's stream ended or it missed heartbeats: it is lost, and so is its job."""
        job_id = self.workers.detach(worker_id, reason)
        if job_id and await self.jobs.member_left(job_id, worker_id, f"worker {worker_id} lost: {reason}"):
            await self.schedule()

    @shielded
    async def on_message(self, worker_id: str, msg: pb.WorkerMessage) -> None:
        session = self.workers.seen(worker_id)
        if session is None:
            return
        job_id = session.info.current_job_id
        kind = msg.WhichOneof("kind")
        if kind == "heartbeat":
            self.workers.heartbeat(session)
        elif kind == "store_ready":
            active = self.jobs.active.get(msg.store_ready.job_id)
            if active is not None:
                self.workers.broker_rendezvous(worker_id, msg.store_ready, active.members)
        elif kind == "progress":
            if self.jobs.is_member(msg.progress.worker_id or worker_id, job_id):
                await self.jobs.emit(job_id, step=_stamped(msg.progress, worker_id))
        elif kind == "log":
            if job_id:
                await self.jobs.emit(job_id, log=_stamped(msg.log, worker_id))
        elif kind == "result":
            self.workers.release(worker_id, msg.result.job_id)
            await self.jobs.member_reported(worker_id, msg.result)
            await self.schedule()

    async def check_heartbeats(self) -> None:
        for wid in self.workers.missed_heartbeats():
            await self.detach(wid, f"no heartbeat for {self.workers.heartbeat_timeout:g}s")

    # -- frames -------------------------------------------------------------
    async def upload_frames(self, chunks: AsyncIterator[pb.FrameChunk]) -> int:
        return await self.intake.upload(chunks)

    async def receive_frames(self, header: pb.FrameHeader, chunks: AsyncIterator[bytes]) -> int:
        return await self.intake.receive(header, chunks)
