"""Prometheus metrics of a worker daemon (`--metrics-port`): what it rendered, as it reports it
to the coordinator, scraped where it runs (per GPU)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
STEPS = Counter("clipmesh_worker_steps", "Denoising steps this worker ran", ["strategy"], registry=REGISTRY)
STEP_SECONDS = Histogram("clipmesh_worker_step_duration_seconds", "Seconds of one step on this worker", ["strategy"],
                         registry=REGISTRY, buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 15, 60))
DATA_PLANE_BYTES = Counter("clipmesh_worker_data_plane_bytes", "Bytes this worker moved to and from its peers",
                           ["direction"], registry=REGISTRY)
COMM_SECONDS = Counter("clipmesh_worker_comm_seconds", "Seconds this worker spent in collectives", registry=REGISTRY)
PEAK_MEMORY = Gauge("clipmesh_worker_peak_memory_bytes", "Peak memory of this worker's last step", registry=REGISTRY)
JOBS = Counter("clipmesh_worker_jobs", "Job attempts this worker ended, by outcome", ["outcome"], registry=REGISTRY)
BUSY = Gauge("clipmesh_worker_busy", "1 while this worker renders a job", registry=REGISTRY)


def step(report, strategy: str) -> None:
    STEPS.labels(strategy).inc()
    STEP_SECONDS.labels(strategy).observe(report.seconds)
    DATA_PLANE_BYTES.labels("sent").inc(report.bytes_sent)
    DATA_PLANE_BYTES.labels("received").inc(report.bytes_received)
    COMM_SECONDS.inc(report.comm_seconds)
    if report.peak_memory_bytes:
        PEAK_MEMORY.set(report.peak_memory_bytes)


def serve(port: int, host: str = "0.0.0.0") -> None:
    start_http_server(port, addr=host, registry=REGISTRY)
