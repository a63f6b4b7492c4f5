"""Turns a placed job into a RenderPlan: strategy, clips, options, rendezvous names.

Pure logic over protobuf messages (no torch, no gRPC), so every decision here is unit-testable.
"""

from __future__ import annotations

from clipmesh.plan import num_latent_frames, split_clips_weighted
from clipmesh.v1 import clipmesh_pb2 as pb

# Dual-scope defaults per family (ALGORITHMS.md section 1). Wan: Wan2.1 trains on 81 frames =
# 21 latent frames, so a +-10 window is exactly the native length; UNet3D: the reference's P=8.
CLIP_PARALLEL_DEFAULTS = {
    "wan": dict(local_halo=10, global_frames=16, phase_switch_t=800.0, phase_bias=10.0, entropy_scaling=False),
    "unet3d": dict(local_halo=8, global_frames=16, phase_switch_t=800.0, phase_bias=10.0, entropy_scaling=False),
}

# DualParal defaults (ALGORITHMS.md section 2): blocks of 8 latent frames (29 video frames for
# the first) with 4 frames of context each way.
BLOCK_PIPELINE_DEFAULTS = dict(block_frames=8, context_frames=4)


def choose_strategy(req: pb.SubmitJobRequest, model: pb.ModelInfo) -> str:
    """The request's strategy, else clip_parallel for videos longer than the model's native
    length (where the model supports it), else exact."""
    if req.strategy:
        return req.strategy
    if req.num_frames == 0:  # unbounded: only the block queue streams without an end
        return "block_pipeline"
    latent = num_latent_frames(req.num_frames, model.temporal_stride)
    if "clip_parallel" in model.strategies and model.native_latent_frames and latent > model.native_latent_frames:
        return "clip_parallel"
    return "exact"


def resolve_clip_parallel(req: pb.SubmitJobRequest, model: pb.ModelInfo) -> pb.ClipParallelOptions:
    """Every option set: the request's value where given, else the model's, else the family's default."""
    resolved = pb.ClipParallelOptions(**CLIP_PARALLEL_DEFAULTS.get(model.family, CLIP_PARALLEL_DEFAULTS["wan"]))
    for source in (model.clip_parallel_defaults, req.clip_parallel):
        for field, value in source.ListFields():
            setattr(resolved, field.name, value)
    return resolved


def resolve_block_pipeline(req: pb.SubmitJobRequest) -> pb.BlockPipelineOptions:
    """Every option set: the request's value where given, else the default (the default context
    shrinks to fit a smaller block)."""
    resolved = pb.BlockPipelineOptions(**BLOCK_PIPELINE_DEFAULTS)
    resolved.MergeFrom(req.block_pipeline)  # the request's set fields win
    if not req.block_pipeline.HasField("context_frames"):
        resolved.context_frames = min(resolved.context_frames, resolved.block_frames)
    return resolved


def max_workers(req: pb.SubmitJobRequest, model: pb.ModelInfo) -> int:
    """How many workers a job can use: one per transformer block under block_pipeline (it splits
    layers), else one per latent frame (the others split frames)."""
    if choose_strategy(req, model) == "block_pipeline":
        return model.num_layers
    return num_latent_frames(req.num_frames, model.temporal_stride)


def make_plan(job: pb.Job, members: list[pb.WorkerInfo], model: pb.ModelInfo, timeout_seconds: int) -> pb.RenderPlan:
    req = job.request
    strategy = choose_strategy(req, model)
    options = resolve_clip_parallel(req, model)
    speeds = [w.speed or 1.0 for w in members]
    if strategy == "block_pipeline":
        # every rank sees every frame; ranks split the transformer's blocks instead (equal speeds:
        # L//N each, the remainder to the first ranks, as DualParal does)
        return pb.RenderPlan(
            request=req, strategy=strategy, world_size=len(members),
            num_latent_frames=num_latent_frames(req.num_frames, model.temporal_stride) if req.num_frames else 0,
            layers=[pb.LayerRange(start=s, end=e) for s, e in split_clips_weighted(model.num_layers, speeds)],
            block_pipeline=resolve_block_pipeline(req), start_step=0, decode_rank=0,
            group_name=f"clipmesh-{job.id}", timeout_seconds=timeout_seconds)
    latent = num_latent_frames(req.num_frames, model.temporal_stride)
    # Clips follow measured speed; under clip_parallel none is shorter than the halo.
    min_len = options.local_halo if strategy == "clip_parallel" else 1
    clips = split_clips_weighted(latent, speeds, min_len)
    return pb.RenderPlan(
        request=req, strategy=strategy, world_size=len(members), num_latent_frames=latent,
        clips=[pb.ClipRange(start=s, end=e) for s, e in clips], start_step=0, decode_rank=0,
        group_name=f"clipmesh-{job.id}", timeout_seconds=timeout_seconds, clip_parallel=options,
    )
