"""Per-worker savers (Streamlined Inference, docs/algorithms.md section 3) as data: what a request may
ask for, per model family, and what the planner resolves. They compose with every strategy
(a step cache with every strategy but block_pipeline: NO_STEP_CACHE): the feature slicer (with
operator grouping) is exact, a step cache is an approximation.

Pure Python over the generated protobuf messages (no torch): the coordinator validates and
resolves with it, the worker (clipmesh.worker.savers) reads the resolved plan.savers.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipmesh.families import FAMILIES
from clipmesh.specs import SpecError, check_range
from clipmesh.v1 import clipmesh_pb2 as pb

MAX_SLICE_CHUNKS = 64
AUTO = -1  # slice_chunks: the family's default
MAX_CACHE_INTERVAL = 50
MAX_REHASH = 3  # auto: at most this many rehash steps in a row


@dataclass(frozen=True)
class StepCache:
    """A parsed step_cache: kind "off", "every" / "auto" (step rehash of the deep path,
    UNet-style families) or "fbc" / "taylorseer" (diffusers' caches, Wan)."""

    kind: str
    value: float = 0.0  # every / taylorseer: a full pass every K steps; fbc: the threshold; auto: threshold

    def __str__(self) -> str:
        return self.kind if self.kind == "off" else f"{self.kind}:{self.value:g}"


# kind -> (families, (low, high) of its value, default value, what it means); which families run
# a kind is theirs to say (families.py: Family.step_caches)
STEP_CACHES = {kind: (tuple(name for name, family in FAMILIES.items() if kind in family.step_caches), *rest)
               for kind, rest in {
    "every": ((2, MAX_CACHE_INTERVAL), 3,
              "step rehash: a full pass at steps 0, K, 2K, ..., the deep features reused between"),
    "auto": ((0.0, 1.0), 0.1,
             "step rehash while the reused deep features' estimated drift (relative L2, over the whole video) "
             f"stays below X, at most {MAX_REHASH} steps in a row"),
    "fbc": ((0.0, 1.0), 0.05, "FirstBlockCache: skip the other blocks while the first block's "
                              "residual changes by less than X (over the whole video)"),
    "taylorseer": ((2, MAX_CACHE_INTERVAL), 3,
                   "TaylorSeer: full passes at steps 0, 1, then 3, 3+K, 3+2K, ..., the blocks' attention and FFN "
                   "outputs forecast between"),
}.items()}
# strategy -> why no step cache runs under it (refused at submit, and at install on the worker)
NO_STEP_CACHE = {"block_pipeline": "each of its units advances another video block at another noise level, so a "
                                   "cache would be needed per block; use exact or clip_parallel"}


def parse_step_cache(text: str, family: str | None = None) -> StepCache:
    """"off", "every:3", "auto", "auto:0.1", "fbc:0.05", "taylorseer:3" -> StepCache; SpecError
    (savers.step_cache) naming what is allowed for `family` when it does not parse or fit."""
    field = "savers.step_cache"
    kinds = [k for k, (fams, *_rest) in STEP_CACHES.items() if family is None or family in fams]
    allowed = ", ".join(["off"] + [f"{k}:{'K' if isinstance(STEP_CACHES[k][1][0], int) else 'X'}" for k in kinds])
    text = (text or "off").strip().lower()
    if text == "off":
        return StepCache("off")
    kind, _, value = text.partition(":")
    if kind not in kinds:
        raise SpecError(field, f"{text!r} is not one of {allowed}" + (f" for {family} models" if family else ""))
    families, (low, high), default, _ = STEP_CACHES[kind]
    try:
        number = type(low)(value) if value else default
    except ValueError:
        raise SpecError(field, f"{text!r}: {kind} takes a {type(low).__name__} in [{low:g}, {high:g}]") from None
    check_range(field, number, low, high)
    return StepCache(kind, float(number))


def check_step_cache_strategy(cache: StepCache, strategy: str) -> None:
    """SpecError (savers.step_cache) where `strategy` cannot run the step cache."""
    if cache.kind != "off" and strategy in NO_STEP_CACHE:
        raise SpecError("savers.step_cache", f"{cache} cannot run under {strategy}: {NO_STEP_CACHE[strategy]}")


def check_savers(savers: pb.SaverOptions, family: str, strategy: str = "") -> None:
    """SpecError for the first saver option a request may not ask for (of `family`'s models, under
    `strategy`: the spec's name)."""
    if savers.HasField("slice_chunks"):
        check_range("savers.slice_chunks", savers.slice_chunks, AUTO, MAX_SLICE_CHUNKS)
    if savers.HasField("step_cache"):
        check_step_cache_strategy(parse_step_cache(savers.step_cache, family), strategy)


def resolve_savers(req: pb.SubmitJobRequest, family: str) -> pb.SaverOptions:
    """Every field set: "auto" slicing becomes the family's chunk count; the step cache is spelled
    canonically ("every:3")."""
    chunks = req.savers.slice_chunks if req.savers.HasField("slice_chunks") else 0
    if chunks == AUTO:
        # the family's (families.py): enough to cut the peak activation well below a third at the
        # sizes that matter, few enough that each chunk still fills the cores
        chunks = FAMILIES[family].slice_chunks if family in FAMILIES else 4
    return pb.SaverOptions(slice_chunks=chunks, step_cache=str(parse_step_cache(req.savers.step_cache, family)),
                           tiled_decode=req.savers.tiled_decode)
