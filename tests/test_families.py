"""The families registry (clipmesh.families): a folder's model_index.json picks its variant, the
variant and its family say what the rest of the code asks (limits, modes, experts, native length,
saver defaults), and strategies are offered by capability, not by family name."""

from __future__ import annotations

import pytest

from clipmesh import families, savers, specs
from clipmesh.families import FAMILIES, Family, variant_of
from clipmesh.presets import limits_from_configs

WAN_TRANSFORMER = {"patch_size": [1, 2, 2], "rope_max_seq_len": 1024, "num_layers": 30, "num_attention_heads": 12}
WAN_VAE = {"z_dim": 16}
UNSET = [None, None]  # how diffusers saves a component a pipeline does not have

# model_index.json of the real folders, abridged to what the registry reads
INDEXES = {
    "Wan 2.1 T2V": {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                    "transformer_2": UNSET, "boundary_ratio": None, "expand_timesteps": False},
    "Wan 2.2 T2V-A14B": {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                         "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875},
    "Wan 2.2 TI2V-5B": {"_class_name": "WanPipeline", "transformer_2": UNSET, "expand_timesteps": True},
    "Wan 2.1 I2V": {"_class_name": "WanImageToVideoPipeline", "image_encoder": ["transformers", "CLIPVisionModel"],
                    "transformer_2": UNSET},
    "Wan 2.2 I2V-A14B": {"_class_name": "WanImageToVideoPipeline", "image_encoder": UNSET,
                         "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.9},
}


@pytest.mark.parametrize("name", INDEXES)
def test_a_folder_picks_its_variant_and_its_limits_follow(name):
    variant = variant_of(INDEXES[name])
    assert variant.name == name and variant.family == "wan"
    limits = limits_from_configs(WAN_TRANSFORMER, WAN_VAE, "/models/x", INDEXES[name])
    assert (limits["modes"], limits["experts"], limits["native_latent_frames"]) == (
        list(variant.modes), variant.experts, variant.native)
    assert limits["strategies"] == specs.strategies_for("wan")
    expected = {"Wan 2.1 T2V": (["t2v"], 1, 21), "Wan 2.2 T2V-A14B": (["t2v"], 2, 21),
                "Wan 2.2 TI2V-5B": (["t2v", "i2v"], 1, 31), "Wan 2.1 I2V": (["i2v"], 1, 21),
                "Wan 2.2 I2V-A14B": (["i2v"], 2, 21)}[name]
    assert (limits["modes"], limits["experts"], limits["native_latent_frames"]) == expected


def test_an_unsupported_pipeline_names_the_supported_ones():
    with pytest.raises(ValueError, match="'FluxPipeline' is not supported; supported: WanPipeline, "
                                         "WanImageToVideoPipeline, TextToVideoSDPipeline"):
        variant_of({"_class_name": "FluxPipeline"})


def test_strategies_are_offered_by_capability(monkeypatch):
    """A family with a stack of blocks but absolute frame positions gets exact and block_pipeline,
    and is refused clip_parallel with the reason; the three families get what they always had."""
    assert specs.strategies_for("wan") == ["exact", "clip_parallel", "block_pipeline", "ulysses"]
    assert specs.strategies_for("unet3d") == ["exact", "clip_parallel"]
    assert specs.strategies_for("animatediff") == ["exact"]
    new = Family("absolute-dit", frozenset({families.SPLIT_FRAMES, families.BLOCK_STACK}), 13, 2, ("fbc",))
    monkeypatch.setitem(FAMILIES, new.name, new)
    assert specs.strategies_for("absolute-dit") == ["exact", "block_pipeline"]
    assert "position embeddings" in specs.STRATEGY_SPECS["clip_parallel"].refusal("absolute-dit")
    assert specs.STRATEGY_SPECS["ulysses"].refusal("absolute-dit") is None  # not offered, no reason to give
    assert specs.STRATEGY_SPECS["clip_parallel"].option("local_halo").default_for("absolute-dit") == 13 // 2


def test_saver_defaults_come_from_the_family():
    import clipmesh.v1.clipmesh_pb2 as pb

    req = pb.SubmitJobRequest(savers=pb.SaverOptions(slice_chunks=savers.AUTO))
    for name, family in FAMILIES.items():
        assert savers.resolve_savers(req, name).slice_chunks == family.slice_chunks
        for kind, (runs_on, *_rest) in savers.STEP_CACHES.items():
            assert (name in runs_on) == (kind in family.step_caches)
