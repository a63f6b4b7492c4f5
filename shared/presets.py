"""Model presets (random-weight Wan models built offline) and model folders.

Why presets: tests, demos and benchmarks need a real Wan *architecture* without a
model hub or a GPU. A preset is built once per machine into a diffusers folder, so
it is loaded exactly like Wan2.1-T2V-1.3B-Diffusers: `WanPipeline.from_pretrained`.

This module is imported by the coordinator, which has no torch: torch/diffusers
are imported only inside `_build`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from clipmesh.plan import num_output_frames

# Scheduler of real Wan 2.1 (its scheduler_config.json), shared by every preset.
_WAN_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    solver_order=2, prediction_type="flow_prediction", thresholding=False, predict_x0=True,
    solver_type="bh2", lower_order_final=True, disable_corrector=[], use_flow_sigmas=True,
    flow_shift=3.0, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
)


def _vae(base_dim: int, z_dim: int) -> dict:
    # dim_mult of length 4 -> 3 spatial halvings (x8); temperal_downsample -> x4 in time,
    # the same factors as the real Wan VAE, just narrow.
    return dict(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
                latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)


def _umt5(d_model: int) -> dict:
    # vocab_size: 3 specials + 256 byte symbols of the offline tokenizer (see _tokenizer).
    return dict(vocab_size=259, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
                num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


PRESETS: dict[str, dict] = {
    # Seconds on CPU at 64x64: the CI / demo model.
    "tiny-wan": {
        "transformer": dict(
            patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12,  # 12: rope splits t/h/w by 6
            in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "vae": _vae(base_dim=8, z_dim=16),
        "text_encoder": _umt5(32),
        "scheduler": _WAN_SCHEDULER,
        "limits": dict(family="wan", spatial_multiple=16, temporal_stride=4, max_frames=1025,
                       max_side=512, strategies=["exact"]),
    },
    # 256x256, hundreds of frames: long token sequences where attention dominates.
    "bench-wan": {
        "transformer": dict(
            patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=64,
            in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=4,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "vae": _vae(base_dim=8, z_dim=16),
        "text_encoder": _umt5(64),
        "scheduler": _WAN_SCHEDULER,
        "limits": dict(family="wan", spatial_multiple=16, temporal_stride=4, max_frames=1025,
                       max_side=512, strategies=["exact"]),
    },
}

_VERSION = "v1"  # bump when a preset's config changes, so stale cached folders are not reused
_SEED = 20240601


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CLIPMESH_CACHE") or pathlib.Path.home() / ".cache" / "clipmesh")


def model_folder(name_or_path: str) -> pathlib.Path:
    """A diffusers folder for a preset name (built on first use) or a local folder path."""
    if name_or_path in PRESETS:
        target = cache_root() / f"{name_or_path}-{_VERSION}"
        if not (target / "model_index.json").is_file():
            _build_into(name_or_path, target)
        return target
    folder = pathlib.Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                                f"nor an existing folder")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no model_index.json (not a diffusers pipeline folder)")
    return folder


def _build_into(name: str, target: pathlib.Path) -> None:
    # Several workers may build the same preset at once: each builds in its own temp dir
    # beside the target (same filesystem, so rename is atomic); the first rename wins and
    # the losers discard theirs. A reader never sees a half-written folder.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _build(name, tmp)
        try:
            os.rename(tmp, target)  # fails if target exists (non-empty dir) -> someone else won
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer():
    """Byte-level tokenizer built without training or downloads: deterministic on every host."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # T5 order: pad=0, eos=1, unk=2
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # like T5
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def _build(name: str, out: pathlib.Path) -> None:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = PRESETS[name]
    torch.manual_seed(_SEED)  # same weights on every host (same torch version)
    tokenizer = _tokenizer()
    assert len(tokenizer) == cfg["text_encoder"]["vocab_size"], len(tokenizer)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(UMT5Config(**cfg["text_encoder"])).eval(),
        vae=AutoencoderKLWan(**cfg["vae"]).eval(),
        scheduler=UniPCMultistepScheduler(**cfg["scheduler"]),
        transformer=WanTransformer3DModel(**cfg["transformer"]).eval(),
    )
    pipe.save_pretrained(out)


def limits_from_configs(transformer_cfg: dict, vae_cfg: dict) -> dict:
    """Limits of a Wan folder from its config json files (real Wan folders lack scale_factor_*)."""
    p_t, p_h, _ = transformer_cfg.get("patch_size", [1, 2, 2])
    spatial = vae_cfg.get("scale_factor_spatial") or 2 ** (len(vae_cfg.get("dim_mult", [1, 2, 4, 4])) - 1)
    temporal = vae_cfg.get("scale_factor_temporal") or 2 ** sum(vae_cfg.get("temperal_downsample", [False, True, True]))
    rope = transformer_cfg.get("rope_max_seq_len", 1024)
    return dict(
        family="wan",
        spatial_multiple=spatial * p_h,
        temporal_stride=temporal,
        # the RoPE table has rope_max_seq_len rows: latent frames (global positions) must fit
        max_frames=num_output_frames(rope // p_t, temporal),
        max_side=min(rope * spatial * p_h, 1280),  # 1280: Wan's largest trained side (720p)
        strategies=["exact"],
    )


def model_limits(name_or_path: str) -> dict:
    """What a request must satisfy for this model; no torch import (used by the coordinator)."""
    if name_or_path in PRESETS:
        return {"name": name_or_path, **PRESETS[name_or_path]["limits"]}
    folder = model_folder(name_or_path)
    t_cfg = json.loads((folder / "transformer" / "config.json").read_text())
    v_cfg = json.loads((folder / "vae" / "config.json").read_text())
    return {"name": name_or_path, **limits_from_configs(t_cfg, v_cfg)}
