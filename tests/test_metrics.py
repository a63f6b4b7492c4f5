"""Prometheus metrics, scraped from a real coordinator (its HTTP port, /metrics) and a real
worker (--metrics-port) during and after a job: the counters move, and every metric the Grafana
dashboard in docs/ queries exists."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipmesh.client import Client

from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import wait_until

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-clipmesh.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def test_counters_move_during_a_job_and_the_dashboard_queries_only_real_metrics(daemons):
    http_port_file, worker_port = daemons.tmp / "http.port", free_port()
    daemons.coordinator("--http", "127.0.0.1:0", "--http-port-file", str(http_port_file))
    daemons.worker("m0", "tiny-wan", 1, 1.0, "--metrics-port", str(worker_port))
    coordinator_url, worker_url = f"http://127.0.0.1:{http_port_file.read_text()}/metrics", \
        f"http://127.0.0.1:{worker_port}/metrics"
    with daemons.client() as client:
        daemons.wait_idle(client, {"m0"})
        before = scrape(coordinator_url)
        job = client.submit("measured", num_frames=17, num_inference_steps=30, num_workers=1)
        wait_until(lambda: total(scrape(worker_url), "clipmesh_worker_steps_total") > 0, 120, "a step", daemons)
        during = scrape(worker_url)
        assert total(during, "clipmesh_worker_busy") == 1  # scraped while it renders
        assert total(scrape(coordinator_url), "clipmesh_jobs", state="RUNNING") == 1
        wait_until(lambda: client.get(job.id).state == pb.SUCCEEDED, 180, "the job", daemons)
    with Client(daemons.address, "wrong") as stranger, pytest.raises(grpc.RpcError):
        stranger.jobs()
    after, worker = scrape(coordinator_url), scrape(worker_url)
    assert total(after, "clipmesh_rpcs_total", method="ListJobs", code="UNAUTHENTICATED") == 1
    assert total(after, "clipmesh_rpcs_total", method="SubmitJob", code="OK") == \
        total(before, "clipmesh_rpcs_total", method="SubmitJob", code="OK") + 1
    assert total(after, "clipmesh_step_duration_seconds_count") >= 30
    assert total(after, "clipmesh_frames_encoded_total") == 17
    assert total(after, "clipmesh_jobs", state="SUCCEEDED") == 1
    assert total(after, "clipmesh_job_duration_seconds_count", state="SUCCEEDED") == 1
    assert total(after, "clipmesh_workers", state="IDLE") == 1
    assert total(worker, "clipmesh_worker_steps_total") == 30
    assert total(worker, "clipmesh_worker_jobs_total", outcome="JOB_OUTCOME_DONE") == 1
    assert total(worker, "clipmesh_worker_busy") == 0

    # one owner per name: a Grafana sum over both scrapes must not count a metric twice
    family = lambda scraped: {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n, _ in scraped}  # noqa: E731
    assert not family(after) & family(worker), family(after) & family(worker)
    assert total(after, "clipmesh_reported_peak_memory_bytes", worker="m0") > 0

    exposed = {name for name, _ in {**after, **worker}}
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exposed} | exposed
    queried = {m for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]
               for m in re.findall(r"clipmesh_[a-z_]+", t["expr"])}
    assert queried and queried <= exposed | families, queried - exposed - families
    assert queried >= {"clipmesh_queue_depth", "clipmesh_rpcs_total", "clipmesh_worker_steps_total"}
