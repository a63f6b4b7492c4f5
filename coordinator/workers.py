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
import hmac
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from clipmesh import presets
from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from .store import Store, now_ts
from .validate import check_model_claim

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
    key: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # Registered.session_key

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
        self.own_limits: dict[str, pb.ModelInfo | None] = {}               # model -> from its preset / folder
        self.claims: dict[str, tuple[pb.ModelInfo, set[str]]] = {}         # model -> first claim, live holders
        self.registered: dict[str, set[str]] = {}                          # model -> workers ever registered

    def recover(self) -> None:
        """After a restart no worker is attached: every known one is LOST."""
        for info in self.store.list_workers():
            self.registered.setdefault(info.model.name, set()).add(info.id)
            if info.state != pb.LOST:
                info.state = pb.LOST
                info.current_job_id = ""
                self.store.save_worker(info)

    def list(self) -> list[pb.WorkerInfo]:
        return self.store.list_workers()

    # -- models the cluster knows ---------------------------------------------
    def model_info(self, name: str) -> pb.ModelInfo | None:
        """Limits of a model, the coordinator's own: from a preset or a model folder readable
        here (configs only, no torch), else the first live worker's claim (pinned while a worker
        holding it is attached), else None (unknown)."""
        if name not in self.own_limits:
            try:
                self.own_limits[name] = pb.ModelInfo(**presets.model_limits(name))
            except (ValueError, OSError, KeyError, TypeError):
                self.own_limits[name] = None
        own = self.own_limits[name]
        claim = self.claims.get(name)
        return own if own is not None else claim[0] if claim else None

    def known_models(self) -> list[str]:
        return sorted(set(presets.PRESETS) | set(self.claims))

    def _check_claim(self, reg: pb.Register) -> None:
        """A worker's model limits must be sane, and the same as the coordinator's own or the pinned claim's."""
        check_model_claim(reg.model)
        pinned = self.model_info(reg.model.name)
        if pinned is None:
            return
        theirs, ours = (pb.ModelInfo(), pb.ModelInfo())
        theirs.CopyFrom(reg.model)
        ours.CopyFrom(pinned)
        if theirs != ours:
            differ = [f.name for f in pb.ModelInfo.DESCRIPTOR.fields if getattr(theirs, f.name) != getattr(ours, f.name)]
            source = "its preset or folder" if self.own_limits.get(reg.model.name) else "the first worker's claim"
            raise FailedPrecondition(f"register.model: {reg.model.name}'s limits are pinned from {source}; this worker "
                                     f"claims other {', '.join(differ)}: " + "; ".join(
                                         f"{f} {getattr(theirs, f)} (pinned {getattr(ours, f)})"[:200] for f in differ))

    def loras_for(self, model: str) -> set[str]:
        """The LoRA names held by the workers registered for `model`, attached or not."""
        return {name for info in self.store.list_workers() if info.model.name == model for name in info.loras}

    def holding(self, worker_ids: list[str], loras) -> list[str]:
        """Those of `worker_ids` (attached) that hold every LoRA of `loras` (LoraRef)."""
        names = {ref.name for ref in loras}
        return [w for w in worker_ids if names <= set(self.sessions[w].info.loras)]

    def registered_for(self, model: str) -> int:
        """Workers ever registered for `model` (attached or not): kept in memory, not read per submit."""
        return len(self.registered.get(model, ()))

    # -- attach, detach, heartbeats -------------------------------------------
    def attach(self, reg: pb.Register, identity: str = "") -> tuple[WorkerSession, WorkerSession | None]:
        """(the new session, the one it replaced or None). A worker still rendering a job
        (reg.running) is BUSY with it, so it is not placed before that is over. `identity`: the
        worker id its credential names ("" where it names none): the only id it may register."""
        if not reg.worker_id:
            raise InvalidArgument("register.worker_id", "must not be empty")
        if identity and reg.worker_id != identity:
            raise PermissionDenied(f"register.worker_id: this credential is worker {identity!r}'s")
        if reg.incarnation < self.incarnations.get(reg.worker_id, 0):  # an old process back from a freeze
            raise AlreadyExists(f"worker {reg.worker_id!r}: a newer process runs under this name")
        self.incarnations[reg.worker_id] = reg.incarnation
        old = self.sessions.pop(reg.worker_id, None)
        if old is not None:
            old.replaced = True
            old.outbox.put_nowait(None)
            self._drop_claim(old.info)
            log.warning("worker %s registered again: the newer session takes over", reg.worker_id)
        self._check_claim(reg)
        running = reg.running if reg.HasField("running") else None
        info = pb.WorkerInfo(id=reg.worker_id, state=pb.BUSY if running else pb.IDLE, host=reg.host,
                             device=reg.device, memory_bytes=reg.memory_bytes, denoiser_bytes=reg.denoiser_bytes,
                             threads=reg.threads, model=reg.model, loras=reg.loras,
                             speed=reg.speed, last_heartbeat=now_ts(), current_job_id=running.job_id if running else "")
        session = WorkerSession(info=info, attempt=running.attempt if running else 0)
        self.sessions[reg.worker_id] = session
        self.registered.setdefault(reg.model.name, set()).add(reg.worker_id)
        if self.own_limits.get(reg.model.name) is None:  # its claim counts while it is attached
            self.claims.setdefault(reg.model.name, (reg.model, set()))[1].add(reg.worker_id)
        self.store.save_worker(info)
        session.send(registered=pb.Registered(heartbeat_seconds=max(self.heartbeat_timeout / 4, 0.2),
                                              session_key=session.key))
        log.info("worker %s attached (%s, %s, model %s%s)", info.id, info.host, info.device, info.model.name,
                 f", still rendering job {running.job_id} attempt {running.attempt}" if running else "")
        return session, old

    def by_key(self, key: str, identity: str = "") -> WorkerSession:
        """The live session whose key a call carries; PermissionDenied for any other key (and
        where the caller's credential names another worker)."""
        session = next((s for s in self.sessions.values() if hmac.compare_digest(s.key, key)), None) if key else None
        if session is None:
            raise PermissionDenied("x-clipmesh-session: not the key of a live attach session")
        if identity and identity != session.info.id:
            raise PermissionDenied(f"x-clipmesh-session: the session of worker {session.info.id!r}, not of this "
                                   f"credential's {identity!r}")
        return session

    def _drop_claim(self, info: pb.WorkerInfo) -> None:
        claim = self.claims.get(info.model.name)
        if claim is not None:
            claim[1].discard(info.id)
            if not claim[1]:  # no live worker holds it: the next one's claim is pinned
                del self.claims[info.model.name]

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
        self._drop_claim(session.info)
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
    def idle_by_model(self) -> dict[str, list[str]]:
        """Idle workers that may be placed (not kept out for failing), by model, in name order;
        only models with some."""
        now = time.monotonic()
        idle: dict[str, list[str]] = {}
        for wid, s in sorted(self.sessions.items()):
            if s.info.state == pb.IDLE and self.kept_out_until.get(wid, 0.0) <= now:
                idle.setdefault(s.info.model.name, []).append(wid)
        return idle

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
        host, secret = self.sessions[worker_id].info.host, secrets.token_hex(16)
        for wid in members:
            if wid in self.sessions:
                self.sessions[wid].send(rendezvous=pb.Rendezvous(job_id=ready.job_id, host=host, port=ready.port,
                                                                 secret=secret))
