"""Model families and their variants, as data: what the code asks of a model, read from its
diffusers folder. Torch-free (the coordinator, the planner and the CLI read it).

A folder's model_index.json picks its variant (`variant_of`: the pipeline class, then which of
`transformer_2`, `image_encoder`, `expand_timesteps` it sets). A variant gives its family (the
worker's adapter for it: worker/adapters/), what it makes (modes), its experts and its native
length; a family gives the capabilities strategies ask for (specs.StrategySpec.needs), its
savers' defaults and step caches. Adding a variant is its adapter code plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("t2v", "i2v")  # what a request may ask of a model (ModelInfo.modes): text-to-video, image-to-video

# Capabilities a strategy may need (StrategySpec.needs).
SPLIT_FRAMES = "split_frames"        # every frame-mixing module has an exact split over clips of frames
RELATIVE_TIME = "relative_time"      # no positions by absolute frame index (dual-scope windows re-index frames)
BLOCK_STACK = "block_stack"          # one token sequence through a stack of transformer blocks (layer ranges)
SPLIT_HEADS = "split_heads"          # self-attention over every token, its heads separable (all-to-all)
# Why a model that lacks a capability is refused a strategy that needs it, said when asked for;
# a capability without an entry just leaves the strategy off the model's list.
WHY_MISSING = {
    RELATIVE_TIME: "its temporal layers add sinusoidal positions by frame index, and Video-Infinity's authors "
                   "state that dual-scope attention fails with temporal position embeddings",
}


@dataclass(frozen=True)
class Family:
    name: str                        # ModelInfo.family
    capabilities: frozenset[str]
    native_latent_frames: int        # where a variant does not say
    slice_chunks: int                # savers: the feature slicer's "auto" chunk count
    step_caches: tuple[str, ...]     # savers: the step caches it can run (savers.STEP_CACHES kinds)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("wan", frozenset({SPLIT_FRAMES, RELATIVE_TIME, BLOCK_STACK, SPLIT_HEADS}), 21, 4, ("fbc", "taylorseer")),
    Family("unet3d", frozenset({SPLIT_FRAMES, RELATIVE_TIME}), 16, 4, ("every", "auto")),
    Family("animatediff", frozenset({SPLIT_FRAMES}), 16, 4, ("every", "auto")),
)}


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    pipeline: str                    # model_index.json `_class_name`
    sets: tuple[str, ...] = ()       # model_index.json keys it sets (non-null, true)
    modes: tuple[str, ...] = ("t2v",)  # ModelInfo.modes: "t2v" a prompt, "i2v" a prompt and a first frame
    experts: int = 1                 # denoisers switched along the schedule
    native_latent_frames: int = 0    # 0: the family's

    @property
    def native(self) -> int:
        return self.native_latent_frames or FAMILIES[self.family].native_latent_frames


# First match wins: the more specific entry of a pipeline class first.
VARIANTS: tuple[Variant, ...] = (
    Variant("Wan 2.2 TI2V-5B", "wan", "WanPipeline", ("expand_timesteps",), ("t2v", "i2v"),
            native_latent_frames=31),  # trained on 121 frames
    Variant("Wan 2.2 T2V-A14B", "wan", "WanPipeline", ("transformer_2",), experts=2),
    Variant("Wan 2.1 T2V", "wan", "WanPipeline"),
    Variant("Wan 2.2 I2V-A14B", "wan", "WanImageToVideoPipeline", ("transformer_2",), ("i2v",), experts=2),
    Variant("Wan 2.1 I2V", "wan", "WanImageToVideoPipeline", (), ("i2v",)),
    Variant("UNet3D (zeroscope, ModelScope)", "unet3d", "TextToVideoSDPipeline"),
    Variant("VideoCrafter2 (diffusers layout)", "unet3d", "VideoCrafterPipeline"),
    Variant("AnimateDiff", "animatediff", "AnimateDiffPipeline"),
)


def _is_set(value) -> bool:
    """A model_index.json entry that is present: a component saved as [library, class] (not
    [null, null]), or a true flag."""
    if isinstance(value, (list, tuple)):
        return bool(value) and value[0] is not None
    return bool(value)


def variant_of(model_index: dict) -> Variant:
    """The variant of a folder's model_index.json; ValueError naming the supported pipelines."""
    pipeline = model_index.get("_class_name", "")
    for variant in VARIANTS:
        if variant.pipeline == pipeline and all(_is_set(model_index.get(key)) for key in variant.sets):
            return variant
    supported = ", ".join(dict.fromkeys(v.pipeline for v in VARIANTS))
    raise ValueError(f"pipeline {pipeline!r} is not supported; supported: {supported}")
