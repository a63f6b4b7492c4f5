"""Turns a placed job into a RenderPlan: strategy, clips, options, rendezvous names.

Pure logic over protobuf messages (no torch, no gRPC), so every decision here is unit-testable.
What each strategy needs (its partition, options, defaults, worker limits) is read from the
strategy specs (clipmesh.specs).
"""

from __future__ import annotations

from clipmesh import faults, specs
from clipmesh.savers import resolve_savers
from clipmesh.plan import num_latent_frames, split_weighted
from clipmesh.v1 import clipmesh_pb2 as pb

def workers_wanted(req: pb.SubmitJobRequest, model: pb.ModelInfo, idle: int) -> int:
    """The workers a queued job asks for: its num_workers, else as many of the `idle` ones as it
    can use (a heads split: a count that divides the heads); 0 when none fits."""
    return req.num_workers or specs.usable_workers(specs.choose_spec(req, model), req, model, idle)


# Weights above this share of a worker's memory are sharded when the request leaves it open: the
# rest holds the activations, the VAE, the text encoder and the gathered block in flight.
SHARD_SHARE = 0.5


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def choose_parallel(req: pb.SubmitJobRequest, spec: specs.StrategySpec, members: list[pb.WorkerInfo]) -> pb.ParallelPlan:
    """The job's mesh beyond its strategy's split, and why (the request was validated against
    the spec: what it asks for runs)."""
    cfg = 2 if req.cfg_parallel else 1
    why = ["cfg 2 x %d: asked" % (len(members) // 2) if cfg == 2 else
           "cfg 1: " + ("asked" if req.HasField("cfg_parallel") else "not asked")]
    memory = min((w.memory_bytes for w in members if w.memory_bytes), default=0)
    weights = max((w.denoiser_bytes for w in members), default=0)
    if req.HasField("shard_weights"):
        shard = req.shard_weights
        why.append(f"weights {'sharded' if shard else 'whole'}: asked")
    elif specs.SHARD not in spec.composes or len(members) < 2:
        shard = False
        why.append("weights whole")
    elif not (weights and memory):
        shard = False
        why.append("weights whole: the model's size or the workers' memory is unknown")
    else:
        shard = weights > SHARD_SHARE * memory
        why.append(f"weights {'sharded' if shard else 'whole'}: the denoiser's {_gib(weights)} "
                   f"{'exceed' if shard else 'are within'} {SHARD_SHARE:.0%} of a worker's {_gib(memory)}")
    return pb.ParallelPlan(cfg=cfg, shard_weights=shard, why="; ".join(why))


def make_plan(job: pb.Job, members: list[pb.WorkerInfo], model: pb.ModelInfo, timeout_seconds: int) -> pb.RenderPlan:
    req = job.request
    spec = specs.choose_spec(req, model)
    latent = num_latent_frames(req.num_frames, model.temporal_stride) if req.num_frames else 0
    speeds = [w.speed or 1.0 for w in members]
    attempt = job.attempt + 1  # the group of each attempt is new: a late peer of the last cannot join it
    plan = pb.RenderPlan(request=req, strategy=spec.name, world_size=len(members), num_latent_frames=latent,
                         start_step=0, group_name=f"clipmesh-{job.id}-{attempt}", timeout_seconds=timeout_seconds,
                         attempt=attempt, checkpoint_every=faults.checkpoint_every(req))
    plan.parallel.CopyFrom(choose_parallel(req, spec, members))
    ranks = specs.split_ranks(plan)  # the ranks of one guidance branch split the work
    # a split rank's speed is its slowest branch's: both branches finish each step together
    speeds = [min(speeds[r::ranks]) for r in range(ranks)]
    plan.savers.CopyFrom(resolve_savers(req, model.family))
    options = specs.resolve_options(spec, req, model)
    if options is not None:
        getattr(plan, spec.options_field).CopyFrom(options)
    if spec.partition == specs.LAYERS:
        # every rank sees every frame; ranks split the transformer's blocks instead (equal speeds:
        # L//N each, the remainder to the first ranks, as DualParal does)
        plan.layers.extend(pb.LayerRange(start=s, end=e) for s, e in split_weighted(model.num_layers, speeds))
    else:
        # clips follow measured speed; under clip_parallel none is shorter than the halo
        min_len = specs.min_clip_length(spec, options, latent, ranks)
        plan.clips.extend(pb.ClipRange(start=s, end=e) for s, e in split_weighted(latent, speeds, min_len))
    return plan
