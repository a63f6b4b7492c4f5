"""Validation of SubmitJobRequest before anything is accepted.

Each failure names the field and the allowed range, and becomes INVALID_ARGUMENT. What a
strategy allows (its options' ranges, streaming, worker caps) is read from the strategy specs.
"""

from __future__ import annotations

from clipmesh import faults, specs
from clipmesh.families import FAMILIES, MODES
from clipmesh.images import ImageError, check_image
from clipmesh.plan import num_latent_frames
from clipmesh.savers import check_savers
from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import InvalidArgument

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
MAX_FPS = 120.0
MAX_WORKERS = 256
MAX_LORAS, MAX_LORA_SCALE = 8, 10.0


def validate_request(req: pb.SubmitJobRequest, model: pb.ModelInfo | None, known_models: list[str]) -> int:
    """Raises InvalidArgument for the first bad field; returns the number of latent frames."""
    try:
        return _validate(req, model, known_models)
    except specs.SpecError as exc:
        raise InvalidArgument(exc.field, exc.detail) from None


def _validate(req: pb.SubmitJobRequest, model: pb.ModelInfo | None, known_models: list[str]) -> int:
    if not req.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for field in ("prompt", "negative_prompt"):
        if len(getattr(req, field)) > MAX_PROMPT_CHARS:
            raise InvalidArgument(field, f"must be at most {MAX_PROMPT_CHARS} characters, got {len(getattr(req, field))}")
    if len(req.model) > MAX_MODEL_NAME:
        raise InvalidArgument("model", f"must be at most {MAX_MODEL_NAME} characters, got {len(req.model)}")
    if model is None:
        raise InvalidArgument("model", f"unknown model {req.model!r}; known: {', '.join(sorted(known_models)) or 'none'}")
    if req.strategy and req.strategy not in model.strategies:
        known = specs.STRATEGY_SPECS.get(req.strategy)
        why = known and known.refusal(model.family)
        if why:
            raise InvalidArgument("strategy", f"{req.strategy} cannot run {model.name} ({model.family}): {why}; "
                                              f"allowed: {', '.join(model.strategies)}")
        raise InvalidArgument("strategy", f"unknown strategy {req.strategy!r} for {model.name}; allowed: {', '.join(model.strategies)}")

    stride, spec = model.temporal_stride, specs.choose_spec(req, model)
    if spec.streams and spec.name not in model.strategies:  # an unbounded video, no strategy asked for
        raise InvalidArgument("num_frames", f"must be >= 1: {model.name} cannot stream without an end (no {spec.name})")
    limit = specs.max_frames(spec, model)
    if not (spec.streams and req.num_frames == 0) and (
            req.num_frames < 1 or req.num_frames > limit or (req.num_frames - 1) % stride):
        unbounded = " or 0 (until cancelled)" if spec.streams else ""
        raise InvalidArgument("num_frames", f"must be {stride}*k+1 in [1, {limit}]{unbounded}, got {req.num_frames}")
    for field in ("height", "width"):
        value, mult = getattr(req, field), model.spatial_multiple
        if value < mult or value > model.max_side or value % mult:
            raise InvalidArgument(field, f"must be a multiple of {mult} in [{mult}, {model.max_side}], got {value}")
    specs.check_range("num_inference_steps", req.num_inference_steps, 1, MAX_STEPS)
    specs.check_range("guidance_scale", req.guidance_scale, 0.0, MAX_GUIDANCE)
    if req.HasField("guidance_scale_2"):
        if model.experts < 2:
            raise InvalidArgument("guidance_scale_2", f"is for two-expert models (Wan 2.2 A14B); {model.name} has "
                                                      f"one denoiser: use guidance_scale")
        specs.check_range("guidance_scale_2", req.guidance_scale_2, 0.0, MAX_GUIDANCE)
    specs.check_mode(req, model)
    if req.image:
        try:
            check_image(req.image)
        except ImageError as exc:
            raise InvalidArgument("image", str(exc)) from None
    if len(req.loras) > MAX_LORAS:
        raise InvalidArgument("loras", f"must be at most {MAX_LORAS}, got {len(req.loras)}")
    for i, ref in enumerate(req.loras):
        if not 1 <= len(ref.name) <= MAX_MODEL_NAME or "/" in ref.name:
            raise InvalidArgument(f"loras[{i}].name", f"must be a file name of 1 to {MAX_MODEL_NAME} characters "
                                                      f"without '/', got {ref.name[:40]!r}")
        specs.check_range(f"loras[{i}].scale", ref.scale, -MAX_LORA_SCALE, MAX_LORA_SCALE)
    if len({ref.name for ref in req.loras}) < len(req.loras):
        raise InvalidArgument("loras", "names each LoRA once")
    specs.check_range("fps", req.fps, 1.0, MAX_FPS)
    if req.seed < 0:
        raise InvalidArgument("seed", f"must be >= 0, got {req.seed}")
    if req.HasField("checkpoint_every"):
        specs.check_range("checkpoint_every", req.checkpoint_every, 0, faults.MAX_CHECKPOINT_EVERY)
    if req.HasField("max_attempts"):
        specs.check_range("max_attempts", req.max_attempts, 1, faults.MAX_ATTEMPTS)

    # every strategy's options, whichever runs: a value set is in its range (bounds by another
    # option read the value in effect, e.g. block_pipeline.context_frames <= block_frames)
    for option_spec in specs.STRATEGY_SPECS.values():
        if option_spec.options_field:
            resolved = specs.resolve_options(option_spec, req, model)
            specs.check_options(option_spec, getattr(req, option_spec.options_field), resolved, require_all=False)

    check_savers(req.savers, model.family, spec.name)  # per family what it allows; no step cache under block_pipeline

    # Every worker must own at least one latent frame (one transformer block where ranks split layers).
    specs.check_parallel(spec, req)
    specs.check_divides(spec, "num_workers", req.num_workers // (2 if req.cfg_parallel else 1), model)
    specs.check_range("num_workers", req.num_workers, 0, min(specs.worker_limit(spec, req, model), MAX_WORKERS))
    return num_latent_frames(req.num_frames, stride) if req.num_frames else 0


# A worker's claim of its model's limits (for a model the coordinator cannot read itself): the
# bounds a sane model stays in. What matters beyond them is pinned by the first claim (workers.py).
CLAIM_BOUNDS = dict(spatial_multiple=(1, 256), temporal_stride=(1, 16), max_frames=(1, 100_001),
                    max_side=(1, 8192), native_latent_frames=(1, 4096), num_layers=(0, 4096),
                    attention_heads=(0, 4096), experts=(0, 2))
MAX_MODEL_NAME = 512


def check_model_claim(model: pb.ModelInfo) -> None:
    """InvalidArgument naming the field of a claim outside the bounds (register.model.*)."""
    try:
        if not 1 <= len(model.name) <= MAX_MODEL_NAME:
            raise InvalidArgument("register.model.name", f"must be 1 to {MAX_MODEL_NAME} characters")
        if model.family not in FAMILIES:
            raise InvalidArgument("register.model.family", f"must be one of {', '.join(sorted(FAMILIES))}")
        if set(model.modes) - set(MODES) or len(model.modes) > len(MODES):
            raise InvalidArgument("register.model.modes", f"must be among {', '.join(MODES)}, each once")
        for field, (low, high) in CLAIM_BOUNDS.items():
            specs.check_range(f"register.model.{field}", getattr(model, field), low, high)
        if model.max_side < model.spatial_multiple:
            raise InvalidArgument("register.model.max_side", f"must be >= spatial_multiple ({model.spatial_multiple})")
        if set(model.strategies) - set(specs.strategies_for(model.family)):
            raise InvalidArgument("register.model.strategies",
                                  f"must be among {', '.join(specs.strategies_for(model.family))}")
    except specs.SpecError as exc:
        raise InvalidArgument(exc.field, exc.detail) from None
