"""A job's mesh beyond its strategy's split (issue 22): cfg_parallel (the guidance branches on
different ranks) and shard_weights (FSDP2: every transformer block's weights sharded over the
ranks of a branch), with every frames strategy, on real gloo ranks.

The oracle: tiny-wan at 17 frames (5 latent frames, within its native length, where
clip_parallel is exact) against the stock WanPipeline from the same noise, within 1e-5, for
every mesh: cfg 2 x frames 1 and 2, sharded over 2 and 3 ranks (uneven clips and uneven
shards), and both at once on 4 ranks. Sharding must really hold a share: each rank's local
parameters during the job are measured against the whole model's, and after the job the
worker's model is whole again and untouched. Two experts (tiny-wan22) shard both experts;
UNet3D (a batched [uncond; cond] call on one rank) splits its branches and shards its down,
mid and up blocks, and equals its one-process run. A worker holding its denoiser on the host
(`--denoiser-on host`) runs each job on a copy of what its rank needs: the whole, its shards, or
its block_pipeline stage's layers (one pipeline per guidance branch under cfg_parallel).
Checkpoints resume across mesh shapes, and through real daemons the SDK's and the CLI's fields,
the planner's reason, each worker's role and a kill inside a 4-rank mesh are checked.
"""

from __future__ import annotations

import pytest
import torch

from clipmesh import presets, progress, specs
from clipmesh.plan import num_latent_frames
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from conftest import planned
from ranks import run_ranks, single_thread_model, solo_mesh

FRAMES, SIDE, STEPS, GUIDANCE, SEED = 17, 64, 3, 5.0, 77
TOL = 1e-5


def _request(model: str, strategy: str, workers: int, cfg: bool | None, shard: bool | None,
             frames: int = FRAMES, **extra) -> pb.SubmitJobRequest:
    req = pb.SubmitJobRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", num_frames=frames,
                              height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                              seed=SEED, model=model, strategy=strategy, num_workers=workers, **extra)
    if cfg is not None:
        req.cfg_parallel = cfg
    if shard is not None:
        req.shard_weights = shard
    return req


def _rank_main(mesh, folder, plan_bytes, denoiser_on="device"):
    """One rank: denoise under the plan; report its latents, its branch and, during the first
    step, the bytes of the denoisers' parameters it holds (sharded: its shards; a stage's copy
    from a host-held denoiser: its layers' and what is not a layer), and the whole's."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise, render
    from clipmesh.worker.weights import local_parameter_bytes

    plan = pb.RenderPlan.FromString(plan_bytes)
    model = load_adapter(folder, "cpu", torch.float32, denoiser_on)
    whole = [local_parameter_bytes(d) for d in model.denoisers]
    if plan.layers:  # what a stage holds of each expert: all but the other stages' blocks
        mine = plan.layers[specs.split_rank(plan, mesh.rank)]
        start, end = mine.start, mine.end
        whole = [w - sum(local_parameter_bytes(b) for i, b in enumerate(d.blocks) if not start <= i < end)
                 for w, d in zip(whole, model.denoisers)] if denoiser_on == "host" else whole
    before = [d for d in model.denoisers]
    during = []

    def on_step(report):
        if not during:
            during.extend(local_parameter_bytes(d) for d in model.denoisers)

    if plan.layers:  # block_pipeline: the finished blocks this rank hands on, (start, latents)
        blocks = []
        render(model, plan, mesh.rank, mesh, on_step=on_step, decode=False,
               on_latents=lambda piece: blocks.append((piece.start, piece.latents.numpy().copy())))
        latents = blocks
    else:
        latents = denoise(model, plan, mesh.rank, mesh, on_step=on_step).numpy()
    restored = all(a is b for a, b in zip(before, model.denoisers))
    return latents, whole, during, restored, specs.branch_of(plan, mesh.rank)


def _run(folder, req: pb.SubmitJobRequest, name: str, denoiser_on: str = "device"):
    plan = planned(req, req.num_workers, name)
    return plan, run_ranks(_rank_main, plan.world_size, str(folder), plan.SerializeToString(), denoiser_on,
                           group=name)


@pytest.fixture(scope="module")
def wan_folder():
    return presets.model_folder("tiny-wan")


@pytest.fixture(scope="module")
def wan_reference(wan_folder):
    """The stock WanPipeline on the whole video from the same noise."""
    for model in single_thread_model(wan_folder):
        cond, uncond = model.encode_prompt("a lighthouse at dusk", "blurry", GUIDANCE)
        noise = initial_noise(SEED, 0, num_latent_frames(FRAMES, 4), 16, SIDE // 8, SIDE // 8)
        return model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE,
                          width=SIDE, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          output_type="latent").frames


@pytest.mark.parametrize("strategy,workers,cfg,shard,denoiser_on", [
    ("exact", 2, True, None, "device"),            # cfg 2 x frames 1
    ("ulysses", 4, True, None, "device"),          # cfg 2 x frames 2 (heads split over 2)
    ("clip_parallel", 2, True, None, "device"),
    ("exact", 3, None, True, "device"),            # sharded over 3: uneven clips, uneven shards
    ("ulysses", 2, None, True, "device"),
    ("clip_parallel", 3, None, True, "host"),      # shards copied from a denoiser held on the host
    ("exact", 4, True, True, "device"),            # both: cfg 2 x frames 2, each branch sharded over its 2
    ("exact", 2, None, None, "host"),              # a whole copy for the job, from the host
])
def test_mesh_equals_the_stock_pipeline(wan_folder, wan_reference, strategy, workers, cfg, shard, denoiser_on):
    plan, results = _run(wan_folder, _request("tiny-wan", strategy, workers, cfg, shard),
                         f"dims-{strategy}-{workers}-{cfg}-{shard}-{denoiser_on}", denoiser_on)
    branches, ranks = specs.branches(plan), specs.split_ranks(plan)
    assert branches == (2 if cfg else 1) and plan.parallel.shard_weights == bool(shard)
    assert sorted(r[4] for r in results.values()) == sorted(r // ranks for r in range(workers))
    for rank, (latents, whole, during, restored, branch) in sorted(results.items()):
        diff = (torch.from_numpy(latents) - wan_reference).abs().max().item()
        print(f"{strategy} cfg {branches} x {ranks}{' sharded' if shard else ''} rank {rank}: max|diff| {diff:.2e}, "
              f"parameters {during[0] / whole[0]:.3f} of the model's")
        assert diff <= TOL, f"rank {rank}: {diff}"
        assert restored, "the worker's model must be whole again after a sharded job"
        if shard:  # a shard of every parameter (FSDP pads dim 0 to a multiple of the ranks)
            assert during[0] <= whole[0] / ranks * 1.05 + 4096, (during, whole)
        else:
            assert during == whole


def _checkpointed(mesh, folder, plan_bytes, resume):
    """Denoise from `resume` (checkpoint parts' bytes) at the plan's start_step, or from noise;
    the whole video's latents and the checkpoint parts this rank wrote (step, start, end, bytes)."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    written = []
    latents = denoise(load_adapter(folder, "cpu", torch.float32), pb.RenderPlan.FromString(plan_bytes), mesh.rank,
                      mesh, resume=resume, on_checkpoint=lambda p: written.append((p.step, p.start, p.end, p.data)))
    return latents.numpy(), written


def _checkpoint_run(workers: int, cfg, shard, name: str, resume_step: int = 0, parts=()):
    plan = planned(_request("tiny-wan", "exact", workers, cfg, shard, checkpoint_every=1), workers, name)
    plan.start_step = resume_step
    resume = [data for step, _, _, data in parts if step == resume_step] if resume_step else None
    out = run_ranks(_checkpointed, workers, str(presets.model_folder("tiny-wan")), plan.SerializeToString(), resume,
                    group=name)
    return torch.from_numpy(out[0][0]), {rank: written for rank, (_, written) in out.items()}


def test_a_checkpoint_resumes_on_another_mesh(wan_reference):
    """The conditional branch writes the checkpoints (the unconditional one holds the same
    latents); a checkpoint of cfg 2 x 2 sharded resumes on one plain rank, and one of 2 plain
    ranks on cfg 2 x 1 sharded, each equal to the stock pipeline within 1e-5."""
    meshed, written = _checkpoint_run(4, True, True, "ckpt-mesh")
    assert written[2] == written[3] == []  # the unconditional branch
    parts = written[0] + written[1]
    assert sorted((step, start, end) for step, start, end, _ in parts) == [(1, 0, 3), (1, 3, 5), (2, 0, 3), (2, 3, 5)]
    plain, _ = _checkpoint_run(1, None, None, "ckpt-plain-resumed", 2, parts)
    assert (plain - wan_reference).abs().max().item() <= TOL and (meshed - wan_reference).abs().max().item() <= TOL

    _, written = _checkpoint_run(2, None, None, "ckpt-plain")
    back, _ = _checkpoint_run(2, True, True, "ckpt-mesh-resumed", 1, written[0] + written[1])
    assert (back - wan_reference).abs().max().item() <= TOL


def test_two_experts_are_both_sharded():
    folder = presets.model_folder("tiny-wan22")
    req = _request("tiny-wan22", "exact", 2, None, True, guidance_scale_2=2.0)
    plan, results = _run(folder, req, "dims-wan22")
    for model in single_thread_model(folder):
        cond, uncond = model.encode_prompt("a lighthouse at dusk", "blurry", GUIDANCE)
        noise = initial_noise(SEED, 0, num_latent_frames(FRAMES, 4), 16, SIDE // 8, SIDE // 8)
        stock = model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                           num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           guidance_scale_2=2.0, output_type="latent").frames
    for rank, (latents, whole, during, restored, _) in sorted(results.items()):
        assert (torch.from_numpy(latents) - stock).abs().max().item() <= TOL
        assert len(whole) == 2 and all(d <= w / 2 * 1.05 + 4096 for d, w in zip(during, whole)), (during, whole)
        assert restored


def test_block_pipeline_stages_hold_only_their_layers_of_both_experts_and_split_the_branches():
    """A worker holding its denoiser on the host (`--denoiser-on host`): each block_pipeline
    stage runs on a copy of its own layers of both experts (on a GPU, all the device holds; on
    this CPU the host copy is whole beside it) and 2 stages equal 1 stage of the whole model;
    so does cfg 2 x 2 stages (one pipeline per guidance branch)."""
    folder = presets.model_folder("tiny-wan22")
    def video(results, branch: int = 0) -> torch.Tensor:
        blocks = sorted((b for r in results.values() if r[4] == branch for b in r[0]), key=lambda b: b[0])
        return torch.cat([torch.from_numpy(x) for _, x in blocks], dim=2)

    req = _request("tiny-wan22", "block_pipeline", 1, None, None, guidance_scale_2=2.0, frames=33,
                   block_pipeline=pb.BlockPipelineOptions(block_frames=1, context_frames=1))
    _, one = _run(folder, req, "dims-bp-one")
    req.num_workers = 2
    plan, two = _run(folder, req, "dims-bp-two", "host")
    assert [(r.start, r.end) for r in plan.layers] == [(0, 2), (2, 4)]
    assert video(two).shape[2] == 9 and (video(two) - video(one)).abs().max().item() <= TOL
    for rank, (_, held, during, restored, _) in sorted(two.items()):
        assert during == held and all(h < w * 0.75 for h, w in zip(held, one[0][1])), (during, held, one[0][1])
        assert restored

    # one pipeline per guidance branch: 2 stages each, their last stages pairing the predictions
    req.num_workers, req.cfg_parallel = 4, True
    plan, meshed = _run(folder, req, "dims-bp-cfg")
    assert specs.branches(plan) == 2 and [(r.start, r.end) for r in plan.layers] == [(0, 2), (2, 4)]
    assert (video(meshed) - video(one)).abs().max().item() <= TOL
    assert torch.equal(video(meshed, 1), video(meshed))  # both branches hold the same latents
    # runs of DECODE_RUN blocks go to the conditional branch's stages in turn (9 blocks: 3 runs)
    assert [specs.decoding_rank(plan, latent) for latent in range(9)] == [0] * 4 + [1] * 4 + [0]


def test_unet3d_branches_and_shards_equal_one_process():
    """UNet3D's one batched [uncond; cond] call, split over the branches and sharded (also from a
    host-held unet), equals the one-process run (which test_unet3d checks against
    TextToVideoSDPipeline)."""
    from clipmesh.worker.render import denoise

    folder = presets.model_folder("tiny-unet3d")
    one = _request("tiny-unet3d", "exact", 1, None, None, frames=8)
    for model in single_thread_model(folder):
        with solo_mesh("dims-unet3d-solo") as mesh:
            alone = denoise(model, planned(one, 1, "dims-unet3d-solo"), 0, mesh)
    for cfg, shard, workers, denoiser_on in ((True, None, 2, "device"), (None, True, 2, "host"),
                                             (True, True, 4, "device"), (None, None, 2, "host")):
        req = _request("tiny-unet3d", "exact", workers, cfg, shard, frames=8)
        _, results = _run(folder, req, f"dims-unet3d-{cfg}-{shard}-{denoiser_on}", denoiser_on)
        for rank, (latents, whole, during, restored, _) in sorted(results.items()):
            diff = (torch.from_numpy(latents) - alone).abs().max().item()
            assert diff <= TOL, f"cfg {cfg} shard {shard} rank {rank}: {diff}"
            assert restored and (during[0] < whole[0] * 0.6 if shard else during == whole)


MESH_WORKERS = [f"m{r}" for r in range(4)]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """A coordinator (with the Videos API; a short heartbeat timeout, so a killed worker is lost
    soon) and 4 workers, shared by the two daemon tests (one start of 4 workers, not two)."""
    from conftest import Daemons, wait_until

    farm = Daemons(tmp_path_factory.mktemp("four"))
    farm.port_file = farm.tmp / "http.port"
    farm.coordinator("--http", "127.0.0.1:0", "--http-port-file", str(farm.port_file),
                     "--heartbeat-timeout", "4", "--collective-timeout", "60")
    farm.workers = {name: farm.worker(name) for name in MESH_WORKERS}
    wait_until(farm.port_file.exists, 30, "the HTTP port", farm)
    yield farm
    farm.stop()


def _whole(farm):
    """Every one of the 4 workers alive and idle (a test that killed one leaves it dead), and a client."""
    client = farm.client()
    for name, proc in farm.workers.items():
        if proc.poll() is not None:
            farm.procs.remove(proc)
            farm.workers[name] = farm.worker(name)
    farm.wait_idle(client, set(MESH_WORKERS))
    return client


def test_a_mesh_through_real_daemons_the_sdk_and_the_cli(four, tmp_path):
    """A coordinator (with the Videos API) and 4 workers: the openai SDK asks cfg_parallel and
    shard_weights as extra fields; the job runs on cfg 2 x 2 sharded ranks, says so in its
    RUNNING event, every rank reports its steps, and its video equals the plain 2-worker job's
    (the latents agree to 1e-5: a pixel may round the other way). A mesh the request cannot
    run is refused at submit, naming the field; `clipmesh submit` takes the same flags."""
    import imageio.v3 as iio
    import openai

    from conftest import TOKEN, wait_until
    from test_generate import run_cli

    client = _whole(four)
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{four.port_file.read_text()}/v1", api_key=TOKEN, max_retries=0)
    common = dict(num_frames=9, num_inference_steps=3, guidance_scale=5.0, seed=5, height=32, width=32)
    plain = client.submit("a fox in the snow", num_workers=2, **common)
    meshed = sdk.videos.create(prompt="a fox in the snow", model="tiny-wan", size="32x32", extra_body={
        "num_frames": 9, "steps": 3, "guidance": 5.0, "seed": 5, "workers": 4,
        "cfg_parallel": True, "shard_weights": "true"})
    for job_id in (plain.id, meshed.id):
        wait_until(lambda: client.get(job_id).state in (pb.SUCCEEDED, pb.FAILED), 180, f"job {job_id}", four)
        assert client.get(job_id).state == pb.SUCCEEDED, client.get(job_id).error
    events = list(client.watch(meshed.id))
    running = next(e.state.detail for e in events if e.HasField("state") and e.state.state == pb.RUNNING)
    assert "cfg 2 x 2: asked; weights sharded: asked" in running, running
    last = {e.step.rank: e.step.role for e in events if e.HasField("step") and e.step.step == 3}
    assert last == {0: "cond, shard 1/2", 1: "cond, shard 2/2", 2: "uncond, shard 1/2", 3: "uncond, shard 2/2"}
    # the CLI's lines name each worker's place in the mesh
    assert "latent [0,2), uncond, shard 1/2" in "\n".join(progress.describe(e) for e in events)
    videos = []
    for job_id in (plain.id, meshed.id):
        client.fetch(job_id, tmp_path / f"{job_id}.mp4")
        videos.append(iio.imread(tmp_path / f"{job_id}.mp4").astype(int))
    assert videos[0].shape == videos[1].shape == (9, 32, 32, 3)
    assert abs(videos[0] - videos[1]).mean() < 0.5, abs(videos[0] - videos[1]).mean()

    with pytest.raises(openai.BadRequestError) as err:
        sdk.videos.create(prompt="a cat", model="tiny-wan", size="32x32",
                          extra_body={"num_frames": 9, "workers": 3, "cfg_parallel": True})
    assert err.value.body["param"] == "num_workers" and "even" in err.value.body["message"]
    proc = run_cli(["submit", "a cat", "--address", four.address, "--token", TOKEN, "--frames", "9",
                    "--guidance", "1", "--cfg-parallel"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cfg_parallel: needs classifier-free guidance" in proc.stderr, proc.stderr


def test_a_worker_killed_inside_a_four_rank_mesh(four):
    """cfg 2 x 2 sharded on 4 of 4 workers (num_workers 0: every idle worker, an even count);
    kill -9 of a branch-1 rank mid-job: the job resumes from the conditional branch's last
    checkpoint on the 3 left, re-planned as cfg 2 x 1, and makes the video of an unfaulted run
    of that mesh (decoded within H.264 noise: the split changed)."""
    import imageio.v3 as iio

    from conftest import wait_until

    client = _whole(four)
    job = dict(num_frames=9, height=32, width=32, num_inference_steps=30, guidance_scale=5.0, seed=8, fps=8.0,
               checkpoint_every=2, cfg_parallel=True, shard_weights=True)
    faulted = client.submit("a paper boat on a pond", num_workers=0, **job)
    for event in client.watch(faulted.id):
        if event.HasField("step") and event.step.step >= 6:
            break
    placed = client.get(faulted.id)
    assert len(placed.worker_ids) == 4
    four.workers[placed.worker_ids[3]].kill()  # rank 3: the unconditional branch's second rank
    wait_until(lambda: client.get(faulted.id).state in (pb.SUCCEEDED, pb.FAILED), 240, "the resumed job", four)
    done = client.get(faulted.id)
    assert done.state == pb.SUCCEEDED and done.attempt == 2 and len(done.worker_ids) == 2, done
    details = [e.state.detail for e in client.watch(faulted.id) if e.HasField("state") and e.state.detail]
    assert any("cfg 2 x 1: asked" in d and "resuming at step" in d for d in details), details
    want = client.submit("a paper boat on a pond", num_workers=2, **job)
    wait_until(lambda: client.get(want.id).state in (pb.SUCCEEDED, pb.FAILED), 240, "the unfaulted job", four)
    videos = []
    for job_id in (faulted.id, want.id):
        client.fetch(job_id, four.tmp / f"{job_id}.mp4")
        videos.append(iio.imread(four.tmp / f"{job_id}.mp4").astype(float))
    assert videos[0].shape == videos[1].shape and abs(videos[0] - videos[1]).mean() < 0.5
