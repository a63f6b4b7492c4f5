"""Validation of SubmitJobRequest before anything is accepted.

Each failure names the field and the allowed range, and becomes INVALID_ARGUMENT.
"""

from __future__ import annotations

import math

from clipmesh.plan import num_latent_frames
from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import InvalidArgument
from .planner import BLOCK_PIPELINE_DEFAULTS

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
MAX_FPS = 120.0
MAX_WORKERS = 256
MAX_HALO = 64
MAX_GLOBAL_FRAMES = 256
MAX_PHASE_BIAS = 100.0
MAX_TIMESTEP = 1000.0
MAX_STREAM_FRAMES = 100_001  # block_pipeline's memory is flat in length: the cap is the disk's
MAX_BLOCK_FRAMES = 64


def _in_range(field: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidArgument(field, f"must be in [{low:g}, {high:g}], got {value:g}")


def validate_request(req: pb.SubmitJobRequest, model: pb.ModelInfo | None, known_models: list[str]) -> int:
    """Raises InvalidArgument for the first bad field; returns the number of latent frames."""
    if not req.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for field in ("prompt", "negative_prompt"):
        if len(getattr(req, field)) > MAX_PROMPT_CHARS:
            raise InvalidArgument(field, f"must be at most {MAX_PROMPT_CHARS} characters, got {len(getattr(req, field))}")
    if model is None:
        raise InvalidArgument("model", f"unknown model {req.model!r}; known: {', '.join(sorted(known_models)) or 'none'}")
    if req.strategy and req.strategy not in model.strategies:
        raise InvalidArgument("strategy", f"unknown strategy {req.strategy!r} for {model.name}; allowed: {', '.join(model.strategies)}")

    stride = model.temporal_stride
    streaming = req.strategy == "block_pipeline" or (not req.strategy and req.num_frames == 0)
    if streaming and "block_pipeline" not in model.strategies:
        raise InvalidArgument("num_frames", f"must be >= 1: {model.name} cannot stream without an end (no block_pipeline)")
    # block_pipeline positions tokens within a block, so its length is not bound by the RoPE table
    limit = MAX_STREAM_FRAMES if streaming else model.max_frames
    if not (streaming and req.num_frames == 0) and (
            req.num_frames < 1 or req.num_frames > limit or (req.num_frames - 1) % stride):
        low = 0 if streaming else 1
        raise InvalidArgument("num_frames", f"must be {stride}*k+1 in [1, {limit}]{' or 0 (until cancelled)' * (low == 0)}, got {req.num_frames}")
    for field in ("height", "width"):
        value, mult = getattr(req, field), model.spatial_multiple
        if value < mult or value > model.max_side or value % mult:
            raise InvalidArgument(field, f"must be a multiple of {mult} in [{mult}, {model.max_side}], got {value}")
    _in_range("num_inference_steps", req.num_inference_steps, 1, MAX_STEPS)
    _in_range("guidance_scale", req.guidance_scale, 0.0, MAX_GUIDANCE)
    _in_range("fps", req.fps, 1.0, MAX_FPS)
    if req.seed < 0:
        raise InvalidArgument("seed", f"must be >= 0, got {req.seed}")

    options = req.clip_parallel
    if options.HasField("local_halo"):
        _in_range("clip_parallel.local_halo", options.local_halo, 1, MAX_HALO)
    if options.HasField("global_frames"):
        _in_range("clip_parallel.global_frames", options.global_frames, 0, MAX_GLOBAL_FRAMES)
    if options.HasField("phase_switch_t"):
        _in_range("clip_parallel.phase_switch_t", options.phase_switch_t, 0.0, MAX_TIMESTEP)
    if options.HasField("phase_bias"):
        _in_range("clip_parallel.phase_bias", options.phase_bias, 0.0, MAX_PHASE_BIAS)

    block = req.block_pipeline
    if block.HasField("block_frames"):
        _in_range("block_pipeline.block_frames", block.block_frames, 1, MAX_BLOCK_FRAMES)
    if block.HasField("context_frames"):
        # the cache holds the next block's first frames, so a block must have that many
        blocks = block.block_frames if block.HasField("block_frames") else BLOCK_PIPELINE_DEFAULTS["block_frames"]
        _in_range("block_pipeline.context_frames", block.context_frames, 0, blocks)

    if streaming:
        # Every worker must own at least one transformer block.
        _in_range("num_workers", req.num_workers, 0, min(model.num_layers, MAX_WORKERS))
        return num_latent_frames(req.num_frames, stride) if req.num_frames else 0
    latent = num_latent_frames(req.num_frames, stride)
    # Every worker must own at least one latent frame.
    _in_range("num_workers", req.num_workers, 0, min(latent, MAX_WORKERS))
    return latent
