"""A small synchronous Python client over the generated stubs, for the CLI and other services."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc

from clipmesh.auth import TLS, channel, metadata
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
UNARY_DEADLINE = 30.0  # seconds; streams (watch, fetch) run as long as the job

# Defaults a client fills in; the server validates whatever arrives.
REQUEST_DEFAULTS = dict(negative_prompt="", num_frames=17, height=64, width=64, num_inference_steps=8,
                        guidance_scale=5.0, seed=0, model="tiny-wan", strategy="", num_workers=0, fps=8.0)


class Client:
    def __init__(self, address: str = "", token: str | None = None, tls: TLS | None = None):
        """`token`, `tls`: a client's (or admin's) credential; None reads CLIPMESH_TOKEN and
        CLIPMESH_TLS_CA / _CERT / _KEY."""
        self.address = address or os.environ.get("CLIPMESH_COORDINATOR", DEFAULT_ADDRESS)
        self._metadata = metadata(os.environ.get("CLIPMESH_TOKEN", "") if token is None else token)
        self._channel = channel(self.address, TLS.from_env() if tls is None else tls)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        return method(request, timeout=UNARY_DEADLINE, metadata=self._metadata)

    def submit(self, prompt: str, **fields) -> pb.Job:
        return self._call(self._stub.SubmitJob, pb.SubmitJobRequest(prompt=prompt, **{**REQUEST_DEFAULTS, **fields}))

    def get(self, job_id: str) -> pb.Job:
        return self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def preview(self, job_id: str) -> pb.Preview:
        """The newest frame a running job has received (Preview.png); NOT_FOUND before and after."""
        return self._call(self._stub.GetPreview, pb.GetPreviewRequest(job_id=job_id))

    def jobs(self, limit: int = 0) -> list[pb.Job]:
        return list(self._call(self._stub.ListJobs, pb.ListJobsRequest(limit=limit)).jobs)

    def workers(self) -> list[pb.WorkerInfo]:
        return list(self._call(self._stub.ListWorkers, pb.ListWorkersRequest()).workers)

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id))

    def watch(self, job_id: str) -> Iterator[pb.JobEvent]:
        return self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=self._metadata)

    def fetch(self, job_id: str, path: Path) -> int:
        """Streams the video into `path` (via a temp name); returns its size."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        size = 0
        with open(tmp, "wb") as f:
            for chunk in self._stub.FetchVideo(pb.FetchVideoRequest(job_id=job_id), metadata=self._metadata):
                f.write(chunk.data)
                size += len(chunk.data)
        tmp.replace(path)
        return size

    def wait_for_workers(self, count: int, timeout: float) -> list[pb.WorkerInfo]:
        """Polls until `count` workers are attached and idle."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                idle = [w for w in self.workers() if w.state == pb.IDLE]
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                idle = []
            if len(idle) >= count:
                return idle
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(idle)} of {count} workers attached after {timeout:g}s")
            time.sleep(0.2)
