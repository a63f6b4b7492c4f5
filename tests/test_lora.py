"""Per-job LoRA (issue 24): a tiny LoRA made here with peft on tiny-wan's transformer and saved
with diffusers' own `WanPipeline.save_lora_weights`; a worker holding it (`--lora-dir`) runs a
job naming it equal to diffusers' pipeline with the same LoRA loaded and set (1 and 2 workers,
and 2 with sharded weights, within 1e-5), the video changes, and the next job without it is the base model again. Through a
real coordinator and worker: the worker reports what it holds, a LoRA no worker holds is refused
at submit naming the field, and jobs with it succeed from the openai SDK's extra field and the
CLI's --lora."""

from __future__ import annotations

import grpc
import pytest
import torch

from clipmesh import presets
from clipmesh.plan import num_latent_frames
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from conftest import planned, wait_until
from ranks import run_ranks, single_thread_model, solo_mesh

FRAMES, SIDE, STEPS, GUIDANCE, SEED, SCALE = 9, 32, 3, 5.0, 21, 0.7
TOL = 1e-5


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """style.safetensors: rank-4 adapters on every attention projection, B not zero (peft's
    default zero B would be the base model), saved the way diffusers saves a Wan LoRA."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("loras")
    transformer = WanPipeline.from_pretrained(presets.model_folder("tiny-wan")).transformer
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    WanPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                  weight_name="style.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


def _request(workers: int, loras=()) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", num_frames=FRAMES,
                               height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                               seed=SEED, model="tiny-wan", strategy="exact", num_workers=workers, loras=list(loras))


def _stock(with_lora: bool, lora_dir) -> torch.Tensor:
    """diffusers' WanPipeline from the same noise, the LoRA loaded and set as diffusers does it."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(presets.model_folder("tiny-wan"))
    if with_lora:
        pipe.load_lora_weights(str(lora_dir / "style.safetensors"), adapter_name="style")
        pipe.set_adapters(["style"], [SCALE])
    noise = initial_noise(SEED, 0, num_latent_frames(FRAMES, 4), 16, SIDE // 8, SIDE // 8)
    return pipe(prompt="a lighthouse at dusk", negative_prompt="blurry", latents=noise, height=SIDE, width=SIDE,
                num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").frames


def _ranks(mesh, lora_dir, plan_bytes):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model = load_adapter(presets.model_folder("tiny-wan"), "cpu", torch.float32, lora_dir=lora_dir)
    return denoise(model, pb.RenderPlan.FromString(plan_bytes), mesh.rank, mesh).numpy()


def test_a_job_with_a_lora_equals_diffusers_with_it_and_the_next_job_is_the_base(lora_dir):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    style = [pb.LoraRef(name="style", scale=SCALE)]
    with_lora, base = _stock(True, lora_dir), _stock(False, lora_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_adapter(presets.model_folder("tiny-wan"), "cpu", torch.float32, lora_dir=lora_dir)
        assert model.loras.names == ["broken", "style"]
        with solo_mesh("lora-one") as mesh:
            ours = denoise(model, planned(_request(1, style), 1, "lora-a"), 0, mesh)
            after = denoise(model, planned(_request(1), 1, "lora-b"), 0, mesh)
            with pytest.raises(ValueError, match="loras: 'broken' does not fit"):
                denoise(model, planned(_request(1, [pb.LoraRef(name="broken", scale=1.0)]), 1, "lora-c"), 0, mesh)
            with pytest.raises(ValueError, match="loras: 'absent' is not held here"):
                denoise(model, planned(_request(1, [pb.LoraRef(name="absent", scale=1.0)]), 1, "lora-d"), 0, mesh)
    finally:
        torch.set_num_threads(threads)
    assert (with_lora - base).abs().max().item() > 1e-3  # the LoRA changes the video
    assert (ours - with_lora).abs().max().item() <= TOL
    assert (after - base).abs().max().item() <= TOL  # the adapters are off for a job without them

    # 2 workers; and 2 with sharded weights: the per-job copy is made after the adapters are set
    for shard in (False, True):
        req = _request(2, style)
        req.shard_weights = shard
        plan = planned(req, 2, f"lora-two-{shard}")
        out = run_ranks(_ranks, 2, str(lora_dir), plan.SerializeToString(), group=f"lora-two-{shard}")
        for rank, latents in out.items():
            assert (torch.from_numpy(latents) - with_lora).abs().max().item() <= TOL, (shard, rank)


def test_loras_through_a_real_worker_and_the_cli(daemons, lora_dir, tmp_path):
    from conftest import TOKEN
    from test_generate import run_cli

    import openai

    port_file = tmp_path / "http.port"
    daemons.coordinator("--http", "127.0.0.1:0", "--http-port-file", str(port_file))
    daemons.worker("l0", "tiny-wan", 1, 1.0, "--lora-dir", str(lora_dir))
    client = daemons.client()
    daemons.wait_idle(client, {"l0"})
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port_file.read_text()}/v1", api_key=TOKEN, max_retries=0)
    video = sdk.videos.create(prompt="a cat", model="tiny-wan", size=f"{SIDE}x{SIDE}", extra_body={
        "num_frames": FRAMES, "steps": 1, "loras": [{"name": "style", "scale": 0.5}]})
    assert [(r.name, r.scale) for r in client.get(video.id).request.loras] == [("style", 0.5)]
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.videos.create(prompt="a cat", model="tiny-wan", size=f"{SIDE}x{SIDE}",
                          extra_body={"num_frames": FRAMES, "loras": [{"scale": 1}]})
    assert bad.value.body["param"] == "loras"
    assert list(client.workers()[0].loras) == ["broken", "style"]
    with pytest.raises(grpc.RpcError) as err:
        client.submit("a cat", num_frames=FRAMES, height=SIDE, width=SIDE, loras=[pb.LoraRef(name="anime", scale=1)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("loras: 'anime' is held by no worker serving tiny-wan"), err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.submit("a cat", num_frames=FRAMES, loras=[pb.LoraRef(name="style", scale=float("nan"))])
    assert err.value.details().startswith("loras[0].scale:")
    wait_until(lambda: client.get(video.id).state in (pb.SUCCEEDED, pb.FAILED), 120, "the SDK's job", daemons)
    proc = run_cli(["submit", "a lighthouse at dusk", "--address", daemons.address, "--token", TOKEN, "--frames",
                    str(FRAMES), "--height", str(SIDE), "--width", str(SIDE), "--steps", "2", "--num-workers", "1",
                    "--lora", f"style:{SCALE}"], tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    wait_until(lambda: client.get(job_id).state in (pb.SUCCEEDED, pb.FAILED), 120, "the LoRA job", daemons)
    job = client.get(job_id)
    assert job.state == pb.SUCCEEDED, job.error
    assert [(ref.name, round(ref.scale, 3)) for ref in job.request.loras] == [("style", SCALE)]
