"""Prometheus metrics of the coordinator: on the HTTP port at /metrics (or `--metrics-port`).

What the coordinator sees: jobs by state and the queue depth (read from the store at each
scrape), job and step durations by strategy and model, data-plane bytes and comm seconds the
workers report, their peak memory, frames encoded, workers by state, RPCs by method and code.
The names are the contract docs/grafana-clipmesh.json queries (a test checks each one exists).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from clipmesh.v1 import clipmesh_pb2 as pb

REGISTRY = CollectorRegistry()
_BY = ("strategy", "model")
JOB_SECONDS = Histogram("clipmesh_job_duration_seconds", "Wall time of finished jobs, from placement to the end",
                        [*_BY, "state"], registry=REGISTRY, buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))
STEP_SECONDS = Histogram("clipmesh_step_duration_seconds", "Seconds of one denoising step on one worker",
                         _BY, registry=REGISTRY, buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 15, 60))
DATA_PLANE_BYTES = Counter("clipmesh_data_plane_bytes", "Bytes the workers report moving between each other",
                           ["direction"], registry=REGISTRY)
COMM_SECONDS = Counter("clipmesh_comm_seconds", "Seconds the workers report spending in collectives",
                       registry=REGISTRY)
# not clipmesh_worker_peak_memory_bytes: that name is the worker's own (worker/metrics.py), and
# one name exported by both would be summed twice
PEAK_MEMORY = Gauge("clipmesh_reported_peak_memory_bytes", "Peak memory a worker reported in its last step",
                    ["worker"], registry=REGISTRY)
FRAMES_ENCODED = Counter("clipmesh_frames_encoded", "Frames received into jobs' videos", registry=REGISTRY)
RPCS = Counter("clipmesh_rpcs", "gRPC calls handled", ["method", "code"], registry=REGISTRY)


def step(progress: pb.StepProgress, plan: pb.RenderPlan) -> None:
    STEP_SECONDS.labels(plan.strategy, plan.request.model).observe(progress.seconds)
    DATA_PLANE_BYTES.labels("sent").inc(progress.bytes_sent)
    DATA_PLANE_BYTES.labels("received").inc(progress.bytes_received)
    COMM_SECONDS.inc(progress.comm_seconds)
    if progress.peak_memory_bytes:
        PEAK_MEMORY.labels(progress.worker_id).set(progress.peak_memory_bytes)


def job_ended(job: pb.Job) -> None:
    if job.HasField("started_at"):
        seconds = (job.finished_at.ToNanoseconds() - job.started_at.ToNanoseconds()) / 1e9
        JOB_SECONDS.labels(job.strategy, job.request.model, pb.JobState.Name(job.state)).observe(seconds)


class StoreCollector:
    """Gauges read at scrape time: jobs by state (the queue depth is QUEUED), workers by state."""

    def __init__(self, core):
        self.core = core

    def collect(self):
        jobs = GaugeMetricFamily("clipmesh_jobs", "Jobs in the store by state", labels=["state"])
        for state in (pb.QUEUED, pb.RUNNING, pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
            jobs.add_metric([pb.JobState.Name(state)], self.core.store.count_jobs(state))
        yield jobs
        queue = GaugeMetricFamily("clipmesh_queue_depth", "Jobs waiting to be placed")
        queue.add_metric([], self.core.store.count_jobs(pb.QUEUED))
        yield queue
        workers = GaugeMetricFamily("clipmesh_workers", "Workers known to the coordinator by state", labels=["state"])
        counts = {state: 0 for state in (pb.IDLE, pb.BUSY, pb.LOST)}
        for info in self.core.list_workers():
            counts[info.state] = counts.get(info.state, 0) + 1
        for state, count in counts.items():
            workers.add_metric([pb.WorkerState.Name(state)], count)
        yield workers


def watch_store(core) -> None:
    """Registers the scrape-time gauges of this coordinator (once per process)."""
    if not getattr(REGISTRY, "_clipmesh_store", None):
        REGISTRY.register(StoreCollector(core))
        REGISTRY._clipmesh_store = True
