"""The worker registry: who is attached, what each serves, and what we tell them.

One WorkerSession per live Attach stream; its outbox is what the stream sends. This is
where a worker turns IDLE, BUSY or LOST, where heartbeats are kept, where a job's
members are told to start or stop, and where rank 0's StoreReady is brokered into a
Rendezvous for every member. It knows nothing of jobs beyond their ids: what a lost
worker means for its job is decided by the facade (core.py) and jobs.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from clipmesh import presets
from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import AlreadyExists, InvalidArgument
from .store import Store, now_ts

log = logging.getLogger("clipmesh.coordinator")


@dataclass
class WorkerSession:
    """A live Attach stream: what we know of the worker and its outgoing queue."""

    info: pb.WorkerInfo
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # CoordinatorMessage, None closes
    last_seen: float = field(default_factory=time.monotonic)

    def send(self, **kind) -> None:
        self.outbox.put_nowait(pb.CoordinatorMessage(**kind))


class WorkerRegistry:
    def __init__(self, store: Store, heartbeat_timeout: float):
        self.store = store
        self.heartbeat_timeout = heartbeat_timeout
        self.sessions: dict[str, WorkerSession] = {}

    def recover(self) -> None:
        """After a restart no worker is attached: every known one is LOST."""
        for info in self.store.list_workers():
            if info.state != pb.LOST:
                info.state = pb.LOST
                info.current_job_id = ""
                self.store.save_worker(info)

    def list(self) -> list[pb.WorkerInfo]:
        return self.store.list_workers()

    # -- models the cluster knows ---------------------------------------------
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

    def known_models(self) -> list[str]:
        return sorted(set(presets.PRESETS) | {w.model.name for w in self.store.list_workers()})

    # -- attach, detach, heartbeats -------------------------------------------
    def attach(self, reg: pb.Register) -> WorkerSession:
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
        return session

    def detach(self, worker_id: str, reason: str) -> str | None:
        """Marks the worker LOST and closes its stream; returns the job it was on ('' if none),
        or None when it was not attached."""
        session = self.sessions.pop(worker_id, None)
        if session is None:
            return None
        session.outbox.put_nowait(None)
        session.info.state = pb.LOST
        job_id, session.info.current_job_id = session.info.current_job_id, ""
        self.store.save_worker(session.info)
        log.warning("worker %s lost: %s", worker_id, reason)
        return job_id

    def seen(self, worker_id: str) -> WorkerSession | None:
        """A message came from the worker: it is alive. None when it is not attached."""
        session = self.sessions.get(worker_id)
        if session is not None:
            session.last_seen = time.monotonic()
        return session

    def heartbeat(self, session: WorkerSession) -> None:
        session.info.last_heartbeat.CopyFrom(now_ts())
        self.store.save_worker(session.info)

    def missed_heartbeats(self) -> Iterator[str]:
        """The workers silent for longer than the timeout; lazy, so each is judged when reached."""
        deadline = time.monotonic() - self.heartbeat_timeout
        for wid, session in list(self.sessions.items()):
            if session.last_seen < deadline:
                yield wid

    # -- a job's members --------------------------------------------------------
    def idle_for(self, model: str) -> list[str]:
        return sorted(wid for wid, s in self.sessions.items()
                      if s.info.state == pb.IDLE and s.info.model.name == model)

    def infos(self, worker_ids: list[str]) -> list[pb.WorkerInfo]:
        return [self.sessions[w].info for w in worker_ids]

    def assign(self, job_id: str, plan: pb.RenderPlan, members: list[str]) -> None:
        """Makes the members BUSY and sends each its rank of the plan."""
        for rank, wid in enumerate(members):
            session = self.sessions[wid]
            session.info.state = pb.BUSY
            session.info.current_job_id = job_id
            self.store.save_worker(session.info)
            session.send(assignment=pb.Assignment(job_id=job_id, plan=plan, rank=rank))

    def release(self, worker_id: str, job_id: str) -> None:
        """The worker reported its result for the job: it is IDLE again."""
        session = self.sessions[worker_id]
        if session.info.current_job_id == job_id:
            session.info.state = pb.IDLE
            session.info.current_job_id = ""
            self.store.save_worker(session.info)

    def cancel(self, job_id: str, worker_ids) -> None:
        """Tells the attached ones among `worker_ids` to stop the job."""
        for wid in worker_ids:
            if wid in self.sessions:
                self.sessions[wid].send(cancel=pb.Cancel(job_id=job_id))

    def broker_rendezvous(self, worker_id: str, ready: pb.StoreReady, members: list[str]) -> None:
        """Rank 0 (only) hosts the job's store: every member learns where to meet."""
        if members[0] != worker_id:
            return
        host = self.sessions[worker_id].info.host
        for wid in members:
            if wid in self.sessions:
                self.sessions[wid].send(rendezvous=pb.Rendezvous(job_id=ready.job_id, host=host, port=ready.port))
