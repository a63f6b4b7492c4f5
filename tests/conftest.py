"""Shared fixtures: real coordinator daemons on free loopback ports, real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# `import clipmesh` turns gRPC's fork handlers off (shared/__init__.py): the tests fork ffmpeg too
from clipmesh import presets
from clipmesh.client import Client
from clipmesh.local import stop_processes
from clipmesh.v1 import clipmesh_pb2 as pb

# Modules of fast unit tests (no daemon, no rank process, no model): `pytest -m unit` runs them
# in seconds; a module joins the list once it stays so.
UNIT_MODULES = {"test_cli_input", "test_compose", "test_core", "test_families", "test_k8s", "test_planner", "test_plots", "test_progress", "test_specs",
                "test_stubs", "test_toyworld", "test_validation"}

TOKEN = "test-token"                # a client's
WORKER_TOKEN = "test-worker-token"  # the workers'


class Daemons:
    """Starts `clipmesh coordinator` / `clipmesh worker` as real processes; kills them at teardown."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        env = {**os.environ, "CLIPMESH_CLIENT_TOKEN": TOKEN, "CLIPMESH_WORKER_TOKEN": WORKER_TOKEN}
        proc = subprocess.Popen([sys.executable, "-m", "clipmesh.cli", *args], stdout=log, stderr=log, env=env)
        self.procs.append(proc)
        return proc

    def coordinator(self, *extra: str, port: int = 0) -> str:
        """Starts the coordinator on `port` (0: a free one), on this test's data folder: started
        again with the same port, it is the restart of the same coordinator."""
        port_file = self.tmp / "port"
        port_file.unlink(missing_ok=True)
        self.coordinator_proc = self.spawn("coordinator", "coordinator", "--listen", f"127.0.0.1:{port}", "--data",
                                           str(self.tmp / "data"), "--port-file", str(port_file), *extra)
        wait_until(port_file.exists, 30, "coordinator port file")
        self.address = f"127.0.0.1:{port_file.read_text()}"
        return self.address

    def worker(self, name: str, model: str = "tiny-wan", threads: int = 1, speed: float = 1.0,
               *extra: str) -> subprocess.Popen:
        # A fixed speed keeps clip splits reproducible (a measured one varies with machine load).
        return self.spawn(name, "worker", "--coordinator", self.address, "--model", model, "--name", name,
                          "--threads", str(threads), "--speed", str(speed), *extra)

    def client(self) -> Client:
        return Client(self.address, TOKEN)

    def wait_idle(self, client: Client, names: set[str], timeout: float = 120) -> None:
        wait_until(lambda: names <= {w.id for w in client.workers() if w.state == pb.IDLE}, timeout,
                   f"workers {sorted(names)} idle", self)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))

    def stop(self) -> None:
        stop_processes(self.procs)


def planned(req: pb.SubmitJobRequest, world_size: int, job_id: str, speeds=None, **fields) -> pb.RenderPlan:
    """The real planner's plan of `req` on `world_size` workers, of equal speed unless `speeds`
    says (the planner splits by speed: how a test asks for an uneven split); `fields` then set
    on the plan (a resumed step, say)."""
    from clipmesh.coordinator.planner import make_plan

    speeds = speeds or [1.0] * world_size
    plan = make_plan(pb.Job(id=job_id, request=req), [pb.WorkerInfo(id=f"w{r}", speed=s) for r, s in enumerate(speeds)],
                     pb.ModelInfo(**presets.model_limits(req.model)), 60)
    for name, value in fields.items():
        setattr(plan, name, value)
    return plan


def wait_until(ready, timeout: float, what: str, daemons: Daemons | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{daemons.logs() if daemons else ''}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def tiny_wan_folder() -> Path:
    """Builds the tiny preset once per test session (cached on disk across sessions)."""
    return presets.model_folder("tiny-wan")


@pytest.fixture
def daemons(tmp_path):
    d = Daemons(tmp_path)
    yield d
    d.stop()


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)
