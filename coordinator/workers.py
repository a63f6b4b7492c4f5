"""The worker registry: who is attached, what each serves, and what we tell them.

One WorkerSession per live Attach stream; its outbox is what the stream sends. This is
where a worker turns IDLE, BUSY or LOST, where heartbeats are kept, where a job's
members are told to start or stop, and where rank 0's StoreReady is brokered into a
Rendezvous for every member. It knows nothing of jobs beyond their ids: what a lost
worker means for its job is decided by the facade (core.py) and jobs.py.

A name is one worker: a newer process under an attached name takes over (the old session is
fenced off: its stream is closed and nothing it sends counts), since a supervisor restarts a
worker faster than its old session is noticed as lost; an older process registering again
(back from a freeze) is refused, so the name cannot flap between them (Register.incarnation). A worker that
fails jobs repeatedly is kept out of placement for a while.
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

FAILURES_TO_QUARANTINE = 2   # failed attempts within FAILURE_WINDOW_S ...
FAILURE_WINDOW_S = 600.0
QUARANTINE_S = 60.0          # ... keep a worker out of placement this long


@dataclass
class WorkerSession:
    """A live Attach stream: what we know of the worker and its outgoing queue."""

    info: pb.WorkerInfo
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # CoordinatorMessage, None closes
    last_seen: float = field(default_factory=time.monotonic)
    attempt: int = 0  # of info.current_job_id
    replaced: bool = False  # a newer registration under its name took over

    def send(self, **kind) -> None:
        self.outbox.put_nowait(pb.CoordinatorMessage(**kind))


class WorkerRegistry:
    def __init__(self, store: Store, heartbeat_timeout: float):
        self.store = store
        self.heartbeat_timeout = heartbeat_timeout
        self.sessions: dict[str, WorkerSession] = {}
        self.incarnations: dict[str, int] = {}      # worker -> the newest process seen under its name
        self.failures: dict[str, list[float]] = {}  # worker -> monotonic times of its failed attempts
        self.kept_out_until: dict[str, float] = {}

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

    def registered_for(self, model: str) -> int:
        """Workers ever registered for `model` (attached or not)."""
        return sum(w.model.name == model for w in self.store.list_workers())

    # -- attach, detach, heartbeats -------------------------------------------
    def attach(self, reg: pb.Register) -> tuple[WorkerSession, WorkerSession | None]:
        """(the new session, the one it replaced or None). A worker still rendering a job
        (reg.running) is BUSY with it, so it is not placed before that is over."""
        if not reg.worker_id:
            raise InvalidArgument("register.worker_id", "must not be empty")
        if reg.incarnation < self.incarnations.get(reg.worker_id, 0):  # an old process back from a freeze
            raise AlreadyExists(f"worker {reg.worker_id!r}: a newer process runs under this name")
        self.incarnations[reg.worker_id] = reg.incarnation
        old = self.sessions.pop(reg.worker_id, None)
        if old is not None:
            old.replaced = True
            old.outbox.put_nowait(None)
            log.warning("worker %s registered again: the newer session takes over", reg.worker_id)
        running = reg.running if reg.HasField("running") else None
        info = pb.WorkerInfo(id=reg.worker_id, state=pb.BUSY if running else pb.IDLE, host=reg.host,
                             device=reg.device, memory_bytes=reg.memory_bytes, threads=reg.threads, model=reg.model,
                             speed=reg.speed, last_heartbeat=now_ts(), current_job_id=running.job_id if running else "")
        session = WorkerSession(info=info, attempt=running.attempt if running else 0)
        self.sessions[reg.worker_id] = session
        self.store.save_worker(info)
        session.send(registered=pb.Registered(heartbeat_seconds=max(self.heartbeat_timeout / 4, 0.2)))
        log.info("worker %s attached (%s, %s, model %s%s)", info.id, info.host, info.device, info.model.name,
                 f", still rendering job {running.job_id} attempt {running.attempt}" if running else "")
        return session, old

    def current(self, session: WorkerSession) -> bool:
        """Whether `session` is still its worker's (not replaced by a newer registration, not detached)."""
        return self.sessions.get(session.info.id) is session

    def detach(self, worker_id: str, reason: str, session: WorkerSession | None = None) -> str | None:
        """Marks the worker LOST and closes its stream; returns the job it was on ('' if none),
        or None when it was not attached (or `session`, if given, is no longer its session)."""
        if session is not None and not self.current(session):
            return None
        session = self.sessions.pop(worker_id, None)
        if session is None:
            return None
        session.outbox.put_nowait(None)
        session.info.state = pb.LOST
        job_id, session.info.current_job_id = session.info.current_job_id, ""
        self.store.save_worker(session.info)
        log.warning("worker %s lost: %s", worker_id, reason)
        return job_id

    def seen(self, session: WorkerSession) -> bool:
        """A message came on `session`: its worker is alive. False when the session is no longer current."""
        if not self.current(session):
            return False
        session.last_seen = time.monotonic()
        return True

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
        """Idle workers of `model` that may be placed (not kept out for failing)."""
        now = time.monotonic()
        return sorted(wid for wid, s in self.sessions.items() if s.info.state == pb.IDLE
                      and s.info.model.name == model and self.kept_out_until.get(wid, 0.0) <= now)

    def failed(self, worker_id: str) -> None:
        """The worker failed an attempt of its own: after FAILURES_TO_QUARANTINE within the
        window it is kept out of placement for QUARANTINE_S."""
        now = time.monotonic()
        recent = [t for t in self.failures.get(worker_id, []) if now - t < FAILURE_WINDOW_S] + [now]
        self.failures[worker_id] = recent
        if len(recent) >= FAILURES_TO_QUARANTINE:
            self.kept_out_until[worker_id] = now + QUARANTINE_S
            self.failures[worker_id] = []
            log.warning("worker %s failed %d attempts: kept out of placement for %gs", worker_id, len(recent),
                        QUARANTINE_S)

    def infos(self, worker_ids: list[str]) -> list[pb.WorkerInfo]:
        return [self.sessions[w].info for w in worker_ids]

    def assign(self, job_id: str, plan: pb.RenderPlan, members: list[str]) -> None:
        """Makes the members BUSY and sends each its rank of the plan."""
        for rank, wid in enumerate(members):
            session = self.sessions[wid]
            session.info.state = pb.BUSY
            session.info.current_job_id, session.attempt = job_id, plan.attempt
            self.store.save_worker(session.info)
            session.send(assignment=pb.Assignment(job_id=job_id, plan=plan, rank=rank, attempt=plan.attempt))

    def release(self, worker_id: str, job_id: str, attempt: int) -> None:
        """The worker reported its result for that attempt of the job: it is IDLE again."""
        session = self.sessions.get(worker_id)
        if session is not None and (session.info.current_job_id, session.attempt) == (job_id, attempt):
            session.info.state = pb.IDLE
            session.info.current_job_id, session.attempt = "", 0
            self.store.save_worker(session.info)

    def cancel(self, job_id: str, worker_ids, attempt: int, abort: bool = False) -> None:
        """Tells the attached ones among `worker_ids` to stop that attempt of the job (`abort`:
        leave the collectives now, a member is gone)."""
        for wid in worker_ids:
            if wid in self.sessions:
                self.sessions[wid].send(cancel=pb.Cancel(job_id=job_id, attempt=attempt, abort=abort))

    def broker_rendezvous(self, worker_id: str, ready: pb.StoreReady, members: list[str]) -> None:
        """Rank 0 (only) hosts the job's store: every member learns where to meet."""
        if members[0] != worker_id:
            return
        host = self.sessions[worker_id].info.host
        for wid in members:
            if wid in self.sessions:
                self.sessions[wid].send(rendezvous=pb.Rendezvous(job_id=ready.job_id, host=host, port=ready.port))
