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


def make_plan(job: pb.Job, members: list[pb.WorkerInfo], model: pb.ModelInfo, timeout_seconds: int) -> pb.RenderPlan:
    req = job.request
    spec = specs.choose_spec(req, model)
    latent = num_latent_frames(req.num_frames, model.temporal_stride) if req.num_frames else 0
    speeds = [w.speed or 1.0 for w in members]
    attempt = job.attempt + 1  # the group of each attempt is new: a late peer of the last cannot join it
    plan = pb.RenderPlan(request=req, strategy=spec.name, world_size=len(members), num_latent_frames=latent,
                         start_step=0, group_name=f"clipmesh-{job.id}-{attempt}", timeout_seconds=timeout_seconds,
                         attempt=attempt, checkpoint_every=faults.checkpoint_every(req))
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
        min_len = specs.min_clip_length(spec, options, latent, len(members))
        plan.clips.extend(pb.ClipRange(start=s, end=e) for s, e in split_weighted(latent, speeds, min_len))
    return plan
