"""Every invalid field of SubmitJobRequest is refused with INVALID_ARGUMENT naming the field,
through a real coordinator daemon; the coordinator keeps serving and accepts a good job after."""

import grpc
import pytest

from clipmesh.v1 import clipmesh_pb2 as pb

BAD_FIELDS = [
    ("prompt", dict(prompt="  ")),
    ("prompt", dict(prompt="x" * 2001)),
    ("negative_prompt", dict(negative_prompt="x" * 2001)),
    ("num_frames", dict(num_frames=0, strategy="exact")),  # only block_pipeline streams unbounded
    ("num_frames", dict(num_frames=100_005, strategy="block_pipeline")),  # over the streaming cap
    ("num_frames", dict(num_frames=10)),          # not 4k+1
    ("num_frames", dict(num_frames=100_001)),
    ("height", dict(height=60)),                   # not a multiple of 16
    ("height", dict(height=0)),
    ("width", dict(width=100_000)),
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("num_inference_steps", dict(num_inference_steps=1000)),
    ("guidance_scale", dict(guidance_scale=-1.0)),
    ("guidance_scale", dict(guidance_scale=float("nan"))),
    ("fps", dict(fps=0.0)),
    ("fps", dict(fps=1000.0)),
    ("seed", dict(seed=-5)),
    ("model", dict(model="no-such-model")),
    ("strategy", dict(strategy="warp-drive")),
    ("clip_parallel.local_halo", dict(clip_parallel=pb.ClipParallelOptions(local_halo=0))),
    ("clip_parallel.global_frames", dict(clip_parallel=pb.ClipParallelOptions(global_frames=-1))),
    ("clip_parallel.global_phase", dict(clip_parallel=pb.ClipParallelOptions(global_phase=1.5))),
    ("clip_parallel.phase_bias", dict(clip_parallel=pb.ClipParallelOptions(phase_bias=float("inf")))),
    ("block_pipeline.block_frames", dict(block_pipeline=pb.BlockPipelineOptions(block_frames=0))),
    ("block_pipeline.context_frames", dict(block_pipeline=pb.BlockPipelineOptions(block_frames=2, context_frames=3))),
    ("num_workers", dict(num_workers=5, strategy="block_pipeline")),  # tiny-wan has 4 layers to split
    ("num_workers", dict(num_workers=3, strategy="ulysses")),  # tiny-wan has 2 attention heads to split
    ("num_workers", dict(num_workers=-1)),
    ("num_workers", dict(num_workers=6)),         # 17 frames = 5 latent frames: at most 5 workers
    # a job's mesh (issue 22): each refusal names the combination
    ("cfg_parallel", dict(cfg_parallel=True, guidance_scale=1.0)),   # no guidance: nothing to split
    ("num_workers", dict(cfg_parallel=True, num_workers=3)),         # 2 branches x N/2
    ("num_workers", dict(cfg_parallel=True, num_workers=12)),        # 2 x 5 latent frames at most
    ("num_workers", dict(cfg_parallel=True, num_workers=6, strategy="ulysses")),  # 3 per branch: 2 heads
    ("shard_weights", dict(shard_weights=True, strategy="block_pipeline")),
]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    from conftest import Daemons

    d = Daemons(tmp_path_factory.mktemp("validation"))
    d.coordinator()
    yield d
    d.stop()


@pytest.mark.parametrize("field,override", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)])
def test_invalid_field_is_refused_with_its_name(coordinator, field, override):
    fields = dict(prompt="a cat", num_frames=17)
    fields.update(override)
    prompt = fields.pop("prompt")
    with coordinator.client() as client:
        before = len(client.jobs())
        with pytest.raises(grpc.RpcError) as err:
            client.submit(prompt, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:"), err.value.details()
        assert len(client.jobs()) == before  # nothing was queued, and the coordinator still serves


def test_coordinator_serves_after_bad_requests_and_accepts_a_good_one(coordinator):
    with coordinator.client() as client:
        before = len(client.jobs())
        with pytest.raises(grpc.RpcError):
            client.submit("a cat", num_frames=10)
        job = client.submit("a cat", num_frames=17)
        assert job.state == pb.QUEUED  # no worker attached: it waits
        assert [j.id for j in client.jobs()][0] == job.id
        assert len(client.jobs()) == before + 1
        cancelled = client.cancel(job.id)
        assert cancelled.state == pb.CANCELLED


def test_missing_token_is_unauthenticated(coordinator):
    from clipmesh.client import Client

    with Client(coordinator.address, token="wrong") as client:
        with pytest.raises(grpc.RpcError) as err:
            client.jobs()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_are_served(coordinator):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(coordinator.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"clipmesh.v1.Coordinator", "clipmesh.v1.WorkerGateway"} <= names
