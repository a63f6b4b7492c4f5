"""Hosts that are really separate: the coordinator and each worker in a network namespace of its
own, joined by a bridge, on addresses that exist only in this test's namespaces. The rendezvous
and the data plane must use the advertised addresses; cutting one worker's link mid-job fails
the job cleanly within the configured timeouts, and the other worker is free again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from clipmesh.client import Client
from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import TOKEN, WORKER_TOKEN, wait_until

SUBNET = "10.213.{}.{}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _namespaces_possible() -> str:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2)"
    name = f"cmprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot make a network namespace here: {exc}"
    return ""


class Hosts:
    """A bridge in this namespace and one namespace per host, each with a veth on the bridge."""

    def __init__(self, count: int):
        self.tag = uuid.uuid4().hex[:5]
        self.net = int(self.tag, 16) % 200 + 20  # a /24 of 10.213.x of this test alone
        self.bridge = f"cmbr{self.tag}"
        self.names = [f"cm{self.tag}h{i}" for i in range(count)]
        self.addresses = [SUBNET.format(self.net, i + 1) for i in range(count)]
        self.links = [f"cm{self.tag}v{i}" for i in range(count)]  # the bridge side of each host's veth
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{SUBNET.format(self.net, 254)}/24", "dev", self.bridge)  # the test's own door
        _ip("link", "set", self.bridge, "up")
        for name, address, link in zip(self.names, self.addresses, self.links):
            _ip("netns", "add", name)
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("link", "set", link, "master", self.bridge, "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def run(self, host: int, args: list[str], log) -> subprocess.Popen:
        env = {**os.environ, "CLIPMESH_CLIENT_TOKEN": TOKEN, "CLIPMESH_WORKER_TOKEN": WORKER_TOKEN}
        return subprocess.Popen(["ip", "netns", "exec", self.names[host], sys.executable, "-m", "clipmesh.cli", *args],
                                stdout=log, stderr=log, env=env)

    def cut(self, host: int) -> None:
        _ip("link", "set", self.links[host], "down")

    def remove(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def hosts():
    why = _namespaces_possible()
    if why:
        pytest.skip(why)
    made = Hosts(3)
    yield made
    made.remove()


def test_a_job_across_namespaces_then_a_cut_link_fails_it_cleanly(hosts, tmp_path):
    procs, logs = [], {}

    def start(host: int, name: str, *args: str) -> None:
        logs[name] = tmp_path / f"{name}.log"
        procs.append(hosts.run(host, list(args), open(logs[name], "ab")))

    try:
        coordinator = hosts.addresses[0]
        start(0, "coordinator", "coordinator", "--listen", f"{coordinator}:50051", "--data", str(tmp_path / "data"),
              "--heartbeat-timeout", "4", "--collective-timeout", "20")
        for i in (1, 2):
            start(i, f"w{i}", "worker", "--coordinator", f"{coordinator}:50051", "--model", "tiny-wan", "--name",
                  f"w{i}", "--threads", "1", "--speed", "1", "--advertise-host", hosts.addresses[i])

        def dump() -> str:
            return "\n".join(f"--- {n}\n{p.read_text(errors='replace')[-2500:]}" for n, p in logs.items())

        with Client(f"{coordinator}:50051", TOKEN) as client:
            wait_until(lambda: {w.id for w in client.workers() if w.state == pb.IDLE} == {"w1", "w2"}, 120,
                       "both workers idle across namespaces")
            hosts_seen = {w.id: w.host for w in client.workers()}
            assert hosts_seen == {"w1": hosts.addresses[1], "w2": hosts.addresses[2]}

            job = client.submit("across hosts", num_frames=17, num_workers=2, strategy="clip_parallel",
                                num_inference_steps=2, max_attempts=1)
            wait_until(lambda: client.get(job.id).state == pb.SUCCEEDED, 120, "the 2-worker job", None)
            assert client.get(job.id).video_frames == 17, dump()

            # a long one, then w2's link goes down mid-job
            job = client.submit("cut mid-job", num_frames=33, num_workers=2, strategy="clip_parallel",
                                num_inference_steps=200, max_attempts=1)
            steps = []
            for event in client.watch(job.id):
                if event.HasField("step"):
                    steps.append(event.step.worker_id)
                if {"w1", "w2"} <= set(steps):
                    break
            hosts.cut(2)
            cut_at = time.monotonic()
            wait_until(lambda: client.get(job.id).state == pb.FAILED, 60, f"the cut job to fail\n{dump()}")
            failed_after = time.monotonic() - cut_at
            assert "w2" in client.get(job.id).error, client.get(job.id).error
            wait_until(lambda: {w.id: w.state for w in client.workers()} == {"w1": pb.IDLE, "w2": pb.LOST}, 60,
                       f"w1 idle again, w2 lost\n{dump()}")
            assert failed_after < 4 + 20, failed_after  # the heartbeat timeout, well inside the collective's
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
