"""What one rank runs (inside a process of bench.procs.run_ranks): the rendezvous, the plan the
coordinator would make, clipmesh's own runner, and diffusers' WanPipeline (vanilla in one
process, or its Ulysses context parallelism on W). Each runner returns a picklable dict:
wall (denoising seconds), steps [{seconds, sent, received, comm_seconds}], comm (whether the
traffic was counted), rss_loaded / rss_peak (MB), encode_s, latents (rank 0, if kept)."""

from __future__ import annotations

import time

from bench.common import GROUP_TIMEOUT_S, GUIDANCE, HOST, PROMPT, SEED
from bench.procs import maxrss_mb

DIFFUSERS_KINDS = ("vanilla", "diffusers_ulysses")  # the rest are clipmesh strategy names


def rendezvous(rank: int, world: int, port_q):
    """Rank 0 hosts the TCPStore on a free port and hands the port to the others: (store, port)."""
    from clipmesh.worker.mesh import host_store

    if rank == 0:
        store, port = host_store(HOST, timeout_s=GROUP_TIMEOUT_S)
        for _ in range(world - 1):
            port_q.put(port)
        return store, port
    return None, port_q.get(timeout=900)


def open_mesh(rank: int, world: int, port_q, group: str):
    """This rank's Mesh, everyone joined (a context manager)."""
    from clipmesh.worker.mesh import Mesh

    store, port = rendezvous(rank, world, port_q)
    return Mesh.open(HOST, port, rank, world, group, timeout_s=GROUP_TIMEOUT_S, store=store)


def plan_for(cfg: dict, info, strategy: str, **request):
    """The RenderPlan production would make: the coordinator's own make_plan (resolved options,
    clip or layer split, halo floor) over cfg["workers"] equal-speed workers of cfg["threads"]."""
    from clipmesh.coordinator.planner import make_plan
    from clipmesh.v1 import clipmesh_pb2 as pb

    req = pb.SubmitJobRequest(prompt=PROMPT, num_frames=cfg["frames"], height=cfg["size"], width=cfg["size"],
                              num_inference_steps=cfg["steps"], guidance_scale=GUIDANCE, seed=SEED,
                              model=cfg["model"], strategy=strategy, num_workers=cfg["workers"], **request)
    job = pb.Job(id=f"bench-{strategy}-{cfg['workers']}w-{cfg['frames']}f", request=req)
    members = [pb.WorkerInfo(id=f"bench-{r}", host=HOST, device="cpu", threads=cfg["threads"], model=info, speed=1.0)
               for r in range(cfg["workers"])]
    return make_plan(job, members, info, GROUP_TIMEOUT_S)


def run_rank(cfg: dict, rank: int, port_q) -> dict:
    """The runner of cfg["kind"]: a clipmesh strategy name, or one of DIFFUSERS_KINDS."""
    return (run_diffusers if cfg["kind"] in DIFFUSERS_KINDS else run_clipmesh)(cfg, rank, port_q)


def run_clipmesh(cfg: dict, rank: int, port_q) -> dict:
    """clipmesh.worker.render.denoise (the production loop) with strategy cfg["kind"]."""
    import torch
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise
    from clipmesh.worker.weights import local_parameter_bytes

    model = load_adapter(cfg["folder"], "cpu", torch.float32)
    plan = plan_for(cfg, model.model_info(cfg["model"]), cfg["kind"], **cfg.get("request", {}))
    began = time.perf_counter()
    model.encode_prompt(PROMPT, "", GUIDANCE)  # timed for the footnote (denoise encodes again, inside the clock)
    encode_s = time.perf_counter() - began
    rss_loaded = maxrss_mb()
    with open_mesh(rank, cfg["workers"], port_q, plan.group_name) as mesh:
        steps: list[dict] = []
        stamps: list[float] = []
        held: list[int] = []  # the denoisers' parameter bytes this rank holds while the job runs (sharded: its shards)

        def on_step(report) -> None:
            if not held:
                held.extend(local_parameter_bytes(d) for d in model.denoisers)
            # A step's time is the interval between step ends: it includes the cancel vote (a
            # collective) at the step's start, which the report's counters leave out, so comm <= step.
            stamps.append(time.perf_counter())
            steps.append(dict(seconds=stamps[-1] - (stamps[-2] if len(stamps) > 1 else began),
                              sent=report.bytes_sent, received=report.bytes_received,
                              comm_seconds=report.comm_seconds))

        mesh.any(False)  # everyone loaded: start the clock together
        mesh.take_stats()  # drop the rendezvous' own traffic
        began = time.perf_counter()
        latents = denoise(model, plan, rank, mesh, on_step=on_step)
        wall = time.perf_counter() - began
    return dict(wall=wall, steps=steps, comm=True, rss_loaded=rss_loaded, rss_peak=maxrss_mb(), encode_s=encode_s,
                held_mb=sum(held) / 2**20, whole_mb=model.denoiser_bytes / 2**20,
                clips=[(c.start, c.end) for c in plan.clips],
                latents=latents.float().numpy() if rank == 0 and cfg["keep_latents"] else None)


def count_diffusers_traffic(stats: dict) -> None:
    """Count and time diffusers' context-parallel collectives in `stats` (sent, received, seconds):
    the Ulysses all-to-alls of q, k, v and the output (attention_dispatch._all_to_all_single) and
    the all-gather of the transformer's output (EquipartitionSharder.unshard, at proj_out)."""
    import torch.distributed as dist
    from diffusers.hooks import context_parallel as cp
    from diffusers.models import attention_dispatch as ad

    def count(sent: int, received: int, began: float) -> None:
        stats["sent"] += sent
        stats["received"] += received
        stats["seconds"] += time.perf_counter() - began

    all_to_all = ad._all_to_all_single

    def counted_all_to_all(x, group):
        began, n = time.perf_counter(), dist.get_world_size(group)
        out = all_to_all(x, group)  # waits for the result
        count(x.numel() * x.element_size() * (n - 1) // n, out.numel() * out.element_size() * (n - 1) // n, began)
        return out

    unshard = cp.EquipartitionSharder.unshard  # a bound classmethod

    def counted_unshard(cls, tensor, dim, mesh):
        began, n = time.perf_counter(), mesh.size()
        out = unshard(tensor, dim, mesh)
        if hasattr(out, "wait"):  # an AsyncCollectiveTensor: time the transfer, not its launch
            out = out.wait()
        nbytes = tensor.numel() * tensor.element_size()
        count(nbytes * (n - 1), nbytes * (n - 1), began)
        return out

    ad._all_to_all_single = counted_all_to_all
    cp.EquipartitionSharder.unshard = classmethod(counted_unshard)


def run_diffusers(cfg: dict, rank: int, port_q) -> dict:
    """vanilla (1 process) or diffusers_ulysses (W processes): WanPipeline.__call__ with prompt
    embeddings and initial latents given and output_type="latent", so only the denoising loop is timed."""
    import torch

    ulysses = cfg["kind"] == "diffusers_ulysses"
    if ulysses and torch.accelerator.device_count() == 0:
        # CPU-only torch: ModelMixin._resolve_parallel_config picks its device as
        # `rank % torch.accelerator.device_count()`, a division by zero without an accelerator.
        # With 1 it picks torch.device("cpu", rank % 1), and the DeviceMesh is a CPU (gloo) mesh.
        torch.accelerator.device_count = lambda: 1
    from clipmesh.worker.adapters.wan import MAX_SEQUENCE_LENGTH, load_wan
    from clipmesh.worker.noise import initial_noise

    pipe = load_wan(cfg["folder"], "cpu", torch.float32)
    began = time.perf_counter()
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt=PROMPT, negative_prompt=None,
                                          do_classifier_free_guidance=GUIDANCE > 1.0,
                                          max_sequence_length=MAX_SEQUENCE_LENGTH, device="cpu")
    encode_s = time.perf_counter() - began
    side = cfg["size"] // pipe.vae_scale_factor_spatial
    # the very noise clipmesh starts from (per-frame seeds), so the results are comparable
    latents = initial_noise(SEED, 0, cfg["latent"], pipe.transformer.config.in_channels, side, side) \
        * pipe.scheduler.init_noise_sigma
    rss_loaded = maxrss_mb()

    mesh, seq_per_rank = None, []
    stats = dict(sent=0, received=0, seconds=0.0)
    try:
        if ulysses:
            from diffusers import ContextParallelConfig

            mesh = open_mesh(rank, cfg["workers"], port_q, f"bench-ulysses-{cfg['frames']}")
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cfg["workers"]))
            count_diffusers_traffic(stats)
            # proof that the sequence really is split: the first block's output length on this rank
            pipe.transformer.blocks[0].register_forward_hook(lambda m, a, out: seq_per_rank.append(out.shape[1]))
            mesh.any(False)  # everyone loaded and parallelised: start the clock together
        stamps: list[float] = []
        steps: list[dict] = []
        last = dict(stats)

        def on_step_end(pipeline, i, t, kwargs):
            stamps.append(time.perf_counter())
            steps.append(dict(seconds=stamps[-1] - (stamps[-2] if len(stamps) > 1 else began),
                              **{("comm_seconds" if k == "seconds" else k): stats[k] - last[k] for k in stats}))
            last.update(stats)
            return {}

        began = time.perf_counter()
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, num_frames=cfg["frames"],
                   height=cfg["size"], width=cfg["size"], num_inference_steps=cfg["steps"], guidance_scale=GUIDANCE,
                   output_type="latent", callback_on_step_end=on_step_end).frames
        wall = time.perf_counter() - began
    finally:
        if mesh is not None:
            mesh.close()
    return dict(wall=wall, steps=steps, comm=ulysses, rss_loaded=rss_loaded, rss_peak=maxrss_mb(), encode_s=encode_s,
                seq_per_rank=seq_per_rank[0] if seq_per_rank else None,
                latents=out.float().numpy() if rank == 0 and cfg["keep_latents"] else None)
