"""Trust boundaries through a real coordinator daemon: roles per credential on every RPC, a
client's jobs are its own, no frames injected into another's job, malformed bytes are a clean
INVALID_ARGUMENT, and a whole job over mTLS through the CLI with real workers."""

from __future__ import annotations

import grpc
import imageio.v3 as iio
import pytest

from clipmesh import cli, presets
from clipmesh.auth import TLS
from clipmesh.client import Client
from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import WORKER_TOKEN, wait_until
from fake_worker import HEIGHT, WIDTH, FakeWorker, assert_frames_in_order, call_raw

CLIENTS = "alice:tok-alice,bob:tok-bob"
CREDENTIALS = {"none": "", "unknown": "tok-nobody", "client": "tok-alice", "admin": "tok-ops",
               "worker": WORKER_TOKEN}
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SMALL = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, fps=8.0)


@pytest.fixture
def secured(daemons):
    daemons.coordinator("--heartbeat-timeout", "120", "--client-token", CLIENTS, "--admin-token", "ops:tok-ops")
    return daemons


def test_every_rpc_takes_only_its_roles_credential(secured):
    table = {}
    with grpc.insecure_channel(secured.address) as channel:
        for service in pb.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                table[service.name, method.name] = {who: call_raw(channel, service.full_name, method, [b""], token)
                                                    for who, token in CREDENTIALS.items()}
    print("\n| RPC | " + " | ".join(CREDENTIALS) + " |")
    for (service, method), row in table.items():
        print(f"| {service}.{method} | " + " | ".join(code.name for code in row.values()) + " |")
    for (service, method), row in table.items():
        own = ("client", "admin") if service == "Coordinator" else ("worker",)
        assert row["none"] == row["unknown"] == grpc.StatusCode.UNAUTHENTICATED, (method, row)
        for who in ("client", "admin", "worker"):
            if who in own:
                assert row[who] not in BROKEN | {grpc.StatusCode.UNAUTHENTICATED}, (method, who, row)
            else:
                assert row[who] == grpc.StatusCode.PERMISSION_DENIED, (method, who, row)
        if service == "Coordinator":  # a client's own call gets past the door (the gateway's want a session)
            assert row["client"] not in REFUSED, (method, row)


def test_a_clients_jobs_are_its_own_and_an_admin_sees_all(secured, tmp_path):
    with Client(secured.address, "tok-alice") as alice, Client(secured.address, "tok-bob") as bob, \
            Client(secured.address, "tok-ops") as admin:
        job = alice.submit("alice's secret prompt", num_frames=17)
        assert job.owner == "alice" and alice.get(job.id).request.prompt == "alice's secret prompt"
        for attempt in (lambda: bob.get(job.id), lambda: list(bob.watch(job.id)), lambda: bob.cancel(job.id),
                        lambda: bob.fetch(job.id, tmp_path / "v.mp4")):
            with pytest.raises(grpc.RpcError) as err:
                attempt()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        bobs = bob.submit("bob's", num_frames=17)
        assert [j.id for j in bob.jobs()] == [bobs.id]  # alice's is not listed
        assert [j.id for j in alice.jobs()] == [job.id]
        assert {j.id for j in admin.jobs()} == {job.id, bobs.id}
        assert admin.cancel(job.id).state == pb.CANCELLED
        assert alice.get(job.id).state == pb.CANCELLED


def test_no_one_but_the_assigned_member_uploads_into_a_running_job(secured, tmp_path):
    member = FakeWorker(secured.address, "member")
    with Client(secured.address, "tok-alice") as alice:
        job = alice.submit("victim", num_frames=9, strategy="exact", num_workers=1, **SMALL)
        member.expect("assignment")
        intruder = FakeWorker(secured.address, "aaa-intruder")  # attached, idle, not the job's
        probes = {
            "a client's token": lambda: intruder.upload(job.id, 0, 9, token="tok-alice", white=True),
            "another worker's own session": lambda: intruder.upload(job.id, 0, 9, white=True,
                                                                    attempt=member.attempts[job.id]),
            "another worker claiming the member's id": lambda: intruder.upload(job.id, 0, 9, worker_id="member",
                                                                               white=True,
                                                                               attempt=member.attempts[job.id]),
            "a worker token without a session": lambda: intruder.upload(job.id, 0, 9, worker_id="member",
                                                                        session_key="", white=True),
            "a guessed session key": lambda: intruder.upload(job.id, 0, 9, worker_id="member",
                                                             session_key="x" * 32, white=True),
        }
        for what, probe in probes.items():
            with pytest.raises(grpc.RpcError) as err:
                probe()
            assert err.value.code() in REFUSED, (what, err.value.code(), err.value.details())
        assert member.upload(job.id, 0, 9) == 9
        member.send(result=pb.JobResult(job_id=job.id, outcome=pb.JOB_OUTCOME_DONE))
        wait_until(lambda: alice.get(job.id).state == pb.SUCCEEDED, 30, "the victim's job to succeed", secured)
        alice.fetch(job.id, tmp_path / "v.mp4")
        assert_frames_in_order(tmp_path / "v.mp4", 9)  # its own colours: not one white frame got in
        intruder.close()
    member.close()


def test_a_member_uploads_only_its_own_ranks_frames(secured):
    ranks = [FakeWorker(secured.address, f"rank-{i}") for i in range(2)]
    with Client(secured.address, "tok-alice") as alice:
        job = alice.submit("two clips", num_frames=17, strategy="clip_parallel", num_workers=2, **SMALL)
        plans = {w.name: w.expect("assignment") for w in ranks}
        by_rank = sorted(ranks, key=lambda w: plans[w.name].rank)
        clips = [(c.start, c.end) for c in plans["rank-0"].plan.clips]
        # frames of latent frames [a, b) of a Wan VAE (x4 in time): frame 0 alone, then 4 per latent frame
        frames = [(0 if a == 0 else 4 * (a - 1) + 1, 4 * (b - 1) + 1) for a, b in clips]
        with pytest.raises(grpc.RpcError) as err:
            by_rank[0].upload(job.id, *frames[1])  # the other rank's clip
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        for worker, (first, end) in zip(by_rank, frames):
            assert worker.upload(job.id, first, end) == end - first
    for w in ranks:
        w.close()


def test_malformed_bytes_are_invalid_argument_without_a_traceback(secured):
    submit = pb.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name["SubmitJob"]
    attach = pb.DESCRIPTOR.services_by_name["WorkerGateway"].methods_by_name["Attach"]
    with grpc.insecure_channel(secured.address) as channel:
        for _ in range(40):
            assert call_raw(channel, "clipmesh.v1.Coordinator", submit, [b"\xff\xff\xff"], "tok-alice") == \
                grpc.StatusCode.INVALID_ARGUMENT
        assert call_raw(channel, "clipmesh.v1.WorkerGateway", attach, [b"\x0a\xff"], WORKER_TOKEN) == \
            grpc.StatusCode.INVALID_ARGUMENT
    with Client(secured.address, "tok-alice") as alice:
        assert alice.submit("still serving", num_frames=17).state == pb.QUEUED
    log = (secured.tmp / "coordinator.log").read_text()
    assert "Traceback" not in log and "DecodeError" not in log
    assert 1 <= log.count("bad request to") <= 5  # 41 bad requests, a line a second at most


def test_a_job_over_mtls_through_the_cli(daemons, tmp_path, capsys):
    certs = tmp_path / "certs"
    assert cli.main(["certs", "--out", str(certs), "--workers", "w0,w1", "--clients", "alice"]) == 0
    assert (certs / "ca.pem").is_file() and str(certs / "worker-w1-key.pem") in capsys.readouterr().out

    def tls(stem: str) -> list[str]:
        return ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / f"{stem}.pem"),
                "--tls-key", str(certs / f"{stem}-key.pem")]

    http_port = daemons.tmp / "http.port"
    daemons.coordinator(*tls("coordinator"), "--http", "127.0.0.1:0", "--http-port-file", str(http_port))
    for name in ("w0", "w1"):
        daemons.worker(name, "tiny-wan", 1, 1.0, *tls(f"worker-{name}"))
    alice = TLS(str(certs / "ca.pem"), str(certs / "client-alice.pem"), str(certs / "client-alice-key.pem"))
    with Client(daemons.address, "", alice) as client:
        wait_until(lambda: {w.id for w in client.workers() if w.state == pb.IDLE} == {"w0", "w1"}, 120,
                   "both mTLS workers idle", daemons)
    address = ["--address", daemons.address, *tls("client-alice")]
    assert cli.main(["submit", "over TLS", "--frames", "17", "--num-workers", "2", "--watch", *address]) == 0
    job_id = capsys.readouterr().out.split()[0]
    assert cli.main(["fetch", job_id, "--output", str(tmp_path / "v.mp4"), *address]) == 0
    assert iio.imread(tmp_path / "v.mp4").shape[0] == 17

    # no certificate: no connection; a client's certificate cannot attach; a worker's names only itself
    with Client(daemons.address, "", TLS(str(certs / "ca.pem"))) as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            anonymous.jobs()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(daemons.address, alice.channel_credentials()) as ch:
        attach = pb.DESCRIPTOR.services_by_name["WorkerGateway"].methods_by_name["Attach"]
        assert call_raw(ch, "clipmesh.v1.WorkerGateway", attach, [b""], "") == grpc.StatusCode.PERMISSION_DENIED
    # the HTTP side is HTTPS with the same CA: alice's certificate is her credential there too
    import ssl
    import urllib.request
    https = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    https.load_cert_chain(str(certs / "client-alice.pem"), str(certs / "client-alice-key.pem"))
    with urllib.request.urlopen(f"https://127.0.0.1:{http_port.read_text()}/v1/videos", context=https) as listed:
        assert job_id in listed.read().decode()
    with pytest.raises(OSError):  # no client certificate: no handshake
        urllib.request.urlopen(f"https://127.0.0.1:{http_port.read_text()}/v1/videos",
                               context=ssl.create_default_context(cafile=str(certs / "ca.pem")))
    w0 = TLS(str(certs / "ca.pem"), str(certs / "worker-w0.pem"), str(certs / "worker-w0-key.pem"))
    with grpc.secure_channel(daemons.address, w0.channel_credentials()) as ch:
        register = pb.WorkerMessage(register=pb.Register(worker_id="w1", incarnation=1)).SerializeToString()
        attach = pb.DESCRIPTOR.services_by_name["WorkerGateway"].methods_by_name["Attach"]
        assert call_raw(ch, "clipmesh.v1.WorkerGateway", attach, [register], "") == grpc.StatusCode.PERMISSION_DENIED


def claim(name: str = "tiny-wan", **changes) -> pb.ModelInfo:
    info = pb.ModelInfo(**{**presets.model_limits("tiny-wan"), "name": name})
    for field, value in changes.items():
        setattr(info, field, value)
    return info


def attach_status(address: str, info: pb.ModelInfo) -> grpc.StatusCode:
    """How an Attach that registers with `info` ends (a refused one ends at once)."""
    attach = pb.DESCRIPTOR.services_by_name["WorkerGateway"].methods_by_name["Attach"]
    register = pb.WorkerMessage(register=pb.Register(worker_id="claimant", incarnation=1, model=info))
    with grpc.insecure_channel(address) as channel:
        return call_raw(channel, "clipmesh.v1.WorkerGateway", attach, [register.SerializeToString()], WORKER_TOKEN)


def test_model_limits_are_the_coordinators_not_a_workers_claim(secured):
    assert attach_status(secured.address, claim(spatial_multiple=0)) == grpc.StatusCode.INVALID_ARGUMENT
    assert attach_status(secured.address, claim(max_side=99_999)) == grpc.StatusCode.INVALID_ARGUMENT
    assert attach_status(secured.address, claim(max_side=1024)) == grpc.StatusCode.FAILED_PRECONDITION  # not the preset's
    unknown_mode = claim()
    unknown_mode.modes[:] = ["v2v"]
    assert attach_status(secured.address, unknown_mode) == grpc.StatusCode.INVALID_ARGUMENT
    with Client(secured.address, "tok-alice") as alice:
        with pytest.raises(grpc.RpcError) as err:
            alice.submit("huge", num_frames=17, height=99_984, width=99_984)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("height:")
        assert alice.submit("fine", num_frames=17).state == pb.QUEUED

        # a model the coordinator cannot read: the first live worker's claim is pinned, while it is attached
        first = FakeWorker(secured.address, "first", info=claim("custom-x"))
        assert attach_status(secured.address, claim("custom-x", spatial_multiple=32)) == \
            grpc.StatusCode.FAILED_PRECONDITION
        first.close()
        wait_until(lambda: "custom-x" not in {w.model.name for w in alice.workers() if w.state != pb.LOST}, 30,
                   "the first claimant to be gone", secured)
        second = FakeWorker(secured.address, "second", info=claim("custom-x", spatial_multiple=32))
        with pytest.raises(grpc.RpcError) as err:
            alice.submit("by the second's claim", num_frames=17, model="custom-x", height=48, width=48)
        assert "multiple of 32" in err.value.details()
        second.close()


def test_a_full_queue_refuses_and_keeps_what_it_holds(daemons):
    daemons.coordinator("--max-queued-jobs", "2")
    with daemons.client() as client:
        kept = [client.submit(f"job {i}", num_frames=17).id for i in range(2)]
        with pytest.raises(grpc.RpcError) as err:
            client.submit("one too many", num_frames=17)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [j.id for j in client.jobs()] == kept[::-1]
        client.cancel(kept[0])
        assert client.submit("room again", num_frames=17).state == pb.QUEUED


def test_watchers_unregistered_streams_and_retention_are_bounded(tmp_path):
    """In-process on a real CoordinatorCore (real SQLite, no gRPC): the limits' own logic."""
    import asyncio
    import time

    from clipmesh.coordinator.core import CoordinatorCore
    from clipmesh.coordinator.errors import InvalidArgument, NotFound, ResourceExhausted
    from clipmesh.coordinator.limits import Limits

    async def scenario():
        core = CoordinatorCore(tmp_path, limits=Limits(max_watchers_per_job=2, register_timeout_s=0.2))
        job = await core.submit(pb.SubmitJobRequest(prompt="p", num_frames=17, height=64, width=64,
                                                    num_inference_steps=2, guidance_scale=1.0, fps=8, model="tiny-wan"))
        watchers = [core.watch(job.id) for _ in range(2)]
        for w in watchers:
            await anext(w)
        with pytest.raises(ResourceExhausted):
            await anext(core.watch(job.id))
        await watchers[0].aclose()
        third = core.watch(job.id)
        assert (await anext(third)).seq == 1  # a watcher left: room for one more

        async def silent():  # an Attach stream that never registers
            await asyncio.sleep(3600)
            yield
        began = time.monotonic()
        with pytest.raises(InvalidArgument, match="register: none within 0.2s"):
            await anext(core.serve_worker(silent()))
        assert time.monotonic() - began < 2

        await core.cancel(job.id)
        for w in (watchers[1], third):
            await w.aclose()
        assert core.jobs.expire(retention_s=3600) == 0  # ended just now: kept
        assert core.store.events_after(job.id, 0)
        assert core.jobs.expire(retention_s=0.0) == 1
        with pytest.raises(NotFound):
            core.get_job(job.id)
        assert core.store.events_after(job.id, 0) == []
        core.store.close()

    asyncio.run(scenario())


def test_an_endless_jobs_uploads_stay_near_its_end_and_errors_do_not_echo_megabytes(secured):
    worker = FakeWorker(secured.address, "streamer")
    with Client(secured.address, "tok-alice") as alice:
        with pytest.raises(grpc.RpcError) as err:
            alice.submit("long name", num_frames=17, model="m" * (1 << 20))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 200
        job = alice.submit("endless", num_frames=0, strategy="block_pipeline", num_workers=1,
                           block_pipeline=pb.BlockPipelineOptions(block_frames=2, context_frames=1), **SMALL)
        worker.expect("assignment")
        with pytest.raises(grpc.RpcError) as err:
            worker.upload(job.id, 1_000_000, 1_000_004)  # far past the video's end: not held on disk
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "frames up to" in err.value.details()
        assert worker.upload(job.id, 0, 5) == 5
        assert alice.cancel(job.id).video_frames == 5
    worker.close()


def test_the_old_shared_token_alone_does_not_start_an_open_coordinator(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPMESH_")} | {"CLIPMESH_TOKEN": "shared"}
    proc = subprocess.run([sys.executable, "-m", "clipmesh.cli", "coordinator", "--listen", "127.0.0.1:0",
                           "--data", str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "CLIPMESH_CLIENT_TOKEN and CLIPMESH_WORKER_TOKEN" in proc.stderr
