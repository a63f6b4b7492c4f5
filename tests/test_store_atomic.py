"""A job's row and its event log never disagree, whenever the coordinator dies: a child process
runs the real core (real SQLite) through state changes as fast as it can and is killed with
SIGKILL at seeded random moments; after each kill the store is opened again and every job's
state must be the state its last StateChange event says."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

CHURN = r"""
import asyncio, sys
from pathlib import Path
from clipmesh.coordinator.core import CoordinatorCore
from clipmesh.v1 import clipmesh_pb2 as pb

async def churn():
    core = CoordinatorCore(Path(sys.argv[1]))
    print("ready", flush=True)
    while True:
        job = await core.submit(pb.SubmitJobRequest(prompt="p", num_frames=17, height=64, width=64,
                                                    num_inference_steps=2, guidance_scale=1.0, fps=8,
                                                    model="tiny-wan"))
        await core.cancel(job.id)

asyncio.run(churn())
"""


def _disagreements(data) -> list[str]:
    from clipmesh.coordinator.store import Store

    store = Store(data / "clipmesh.db")
    try:
        bad = []
        for job in store.list_jobs(1_000_000):
            states = [e.state.state for e in store.events_after(job.id, 0) if e.HasField("state")]
            if not states or states[-1] != job.state:
                bad.append(f"{job.id}: row {job.state}, events {states}")
        return bad
    finally:
        store.close()


def test_state_and_event_are_written_together(tmp_path):
    rng, jobs_seen = random.Random(20261205), 0
    for kill in range(25):
        child = subprocess.Popen([sys.executable, "-c", CHURN, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        bad = _disagreements(tmp_path)
        assert not bad, f"after kill {kill + 1}: {bad[:3]}"
    from clipmesh.coordinator.store import Store

    store = Store(tmp_path / "clipmesh.db")
    jobs_seen = len(store.list_jobs(1_000_000))
    store.close()
    assert jobs_seen > 100  # the kills landed among many state changes
