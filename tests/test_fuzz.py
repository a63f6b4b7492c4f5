"""A bounded, seeded fuzz of a real coordinator daemon: every field of SubmitJobRequest and its
options (hypothesis), random bytes on every method of both services, Attach streams that
misbehave, UploadFrames with wrong sizes, ids and ranges. Never an UNKNOWN or INTERNAL code,
no crash, no job accepted outside the limits, the coordinator's memory bounded, no traceback
in its log; and a real job afterwards still succeeds on a real worker."""

from __future__ import annotations

import math
import random
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipmesh import presets, specs
from clipmesh.auth import metadata
from clipmesh.client import Client
from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import TOKEN, WORKER_TOKEN, Daemons, wait_until
from fake_worker import FakeWorker, call_raw, drain

pytestmark = pytest.mark.slow
BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CREDENTIAL = {"Coordinator": TOKEN, "WorkerGateway": WORKER_TOKEN}
TRIED: dict[str, int] = {}
INT32 = st.integers(-2 ** 31, 2 ** 31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


def optional(strategy):
    return st.one_of(st.none(), strategy)


def _options(message, fields: dict):
    return st.builds(lambda **kw: message(**{k: v for k, v in kw.items() if v is not None}),
                     **{name: optional(s) for name, s in fields.items()})


VALID = dict(prompt="a cat", num_frames=17, height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
             fps=8.0, seed=0, model="tiny-wan", strategy="", num_workers=0)
FUZZED = dict(
    prompt=st.one_of(st.text(max_size=50), st.text(min_size=1990, max_size=2100)),
    negative_prompt=st.text(max_size=30),
    num_frames=st.one_of(INT32, st.sampled_from([0, 1, 5, 17, 33, 1025, 1029, 100_001])),
    height=st.one_of(INT32, st.sampled_from([16, 32, 48, 64, 512, 528])),
    width=st.one_of(INT32, st.sampled_from([16, 32, 48, 64, 512, 528])),
    num_inference_steps=st.one_of(INT32, st.integers(0, 210)),
    guidance_scale=FLOATS, fps=FLOATS, seed=st.integers(-2 ** 63, 2 ** 63 - 1),
    model=st.one_of(st.sampled_from([*presets.PRESETS, "", "/etc", "../x"]), st.text(max_size=20)),
    strategy=st.one_of(st.sampled_from(["", *specs.STRATEGY_SPECS]), st.text(max_size=12)),
    num_workers=st.one_of(INT32, st.integers(-1, 300)),
    clip_parallel=_options(pb.ClipParallelOptions, dict(
        local_halo=st.one_of(INT32, st.integers(-1, 8)), global_frames=st.one_of(INT32, st.integers(-1, 8)),
        global_phase=FLOATS, phase_bias=FLOATS, entropy_scaling=st.booleans(), noise_reschedule=st.booleans(),
        spectral_blend=st.booleans(), global_rope=st.one_of(st.text(max_size=12), st.sampled_from(
            specs.GLOBAL_ROPE_POLICIES)))),
    block_pipeline=_options(pb.BlockPipelineOptions, dict(block_frames=st.one_of(INT32, st.integers(-1, 8)),
                                                          context_frames=st.one_of(INT32, st.integers(-1, 8)))),
    savers=_options(pb.SaverOptions, dict(slice_chunks=st.one_of(INT32, st.integers(-1, 9)),
                                          step_cache=st.one_of(st.text(max_size=16), st.sampled_from(
                                              ["off", "fbc:0.05", "taylorseer:3", "teacache:0.1"])),
                                          tiled_decode=st.booleans())),
    checkpoint_every=INT32, max_attempts=INT32,
)
# each field valid or fuzzed (so that some requests get far enough to be accepted, or refused late)
REQUESTS = st.builds(
    lambda **kw: pb.SubmitJobRequest(**{k: v for k, v in kw.items() if v is not None}),
    **{field: st.one_of(st.just(VALID.get(field)), fuzz) for field, fuzz in FUZZED.items()})


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    d = Daemons(tmp_path_factory.mktemp("fuzz"))
    d.coordinator("--heartbeat-timeout", "60", "--register-timeout", "2")
    yield d
    d.stop()


def rss_bytes(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def within_limits(job: pb.Job) -> bool:
    """An accepted job, checked against the model's limits independently of validate.py."""
    r, m = job.request, pb.ModelInfo(**presets.model_limits(job.request.model))
    frames_ok = r.num_frames == 0 or (1 <= r.num_frames <= 100_001 and (r.num_frames - 1) % m.temporal_stride == 0)
    return (frames_ok and all(m.spatial_multiple <= v <= m.max_side and v % m.spatial_multiple == 0
                              for v in (r.height, r.width))
            and 1 <= r.num_inference_steps <= 200 and math.isfinite(r.guidance_scale) and 0 <= r.guidance_scale <= 50
            and 1 <= r.fps <= 120 and r.seed >= 0 and 0 <= r.num_workers <= 256
            and 0 < len(r.prompt) <= 2000 and r.prompt.strip() != "")


def test_submit_job_fields(coordinator):
    accepted = []
    with coordinator.client() as client:
        @settings(max_examples=300, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(REQUESTS)
        def submit(request):
            TRIED["SubmitJob fields"] = TRIED.get("SubmitJob fields", 0) + 1
            try:
                job = client._call(client._stub.SubmitJob, request)
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), \
                    (exc.code(), exc.details(), request)
                assert len(exc.details()) < 1100
                return
            assert within_limits(job), job.request
            accepted.append(job.id)
            client.cancel(job.id)  # no worker is attached: it stays queued until then

        submit()
    print(f"SubmitJob: {TRIED['SubmitJob fields']} requests, {len(accepted)} accepted (all within the limits)")


def test_random_bytes_on_every_method(coordinator):
    rng = random.Random(20261201)
    worker = FakeWorker(coordinator.address, "fuzz-session")  # a live session key, so bytes reach the handlers
    codes: dict[str, set] = {}
    with grpc.insecure_channel(coordinator.address) as channel:
        for service in pb.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                for i in range(40):
                    payload = [rng.randbytes(rng.choice([1, 3, 17, 200, 5000])) for _ in range(rng.randint(1, 3))]
                    code = call_raw(channel, service.full_name, method, payload, CREDENTIAL[service.name],
                                session=worker.session_key if i % 2 else "", timeout=3.0)
                    codes.setdefault(method.name, set()).add(code)
                    TRIED["random bytes"] = TRIED.get("random bytes", 0) + 1
    worker.close()
    print(f"random bytes: {TRIED['random bytes']} calls, codes {dict(sorted((m, sorted(c.name for c in cs)) for m, cs in codes.items()))}")
    assert not any(BROKEN & c for c in codes.values()), codes


def test_misbehaving_attach_streams_and_uploads(coordinator):
    rng = random.Random(7)
    gateway = pb.DESCRIPTOR.services_by_name["WorkerGateway"]
    with grpc.insecure_channel(coordinator.address) as channel:
        attach = channel.stream_stream(f"/{gateway.full_name}/Attach", request_serializer=pb.WorkerMessage.SerializeToString,
                                       response_deserializer=pb.CoordinatorMessage.FromString)
        # never registers: closed by the coordinator (register timeout), not held forever
        silent = threading.Event()
        outcome = {}

        def never_register():
            try:
                for _ in attach(iter(silent.wait, True), metadata=metadata(WORKER_TOKEN), timeout=30):
                    pass
            except grpc.RpcError as exc:
                outcome["code"] = exc.code()
        waiter = threading.Thread(target=never_register)
        waiter.start()

        # registers twice, sends results and progress for jobs it does not have, floods progress
        register = pb.WorkerMessage(register=pb.Register(worker_id="noisy", incarnation=1, speed=1.0,
                                                         model=pb.ModelInfo(**presets.model_limits("tiny-wan"))))
        noise = [register, register]
        noise += [pb.WorkerMessage(result=pb.JobResult(job_id=f"job-{i}", outcome=rng.choice(range(6)),
                                                       attempt=rng.randint(-5, 5))) for i in range(50)]
        noise += [pb.WorkerMessage(progress=pb.StepProgress(step=i, total_steps=rng.randint(-1, 9), rank=rng.randint(-3, 3),
                                                            attempt=1)) for i in range(2000)]
        noise += [pb.WorkerMessage(store_ready=pb.StoreReady(job_id="nope", port=rng.randint(0, 70000), attempt=1))]
        noise += [pb.WorkerMessage(log=pb.LogMessage(text="x" * 10_000))] * 20
        TRIED["attach messages"] = len(noise) + 1
        inbox = __import__("queue").Queue()
        stream = attach(iter(noise), metadata=metadata(WORKER_TOKEN), timeout=20)
        drain(stream, inbox)
        waiter.join(40)
        silent.set()
        assert outcome.get("code") == grpc.StatusCode.INVALID_ARGUMENT, outcome  # closed after the register timeout

    # uploads with wrong sizes, ids, ranges from a worker with a job of its own
    worker = FakeWorker(coordinator.address, "uploader")
    with Client(coordinator.address, TOKEN) as client:
        job = client.submit("for the uploads", num_frames=9, height=32, width=48, num_inference_steps=2,
                            strategy="exact", num_workers=1)
        worker.expect("assignment")
        codes = set()
        for i in range(150):
            first, end = rng.randint(-5, 12), rng.randint(-5, 14)
            try:
                worker.upload(rng.choice([job.id, "nope", ""]), first, max(end, first + rng.randint(-2, 3)),
                              attempt=rng.choice([worker.attempts[job.id], 0, 99]))
                codes.add(grpc.StatusCode.OK)
            except (grpc.RpcError, ValueError) as exc:
                codes.add(exc.code() if isinstance(exc, grpc.RpcError) else "client-side")
            TRIED["uploads"] = TRIED.get("uploads", 0) + 1
        assert not BROKEN & codes, codes
        client.cancel(job.id)
    worker.close()
    print(f"attach: {TRIED['attach messages']} messages; uploads: {TRIED['uploads']}, codes "
          f"{sorted(str(c) for c in codes)}")


def test_afterwards_memory_is_bounded_the_log_clean_and_a_real_job_succeeds(coordinator):
    pid = coordinator.coordinator_proc.pid
    rss = rss_bytes(pid)
    assert rss < 600 * 2 ** 20, f"coordinator RSS {rss / 2 ** 20:.0f} MiB after the fuzz"
    coordinator.worker("real-worker", "tiny-wan")
    with coordinator.client() as client:
        wait_until(lambda: "real-worker" in {w.id for w in client.workers() if w.state == pb.IDLE}, 120,
                   "the real worker", coordinator)
        job = client.submit("after the fuzz", num_frames=9, height=32, width=32, num_inference_steps=2, num_workers=1)
        wait_until(lambda: client.get(job.id).state in (pb.SUCCEEDED, pb.FAILED), 120, "the real job", coordinator)
        assert client.get(job.id).state == pb.SUCCEEDED, client.get(job.id).error
    log = (coordinator.tmp / "coordinator.log").read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    print(f"cases tried: {sum(TRIED.values())} ({TRIED}); coordinator RSS {rss / 2 ** 20:.0f} MiB")
