"""`clipmesh generate`: the embedded default. Starts a coordinator and K local workers,
renders one job with progress, writes the video, and stops everything again.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clipmesh import progress
from clipmesh.auth import TLS
from clipmesh.client import Client
from clipmesh.v1 import clipmesh_pb2 as pb

START_TIMEOUT = 600.0  # seconds for workers to load the model and attach


class LocalCluster:
    """A coordinator and `num_workers` worker processes on this machine; stopped on exit, also on Ctrl-C."""

    def __init__(self, model: str, num_workers: int, data_dir: Path, lora_dir: Path | None = None):
        self.model, self.num_workers, self.data_dir, self.lora_dir = model, num_workers, data_dir, lora_dir
        # one token per role, via the environment: never visible in `ps`
        self.token, self.worker_token = secrets.token_hex(16), secrets.token_hex(16)
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.data_dir / f"{name}.log", "wb")
        env = {**os.environ, "CLIPMESH_CLIENT_TOKEN": self.token, "CLIPMESH_WORKER_TOKEN": self.worker_token}
        # own session: a terminal's Ctrl-C reaches only `generate`, which still needs the
        # coordinator to cancel a stream and fetch what it kept; stop() ends them
        proc = subprocess.Popen([sys.executable, "-m", "clipmesh.cli", *args], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs.append((name, proc))

    def __enter__(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        port_file, http_port_file = self.data_dir / "coordinator.port", self.data_dir / "http.port"
        self._spawn("coordinator", "coordinator", "--listen", "127.0.0.1:0", "--data", str(self.data_dir),
                    "--port-file", str(port_file), "--http", "127.0.0.1:0", "--http-port-file", str(http_port_file))
        self._wait(lambda: port_file.exists(), 60, "the coordinator to listen")
        self.address = f"127.0.0.1:{port_file.read_text()}"
        self.http = f"http://127.0.0.1:{http_port_file.read_text()}"  # written before the gRPC port
        self.client = Client(self.address, self.token, TLS())

    def start_workers(self) -> None:
        threads = max(1, (os.cpu_count() or 1) // self.num_workers)
        for i in range(self.num_workers):
            # Equal threads on one machine: equal speed by construction (a measurement taken while
            # the others are still loading would only see start-up noise and skew the split).
            self._spawn(f"worker-{i}", "worker", "--coordinator", self.address, "--model", self.model,
                        "--name", f"local-{i}", "--threads", str(threads), "--advertise-host", "127.0.0.1",
                        "--speed", "1", *(("--lora-dir", str(self.lora_dir)) if self.lora_dir else ()))
        self._wait(lambda: len(self.client.workers()) >= self.num_workers,
                   START_TIMEOUT, f"{self.num_workers} workers to load {self.model} and attach")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    tail = (self.data_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with code {proc.returncode} while waiting for {what}:\n{tail}")
            try:
                if ready():
                    return
            except Exception:  # the coordinator may not answer yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_processes([proc for _, proc in self.procs])

    def __exit__(self, *exc) -> None:
        if hasattr(self, "client"):
            self.client.close()
        self.stop()


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 15) -> None:
    """SIGTERM every one, then SIGKILL what is still alive after `grace_s`: none is left behind."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _keep_stream(client, job_id: str, output: Path) -> None:
    job = client.cancel(job_id)
    if job.video_size:
        client.fetch(job_id, output)
        print(f"wrote {output} ({job.video_frames} frames finished before the stop, {job.video_size} bytes)")


def generate(prompt: str, fields: dict, output: Path, keep_data: Path | None = None,
             lora_dir: Path | None = None) -> int:
    from clipmesh import presets

    num_workers = fields["num_workers"]
    t0 = time.monotonic()
    # Build a preset once here rather than racing to build it in every worker.
    print(f"preparing model {fields['model']} ...", file=sys.stderr)
    presets.model_folder(fields["model"])
    data_dir = Path(keep_data) if keep_data else Path(tempfile.mkdtemp(prefix="clipmesh-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with LocalCluster(fields["model"], num_workers, data_dir, lora_dir) as cluster:
            # Submit before starting workers: a bad request fails in a second, not after model loading.
            job = cluster.client.submit(prompt, **fields)
            print(f"job {job.id} queued on coordinator {cluster.address} (HTTP: {cluster.http}/v1/videos); "
                  f"starting {num_workers} workers", file=sys.stderr)
            cluster.start_workers()
            try:
                state = progress.follow(cluster.client.watch(job.id), world_size=num_workers,
                                        num_frames=fields["num_frames"])
            except KeyboardInterrupt:
                if fields["num_frames"] == 0:  # an endless stream ends here: keep what it finished
                    _keep_stream(cluster.client, job.id, output)
                raise
            job = cluster.client.get(job.id)
            if state != pb.SUCCEEDED:
                print(f"clipmesh: job {job.id} {progress.STATE_NAMES[job.state]}: {job.error}", file=sys.stderr)
                return 1
            size = cluster.client.fetch(job.id, output)
        print(f"wrote {output}: \"{prompt}\" ({fields['model']}, {fields['num_frames']} frames "
              f"{fields['width']}x{fields['height']}, {size} bytes) "
              f"in {time.monotonic() - t0:.1f}s")
        return 0
    finally:
        if not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
