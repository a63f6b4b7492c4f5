"""SQLite store for jobs, their events and the worker registry (one file, WAL).

Rows hold serialized protobuf messages: the .proto stays the single source of
truth for what a job or an event is; columns exist only for what we query on.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from clipmesh.v1 import clipmesh_pb2 as pb

FINAL_STATES = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    ord INTEGER NOT NULL,          -- FIFO order of submission
    state INTEGER NOT NULL,
    job BLOB NOT NULL,             -- clipmesh.v1.Job
    owner TEXT NOT NULL DEFAULT '' -- Job.owner: a client lists its own jobs
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, ord);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,           -- clipmesh.v1.JobEvent
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    info BLOB NOT NULL             -- clipmesh.v1.WorkerInfo
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    plan BLOB NOT NULL,            -- clipmesh.v1.RenderPlan
    members TEXT NOT NULL,         -- worker ids in rank order, comma-separated
    PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS checkpoint_parts (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    latent_start INTEGER NOT NULL,
    latent_end INTEGER NOT NULL,
    size INTEGER NOT NULL,
    path TEXT NOT NULL,            -- the part's file, written to a temp name and renamed
    PRIMARY KEY (job_id, step, latent_start)
);
"""


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


class Store:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if "owner" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:  # a store from before
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, ord)")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self):
        """What is written inside commits together or not at all (outside one, every statement
        commits alone). Nested: the outermost one decides."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def change_state(self, job: pb.Job, event: pb.JobEvent) -> pb.JobEvent:
        """The job's row and the event that says so, in one transaction: a crash between them
        cannot leave a row whose state its event log does not end in."""
        with self.transaction():
            self.save_job(job)
            return self.append_event(event)

    # -- jobs -------------------------------------------------------------
    def create_job(self, request: pb.SubmitJobRequest, owner: str = "") -> pb.Job:
        """A QUEUED job and its first event (QUEUED, "accepted"), in one transaction."""
        job = pb.Job(id=uuid.uuid4().hex[:12], state=pb.QUEUED, request=request, created_at=now_ts(), owner=owner)
        with self.transaction():
            (ord_,) = self._db.execute("SELECT COALESCE(MAX(ord), 0) + 1 FROM jobs").fetchone()
            self._db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?)",
                             (job.id, ord_, job.state, job.SerializeToString(), owner))
            self.append_event(pb.JobEvent(job_id=job.id, state=pb.StateChange(state=pb.QUEUED, detail="accepted")))
        return job

    def save_job(self, job: pb.Job) -> None:
        self._db.execute("UPDATE jobs SET state = ?, job = ? WHERE id = ?", (job.state, job.SerializeToString(), job.id))

    def get_job(self, job_id: str) -> pb.Job | None:
        row = self._db.execute("SELECT job FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return pb.Job.FromString(row[0]) if row else None

    def list_jobs(self, limit: int, owner: str | None = None) -> list[pb.Job]:
        """The newest `limit` jobs, of `owner` only where given."""
        if owner is None:
            rows = self._db.execute("SELECT job FROM jobs ORDER BY ord DESC LIMIT ?", (limit,))
        else:
            rows = self._db.execute("SELECT job FROM jobs WHERE owner = ? ORDER BY ord DESC LIMIT ?", (owner, limit))
        return [pb.Job.FromString(r[0]) for r in rows]

    def count_jobs(self, state: int) -> int:
        return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0]

    def final_jobs(self) -> list[pb.Job]:
        rows = self._db.execute(f"SELECT job FROM jobs WHERE state IN ({','.join('?' * len(FINAL_STATES))})",
                                FINAL_STATES)
        return [pb.Job.FromString(r[0]) for r in rows]

    def delete_job(self, job_id: str) -> None:
        """The job and everything of it (retention)."""
        with self.transaction():
            for table in ("jobs", "events", "attempts", "checkpoint_parts"):
                self._db.execute(f"DELETE FROM {table} WHERE {'id' if table == 'jobs' else 'job_id'} = ?", (job_id,))

    def queued_jobs(self, page: int = 256) -> Iterator[pb.Job]:
        """QUEUED jobs oldest first, read a page at a time: a pass that stops early reads little,
        and each page is a fresh query (the pass may change jobs between pages)."""
        last = 0
        while rows := self._db.execute("SELECT ord, job FROM jobs WHERE state = ? AND ord > ? ORDER BY ord LIMIT ?",
                                       (pb.QUEUED, last, page)).fetchall():
            yield from (pb.Job.FromString(blob) for _, blob in rows)
            last = rows[-1][0]

    def jobs_in_state(self, state: int) -> list[pb.Job]:
        rows = self._db.execute("SELECT job FROM jobs WHERE state = ? ORDER BY ord", (state,))
        return [pb.Job.FromString(r[0]) for r in rows]

    # -- events -----------------------------------------------------------
    def append_event(self, event: pb.JobEvent) -> pb.JobEvent:
        """Assigns the next sequence number of the job and stores the event."""
        (seq,) = self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (event.job_id,)
        ).fetchone()
        event.seq = seq
        event.time.CopyFrom(now_ts())
        self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (event.job_id, seq, event.SerializeToString()))
        return event

    def events_after(self, job_id: str, seq: int) -> list[pb.JobEvent]:
        rows = self._db.execute("SELECT event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq))
        return [pb.JobEvent.FromString(r[0]) for r in rows]

    # -- attempts -----------------------------------------------------------
    def save_attempt(self, job_id: str, plan: pb.RenderPlan, members: list[str]) -> None:
        self._db.execute("INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?)",
                         (job_id, plan.attempt, plan.SerializeToString(), ",".join(members)))

    def last_attempt(self, job_id: str) -> tuple[pb.RenderPlan, list[str]] | None:
        row = self._db.execute("SELECT plan, members FROM attempts WHERE job_id = ? ORDER BY attempt DESC LIMIT 1",
                               (job_id,)).fetchone()
        return (pb.RenderPlan.FromString(row[0]), row[1].split(",")) if row else None

    # -- checkpoint parts ---------------------------------------------------
    def add_checkpoint_part(self, job_id: str, step: int, start: int, end: int, size: int, path: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO checkpoint_parts VALUES (?, ?, ?, ?, ?, ?)",
                         (job_id, step, start, end, size, path))

    def checkpoint_parts(self, job_id: str, step: int | None = None) -> list[tuple[int, int, int, int, str]]:
        """(step, start, end, size, path) of the job's parts (of one step), by step and start."""
        query, args = "SELECT step, latent_start, latent_end, size, path FROM checkpoint_parts WHERE job_id = ?", [job_id]
        if step is not None:
            query, args = query + " AND step = ?", [job_id, step]
        return [tuple(r) for r in self._db.execute(query + " ORDER BY step, latent_start", args)]

    def drop_checkpoint_parts(self, job_id: str, below_step: int | None = None) -> None:
        if below_step is None:
            self._db.execute("DELETE FROM checkpoint_parts WHERE job_id = ?", (job_id,))
        else:
            self._db.execute("DELETE FROM checkpoint_parts WHERE job_id = ? AND step < ?", (job_id, below_step))

    # -- workers ----------------------------------------------------------
    def save_worker(self, info: pb.WorkerInfo) -> None:
        self._db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?)", (info.id, info.SerializeToString()))

    def list_workers(self) -> list[pb.WorkerInfo]:
        return [pb.WorkerInfo.FromString(r[0]) for r in self._db.execute("SELECT info FROM workers ORDER BY id")]
