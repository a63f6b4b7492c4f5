"""Strategy specs: what each strategy is and what a job under it must satisfy, as data.

The one registry of strategy names. The planner, the request validation, the model presets,
the CLI and the worker all read it: the worker looks a strategy's implementation up by
`StrategySpec.name`, and checks its plan against the spec (`check_plan`) before any collective.
Adding a strategy is one entry in STRATEGY_SPECS plus the worker's strategy file.

Pure Python over the generated protobuf messages (no torch, no gRPC).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clipmesh.families import BLOCK_STACK, FAMILIES, RELATIVE_TIME, SPLIT_FRAMES, SPLIT_HEADS, WHY_MISSING
from clipmesh.plan import num_latent_frames
from clipmesh.v1 import clipmesh_pb2 as pb

FRAMES = "frames"  # ranks split the latent frames: plan.clips tile [0, num_latent_frames)
LAYERS = "layers"  # ranks split the transformer's blocks: plan.layers tile [0, ModelInfo.num_layers)
# How the rest of the system handles a strategy's work (StrategySpec.work), without torch:
CLIPS = "clips"  # every rank steps its own clip, all at one step: progress is steps; a checkpoint is every
#                  rank's clip at that step (resume at start_step); a clip's rank decodes and uploads it
QUEUE = "queue"  # a queue of blocks through the ranks (DualParal): progress is frames written (blocks finish in
#                  order, each at its own step); a checkpoint is rank 0's queue, one part, every block at its
#                  own step; runs of DECODE_RUN blocks decode on the ranks in turn, beside the stages
# QUEUE: blocks a rank decodes (and uploads) in a row, in turn: the warm-up of a run (~0.8 of a
# block's decode on bench-wan) is paid once per run; longer runs wait longer for a rank's turn.
DECODE_RUN = 4
# Mesh dimensions a strategy composes with beyond its own split (StrategySpec.composes; RenderPlan.parallel):
CFG = "cfg_parallel"     # the two branches of classifier-free guidance on different ranks
SHARD = "shard_weights"  # every transformer block's weights sharded over the job's ranks (FSDP2)
MAX_STREAM_FRAMES = 100_001  # a streaming strategy's memory is flat in length: the cap is the disk's


class SpecError(ValueError):
    """A value a spec does not allow; `field` names it (dotted: "clip_parallel.local_halo")."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


def check_range(field: str, value: float, low: float, high: float) -> None:
    """Raises SpecError unless low <= value <= high (and finite)."""
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise SpecError(field, f"must be in [{low:g}, {high:g}], got {value:g}")


@dataclass(frozen=True)
class OptionSpec:
    """One field of a strategy's options message."""

    name: str
    type: type                  # int, float, bool or str (as the message field)
    default: Any = dataclasses.field(hash=False)  # a value, or {family: value} where the families differ
    help: str                   # the CLI's help text
    low: float | None = None    # allowed range, inclusive (None: any value of the type)
    high: float | str | None = None  # a str names an earlier option whose value bounds this one
    choices: tuple[str, ...] = ()    # a str option's allowed values (its default among them)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_for(self, family: str, native_latent_frames: int = 0) -> Any:
        """The default for a model family (an unknown family gets the first family's); a callable
        default is a function of the model's native latent frames (0: the family's own)."""
        if callable(self.default):
            return self.default(native_latent_frames or FAMILIES.get(family, FAMILIES["wan"]).native_latent_frames)
        if isinstance(self.default, Mapping):
            return self.default.get(family, next(iter(self.default.values())))
        return self.default

    def bounds(self, resolved) -> tuple[float, float] | None:
        """(low, high) with a named bound read from `resolved` (the options message in effect)."""
        if self.low is None:
            return None
        return self.low, getattr(resolved, self.high) if isinstance(self.high, str) else self.high

    def check(self, field: str, value, resolved) -> None:
        """SpecError(field) unless `value` is allowed: in its range, or among its choices."""
        if self.choices and value not in self.choices:
            shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
            raise SpecError(field, f"must be one of {', '.join(self.choices)}, got {shown}")
        bounds = self.bounds(resolved)
        if bounds is not None:
            check_range(field, value, *bounds)


@dataclass(frozen=True)
class StrategySpec:
    name: str
    partition: str                        # FRAMES or LAYERS
    needs: frozenset[str]                 # the capabilities (clipmesh.families) a model must have
    summary: str                          # one line for the CLI
    streams: bool = False                 # can run unbounded (num_frames 0) and past the model's max_frames
    for_long_videos: bool = False         # the planner's choice beyond the model's native length
    options_field: str | None = None      # SubmitJobRequest / RenderPlan field holding its options
    options: tuple[OptionSpec, ...] = ()
    min_clip_option: str | None = None    # the option no clip may be shorter than (as frames allow)
    splits_heads: bool = False            # ranks split attention heads: workers divide ModelInfo.attention_heads
    work: str = CLIPS                     # CLIPS or QUEUE: progress, checkpoints, who decodes and uploads
    composes: frozenset[str] = frozenset({CFG, SHARD})  # the mesh dimensions it runs beside (CFG, SHARD)
    refuses: str = ""                     # why it composes with none of them

    def option(self, name: str) -> OptionSpec:
        return next(o for o in self.options if o.name == name)

    @property
    def families(self) -> tuple[str, ...]:
        """The model families (ModelInfo.family) it runs on: those with every capability it needs."""
        return tuple(name for name, family in FAMILIES.items() if self.needs <= family.capabilities)

    @property
    def refused(self) -> tuple[tuple[str, str], ...]:
        """(family, why it cannot run there), for the families whose missing capability has a reason."""
        return tuple((family, why) for family in FAMILIES if (why := self.refusal(family)))

    def refusal(self, family: str) -> str | None:
        """Why this strategy is refused for a model family (None: not refused, it may just not run there)."""
        missing = self.needs - FAMILIES[family].capabilities if family in FAMILIES else set()
        return next((WHY_MISSING[c] for c in sorted(missing) if c in WHY_MISSING), None)

    @property
    def model_defaults_field(self) -> str | None:
        """ModelInfo's field of a model's own option defaults (clip_parallel_defaults), if it has one."""
        name = f"{self.options_field}_defaults"
        return name if self.options_field and name in pb.ModelInfo.DESCRIPTOR.fields_by_name else None

    def options_message(self, **values):
        """A fresh options message (pb.ClipParallelOptions, ...) with `values` set."""
        field = pb.SubmitJobRequest.DESCRIPTOR.fields_by_name[self.options_field]
        return getattr(pb, field.message_type.name)(**values)


# Temporal RoPE position at which query frame f sees global frame g under clip_parallel
# (clip_parallel.global_rope; Wan only, worker/adapters/wan_rope.py; N = native frames):
#   "true":   g, its real position (|g - f| may be far beyond any distance seen in training);
#   "native": clamp(g, f - (N-1), f + (N-1)): the real position while the distance is one the model
#             was trained on (always, for videos up to N frames), else the farthest trained one;
#   "clamp":  clamp(g, f - P, f + P): inside f's window; globals beyond it sit at its edge;
#   "query":  f, the query's own time (like a temporal attention without positions).
GLOBAL_ROPE_POLICIES = ("true", "native", "clamp", "query")

# Fixed order: the first is the default; choices, help and model strategy lists follow it.
STRATEGY_SPECS: dict[str, StrategySpec] = {spec.name: spec for spec in (
    StrategySpec(
        name="exact", partition=FRAMES, needs=frozenset({SPLIT_FRAMES}),
        summary="every frame attends to every frame, as on one device"),
    StrategySpec(
        name="clip_parallel", partition=FRAMES, needs=frozenset({SPLIT_FRAMES, RELATIVE_TIME}), for_long_videos=True,
        summary="dual-scope attention", options_field="clip_parallel", min_clip_option="local_halo",
        # docs/algorithms.md section 1; every default measured on the toy world (docs/quality.md).
        # The window follows the model's native latent frames N: P = N // 2, so a window of 2P+1
        # holds the native length (Wan2.1: 81 frames = 21 latent frames, P = 10; VideoCrafter2:
        # 16, P = 8, the reference's) and a video of at most N frames is one window: `exact`.
        options=(
            OptionSpec("local_halo", int, lambda native: native // 2,
                       "P: a frame's window holds 2P+1 latent frames (default: half the model's native length)",
                       1, 64),
            OptionSpec("global_frames", int, 16, "G: frames spread over the video that every frame sees", 0, 256),
            OptionSpec("phase_bias", float, 10.0, "logit bias of the active phase (10 ~ hard switch)", 0.0, 100.0),
            # on, measured at 8x toy-wan on 32 videos (docs/quality.md): the whole track moves the
            # named way in 0.97 of the videos, not 0.88, and a clip seam jumps 0.70 of a step, not
            # 1.27; colour and identity as without it; it costs a multiply of q per frame
            OptionSpec("entropy_scaling", bool, True, "scale logits by visible keys (beyond the native length)"),
            # 0.25 (2 of 8 steps), measured at 8x toy-wan (docs/quality.md): against 0.5 (what t=800
            # was on its flow-matching schedule) the object keeps moving in 0.44 of the windows, not
            # 0.18 (a longer global phase makes every frame a copy of the same global frames)
            OptionSpec("global_phase", float, 0.25, "share of the denoising steps, from the first, in the global phase",
                       0.0, 1.0),
            OptionSpec("noise_reschedule", bool, False,
                       "FreeNoise: every native-length window starts from a shuffle of the first window's noise"),
            OptionSpec("spectral_blend", bool, False,
                       "FreeLong: low temporal frequencies of attention from the global branch, high ones from "
                       "the window (one all-gather of attention outputs per call)"),
            # measured in docs/clip-parallel-rope.md; UNet3D has no positions and ignores it
            OptionSpec("global_rope", str, "native",
                       "Wan: the temporal RoPE position at which a query frame sees a global frame "
                       "(UNet3D: no positions, ignored)",
                       choices=GLOBAL_ROPE_POLICIES),
        )),
    StrategySpec(
        name="block_pipeline", partition=LAYERS, needs=frozenset({BLOCK_STACK}), streams=True, work=QUEUE,
        # cfg_parallel: one pipeline per guidance branch, the last stages pairing their predictions;
        # its stages hold their own layers already (a host-holding worker copies only those)
        composes=frozenset({CFG}), refuses="a stage runs only its own layers (with `clipmesh worker --denoiser-on "
                                           "host` its device holds only those): there is nothing to shard",
        summary="DualParal block queue", options_field="block_pipeline",
        # docs/algorithms.md section 2: blocks of 8 latent frames (29 video frames for the first)
        # with 4 frames of context each way.
        options=(
            OptionSpec("block_frames", int, 8, "latent frames per block", 1, 64),
            # the cache holds the next block's first frames, so a block must have that many
            OptionSpec("context_frames", int, 4, "latent frames of context shared with the neighbouring blocks",
                       0, "block_frames"),
        )),
    StrategySpec(
        name="ulysses", partition=FRAMES, needs=frozenset({SPLIT_FRAMES, SPLIT_HEADS}), splits_heads=True,
        summary="exact attention by sequence<->head all-to-all (heads divide by workers)"),
)}
DEFAULT_STRATEGY = next(iter(STRATEGY_SPECS))


def spec_named(name: str) -> StrategySpec:
    """The spec of a strategy name ("" is the default); SpecError("strategy") if unknown."""
    try:
        return STRATEGY_SPECS[name or DEFAULT_STRATEGY]
    except KeyError:
        raise SpecError("strategy", f"unknown strategy {name!r}; known: {', '.join(STRATEGY_SPECS)}") from None


def work_of(plan: pb.RenderPlan) -> str:
    """CLIPS or QUEUE: how the plan's strategy works (StrategySpec.work)."""
    return spec_named(plan.strategy).work


def checkpoint_frames(plan: pb.RenderPlan) -> int:
    """The latent frames a complete checkpoint of `plan` covers: CLIPS, the parts cover the video;
    QUEUE, one part [0, 1) from rank 0, which holds the whole queue."""
    return 1 if work_of(plan) == QUEUE else plan.num_latent_frames


def decoding_rank(plan: pb.RenderPlan, latent: int) -> int:
    """The rank that decodes (and uploads) latent frame `latent`: CLIPS, the owner of its clip;
    QUEUE, run k of DECODE_RUN blocks is rank k mod N's. -1: none."""
    if work_of(plan) == QUEUE:  # among the conditional branch's stages (split ranks 0..F-1)
        return latent // plan.block_pipeline.block_frames // DECODE_RUN % split_ranks(plan)
    # the conditional branch's ranks (0..F-1) own the clips' uploads
    return next((rank for rank, clip in enumerate(plan.clips) if clip.start <= latent < clip.end), -1)


def strategies_for(family: str) -> list[str]:
    """The strategies a model family supports, in table order (ModelInfo.strategies)."""
    return [spec.name for spec in STRATEGY_SPECS.values() if family in spec.families]


def choose_spec(req: pb.SubmitJobRequest, model: pb.ModelInfo) -> StrategySpec:
    """The request's strategy, else the first streaming one for an unbounded video (num_frames 0),
    else the long-video one beyond the model's native length (where the model supports it),
    else the default. Never raises on a bad num_frames (validation reports that)."""
    if req.strategy:
        return spec_named(req.strategy)
    if req.num_frames == 0:
        return next(spec for spec in STRATEGY_SPECS.values() if spec.streams)
    stride = model.temporal_stride or 1
    if model.native_latent_frames and req.num_frames >= 1 and (req.num_frames - 1) % stride == 0 \
            and num_latent_frames(req.num_frames, stride) > model.native_latent_frames:
        for spec in STRATEGY_SPECS.values():
            if spec.for_long_videos and spec.name in model.strategies:
                return spec
    return STRATEGY_SPECS[DEFAULT_STRATEGY]


def max_frames(spec: StrategySpec, model: pb.ModelInfo) -> int:
    """The longest video (output frames) a job may ask for: a streaming strategy positions
    tokens within a block, so its length is not bound by the model's positional table."""
    return MAX_STREAM_FRAMES if spec.streams else model.max_frames


def resolve_options(spec: StrategySpec, req: pb.SubmitJobRequest, model: pb.ModelInfo | None = None):
    """The spec's options message with every field set: the request's value where set, else the
    model's (ModelInfo.<options_field>_defaults, where that field exists), else the spec's default
    for the model's family; a default bounded by another option shrinks to fit it. None for a
    spec without options."""
    if spec.options_field is None:
        return None
    sources = [getattr(req, spec.options_field)]
    if model is not None and spec.model_defaults_field:
        sources.append(getattr(model, spec.model_defaults_field))
    resolved = spec.options_message()
    for option in spec.options:  # in order: a bound names an earlier option
        source = next((s for s in sources if s.HasField(option.name)), None)
        if source is not None:
            setattr(resolved, option.name, getattr(source, option.name))
            continue
        value = option.default_for(model.family if model is not None else "",
                                   model.native_latent_frames if model is not None else 0)
        if isinstance(option.high, str):
            value = min(value, getattr(resolved, option.high))
        setattr(resolved, option.name, value)
    return resolved


def check_options(spec: StrategySpec, options, resolved, require_all: bool) -> None:
    """SpecError for the first option of `options` out of its range or choices (bounds read from
    `resolved`, the options in effect); with require_all, also for an unset one."""
    for option in spec.options:
        field = f"{spec.options_field}.{option.name}"
        if not options.HasField(option.name):
            if require_all:
                raise SpecError(field, "is unset (the planner resolves every option)")
            continue
        option.check(field, getattr(options, option.name), resolved)


def split_limit(spec: StrategySpec, req: pb.SubmitJobRequest, model: pb.ModelInfo) -> int:
    """How many ranks can split one branch's work: one per latent frame (frames partition) or per
    transformer block (layers partition); a heads split gives each at least one attention head."""
    if spec.partition == LAYERS:
        limit = model.num_layers
    else:
        limit = num_latent_frames(req.num_frames, model.temporal_stride)
    return min(limit, model.attention_heads) if spec.splits_heads else limit


def worker_limit(spec: StrategySpec, req: pb.SubmitJobRequest, model: pb.ModelInfo) -> int:
    """How many workers a job can use: split_limit for each guidance branch it runs apart."""
    return split_limit(spec, req, model) * (2 if req.cfg_parallel else 1)


def check_divides(spec: StrategySpec, field: str, workers: int, model: pb.ModelInfo) -> None:
    """SpecError(field) unless the worker count suits the spec: a heads split needs the model's
    attention heads known, and a count (0: not chosen yet) that divides them."""
    if not spec.splits_heads:
        return
    if model.attention_heads < 1:
        raise SpecError("model.attention_heads", f"unknown for {model.name} ({spec.name} splits attention heads)")
    if workers > 0 and model.attention_heads % workers:
        raise SpecError(field, f"must divide the {model.attention_heads} attention heads of {model.name} "
                               f"({spec.name} splits heads), got {workers}")


def check_parallel(spec: StrategySpec, req: pb.SubmitJobRequest) -> None:
    """SpecError naming the field of a mesh the request asks for that its strategy cannot run:
    cfg_parallel needs guidance and an even worker count; each dimension the spec composes with."""
    for dim in (CFG, SHARD):
        if getattr(req, dim) and dim not in spec.composes:
            raise SpecError(dim, f"{spec.name} does not run with {dim}: {spec.refuses}")
    if req.cfg_parallel:
        if req.guidance_scale <= 1.0:
            raise SpecError(CFG, f"needs classifier-free guidance (guidance_scale > 1), got {req.guidance_scale:g}")
        if req.num_workers % 2:
            raise SpecError("num_workers", f"must be even with cfg_parallel (2 branches x N/2 ranks), "
                                           f"got {req.num_workers}")


def usable_workers(spec: StrategySpec, req: pb.SubmitJobRequest, model: pb.ModelInfo, available: int) -> int:
    """The most workers out of `available` a job can use (0: none fits); cfg_parallel: an even count."""
    branches = 2 if req.cfg_parallel else 1
    for count in range(min(available, worker_limit(spec, req, model)), 0, -1):
        if count % branches == 0 and (not spec.splits_heads or model.attention_heads % (count // branches) == 0):
            return count
    return 0


def min_clip_length(spec: StrategySpec, options, num_latent: int, world_size: int) -> int:
    """The shortest clip a plan gives a rank: the spec's min_clip_option (clip_parallel: the halo,
    so a clip covers what its neighbours ask of it) where the frames allow, else 1."""
    wanted = getattr(options, spec.min_clip_option) if spec.min_clip_option else 1
    return max(1, min(wanted, num_latent // max(world_size, 1)))


def clip_lengths(plan: pb.RenderPlan) -> list[int]:
    """Latent frames of each frames rank's clip, in rank order (one per rank of a branch)."""
    return [c.end - c.start for c in plan.clips]


# A plan's mesh (RenderPlan.parallel): world_size = branches x split ranks, rank r is branch
# r // F and split rank r % F, where the F ranks of a branch split the work as the strategy says.
def branches(plan: pb.RenderPlan) -> int:
    """Ranks' groups that each hold one guidance branch: 2 under cfg_parallel, else 1."""
    return max(plan.parallel.cfg, 1)


def split_ranks(plan: pb.RenderPlan) -> int:
    """F: the ranks of one branch, which split the frames (clips) or the layers."""
    return plan.world_size // branches(plan)


def split_rank(plan: pb.RenderPlan, rank: int) -> int:
    """Rank `rank`'s place among its branch's ranks: its index into plan.clips / plan.layers."""
    return rank % split_ranks(plan)


def branch_of(plan: pb.RenderPlan, rank: int) -> int:
    """0: the conditional branch (its ranks decode, upload and checkpoint), 1: the unconditional."""
    return rank // split_ranks(plan)


def role(plan: pb.RenderPlan, rank: int) -> str:
    """Rank `rank`'s place in the mesh beyond the split, for progress (StepProgress.role)."""
    parts = [("cond", "uncond")[branch_of(plan, rank)]] if branches(plan) > 1 else []
    if plan.parallel.shard_weights:
        parts.append(f"shard {split_rank(plan, rank) + 1}/{split_ranks(plan)}")
    return ", ".join(parts)


def check_tiling(field: str, ranges, world_size: int, total: int) -> None:
    """SpecError(field) unless `ranges` (ClipRange / LayerRange, in rank order) tile [0, total), one per rank."""
    pairs, edge = [(r.start, r.end) for r in ranges], 0
    for start, end in pairs:
        if start != edge or end <= start:
            break
        edge = end
    else:
        if len(pairs) == world_size and edge == total:
            return
    raise SpecError(field, f"{pairs} do not tile [0, {total}) over {world_size} ranks")


def check_mode(req: pb.SubmitJobRequest, model: pb.ModelInfo) -> None:
    """SpecError("image") unless the request asks what the model makes (ModelInfo.modes): an
    image needs an image-to-video model, and an image-to-video model needs one."""
    modes = list(model.modes) or ["t2v"]
    if req.image and "i2v" not in modes:
        raise SpecError("image", f"{model.name} is a text-to-video model and takes no image (modes: {', '.join(modes)})")
    if not req.image and "t2v" not in modes:
        raise SpecError("image", f"{model.name} is an image-to-video model: the request needs a first-frame "
                                 f"image (PNG or JPEG)")


def check_plan(plan: pb.RenderPlan, model: pb.ModelInfo) -> StrategySpec:
    """A plan's checks against its spec and the model, before any collective: SpecError (a
    ValueError) naming the field and the limit. Returns the spec (the worker's registry key)."""
    spec = spec_named(plan.strategy)
    if model.family not in spec.families:
        why = spec.refusal(model.family)
        raise SpecError("model.family", f"{spec.name} runs on {', '.join(spec.families)}, not {model.family!r}"
                                        + (f": {why}" if why else ""))
    req, stride = plan.request, model.temporal_stride
    check_mode(req, model)
    if stride < 1:
        raise SpecError("model.temporal_stride", f"must be >= 1, got {stride}")
    if req.num_frames == 0 and not spec.streams:
        raise SpecError("request.num_frames", f"0 (unbounded) needs a streaming strategy, not {spec.name}")
    try:
        latent = num_latent_frames(req.num_frames, stride) if req.num_frames else 0
    except ValueError as exc:
        raise SpecError("request.num_frames", str(exc)) from None
    if plan.num_latent_frames != latent:
        raise SpecError("num_latent_frames",
                        f"must be {latent} for {req.num_frames} frames, got {plan.num_latent_frames}")
    check_range("parallel.cfg", branches(plan), 1, 2 if CFG in spec.composes else 1)
    if plan.parallel.shard_weights and SHARD not in spec.composes:
        raise SpecError("parallel.shard_weights", f"{spec.name} does not run with {SHARD}: {spec.refuses}")
    if plan.world_size % branches(plan):
        raise SpecError("world_size", f"must divide into {branches(plan)} guidance branches, got {plan.world_size}")
    if branches(plan) > 1 and req.guidance_scale <= 1.0:
        raise SpecError("parallel.cfg", f"2 needs classifier-free guidance, got guidance_scale {req.guidance_scale:g}")
    ranks = split_ranks(plan)
    check_divides(spec, "world_size", ranks, model)
    check_range("world_size", ranks, 1, split_limit(spec, req, model))
    if spec.partition == LAYERS:
        check_tiling("layers", plan.layers, ranks, model.num_layers)
    else:
        check_tiling("clips", plan.clips, ranks, latent)
    options = getattr(plan, spec.options_field) if spec.options_field else None
    if options is not None:
        check_options(spec, options, options, require_all=True)
    return spec
