"""Model presets (random-weight Wan, UNet3D and AnimateDiff models built offline) and model folders.

Why presets: tests, demos and benchmarks need a real *architecture* without a model hub
or a GPU. A preset is built once per machine into a diffusers folder, so it is loaded
exactly like the real thing: a Wan preset like Wan2.1-T2V-1.3B-Diffusers
(`WanPipeline.from_pretrained`), a UNet3D preset like zeroscope_v2_576w / ModelScope
text-to-video-ms-1.7b (`TextToVideoSDPipeline.from_pretrained`), an AnimateDiff preset like
a saved AnimateDiffPipeline (an SD 1.5 UNet with a MotionAdapter: `AnimateDiffPipeline.from_pretrained`).

This module is imported by the coordinator, which has no torch: torch/diffusers
are imported only inside `_build`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile

from clipmesh.families import FAMILIES, variant_of
from clipmesh.plan import num_output_frames
from clipmesh.specs import strategies_for

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


# Scheduler of ModelScope text-to-video-ms-1.7b and zeroscope_v2 (their scheduler_config.json):
# DDIM, epsilon prediction, no thresholding or clipping, so a step is elementwise over the latents.
_UNET3D_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", thresholding=False,
)
UNET3D_VAE_SCALE = 8  # AutoencoderKL with 4 blocks: 3 spatial halvings, no temporal compression


def _unet(channels: tuple[int, ...], groups: int, head_dim: int, text_dim: int, layers: int = 1, dims: int = 3) -> dict:
    # A UNet3DConditionModel (dims 3) or an SD 1.5-style UNet2DConditionModel (dims 2): every
    # block but the last is a cross-attention block, as in ModelScope and SD 1.5.
    # `attention_head_dim` is what it says in the 3D blocks: their attentions have
    # channels // head_dim heads (see _unet3d_heads); only the 2D UNet's blocks read it as the
    # number of heads (SD 1.5's 8).
    n = len(channels)
    return dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=list(channels),
                down_block_types=[f"CrossAttnDownBlock{dims}D"] * (n - 1) + [f"DownBlock{dims}D"],
                up_block_types=[f"UpBlock{dims}D"] + [f"CrossAttnUpBlock{dims}D"] * (n - 1),
                layers_per_block=layers, norm_num_groups=groups, cross_attention_dim=text_dim,
                attention_head_dim=head_dim)


def _vae_kl(width: int) -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                block_out_channels=[width] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, sample_size=256, scaling_factor=0.18215)


def _clip_text(hidden: int) -> dict:
    # vocab: 256 byte symbols, the same with the end-of-word mark, then the two CLIP specials
    # (ids 512, 513: last, as in real CLIP), see _clip_tokenizer.
    return dict(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                pad_token_id=513, hidden_act="quick_gelu", projection_dim=hidden)


def _unet3d_heads(unet_cfg: dict) -> int:
    """Heads every temporal attention of a UNet3DConditionModel has (so a split of heads over
    workers fits them all): transformer_in has 8; each cross-attention block's (and the mid
    block's) have channels // attention_head_dim."""
    channels = unet_cfg.get("block_out_channels", [320, 640, 1280, 1280])
    head_dims = unet_cfg.get("attention_head_dim", 64)
    head_dims = head_dims if isinstance(head_dims, list) else [head_dims] * len(channels)
    down = unet_cfg.get("down_block_types", ["CrossAttnDownBlock3D"] * (len(channels) - 1) + ["DownBlock3D"])
    heads = [c // d for c, d, kind in zip(channels, head_dims, down) if kind.startswith("CrossAttn")]
    return math.gcd(8, channels[-1] // head_dims[-1], *heads)


# AnimateDiff's usual scheduler (its documentation's DDIM on an SD 1.5 base): linear betas, no
# clipping, linspace spacing; epsilon prediction, no thresholding: a step is elementwise.
_ANIMATEDIFF_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="linspace",
    prediction_type="epsilon", thresholding=False,
)
MOTION_MAX_SEQ_LENGTH = 32  # MotionAdapter's default positional table: the frames one video may have


def _motion_adapter(channels: tuple[int, ...], groups: int, heads: int, layers: int = 1) -> dict:
    # MotionAdapter v1.5-2's layout: motion modules after every resnet of every block
    # (`layers` per down block, one more per up block) and one in the mid block.
    return dict(block_out_channels=list(channels), motion_layers_per_block=layers,
                motion_mid_block_layers_per_block=1, motion_num_attention_heads=heads,
                motion_norm_num_groups=groups, motion_max_seq_length=MOTION_MAX_SEQ_LENGTH,
                use_motion_mid_block=True)


def _motion_unet_config(preset: dict) -> dict:
    """The UNetMotionModel config an AnimateDiff preset's folder has: the UNet's, with the
    motion adapter's keys that UNetMotionModel.from_unet2d copies into it."""
    adapter = preset["motion_adapter"]
    return {**preset["unet"], "_class_name": "UNetMotionModel",
            **{k: adapter[k] for k in ("motion_num_attention_heads", "motion_max_seq_length", "use_motion_mid_block")}}


def _motion_heads(unet_cfg: dict) -> int:
    """Heads every motion module's temporal attention has (one count, or one per block)."""
    heads = unet_cfg.get("motion_num_attention_heads", 8)
    return math.gcd(*heads) if isinstance(heads, (list, tuple)) else heads


def _with_shape(limits: dict, denoiser_cfg: dict) -> dict:
    """`limits` plus what follows from the family and the denoiser: the family's strategies, and
    the transformer blocks and attention heads that strategies split."""
    if limits["family"] == "unet3d":
        shape = dict(attention_heads=_unet3d_heads(denoiser_cfg))
    elif limits["family"] == "animatediff":
        shape = dict(attention_heads=_motion_heads(denoiser_cfg))
    else:  # defaults: Wan2.1-T2V-1.3B
        shape = dict(num_layers=denoiser_cfg.get("num_layers", 30),
                     attention_heads=denoiser_cfg.get("num_attention_heads", 12))
    return {"experts": 1, "modes": ["t2v"], **limits, "strategies": strategies_for(limits["family"]), **shape}


def _denoiser_config(preset: dict) -> dict:
    """The denoiser config a preset's folder has (transformer/ or unet/)."""
    if "motion_adapter" in preset:
        return _motion_unet_config(preset)
    return preset.get("transformer") or preset["unet"]


PRESETS: dict[str, dict] = {
    # Seconds on CPU at 64x64: the CI / demo model.
    "tiny-wan": {
        "transformer": dict(
            patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12,  # 12: rope splits t/h/w by 6
            in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=4,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "vae": _vae(base_dim=8, z_dim=16),
        "text_encoder": _umt5(32),
        "scheduler": _WAN_SCHEDULER,
        "limits": dict(family="wan", spatial_multiple=16, temporal_stride=4, max_frames=1025,
                       max_side=512, native_latent_frames=21),
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
                       max_side=512, native_latent_frames=21),
    },
    # Trained on the toy world (clipmesh.toytrain): shapes that move as the prompt says, at
    # 64x64 and 17 frames (5 latent frames). Its weights ship in the package (TRAINED_ROOT); the
    # other presets' configs build random weights. A VAE of x4 in space (16x16 latents): at x8
    # a small VAE on CPU learned the colours but blurred the shapes away.
    "toy-wan": {
        "transformer": dict(
            patch_size=[1, 4, 4], num_attention_heads=8, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=64, ffn_dim=512, num_layers=6, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "vae": dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                    temperal_downsample=[True, True], dropout=0.0, scale_factor_spatial=4, scale_factor_temporal=4),
        "text_encoder": _umt5(32),
        "scheduler": _WAN_SCHEDULER,
        # Option defaults sized to its native 5 latent frames, as the family's are to Wan's 21:
        # clip_parallel's window follows native_latent_frames (P = 2); blocks of 3 with 1 frame of
        # context each way (DualParal).
        "limits": dict(family="wan", spatial_multiple=16, temporal_stride=4, max_frames=1025,
                       max_side=256, native_latent_frames=5,
                       block_pipeline_defaults=dict(block_frames=3, context_frames=1)),
        "trained": True,
    },
    # UNet3D (zeroscope / ModelScope / VideoCrafter2 architecture): seconds on CPU at 64x64.
    "tiny-unet3d": {
        "unet": _unet((32, 64), groups=8, head_dim=4, text_dim=32),
        "vae": _vae_kl(8),
        "text_encoder": _clip_text(32),
        "scheduler": _UNET3D_SCHEDULER,
        "limits": dict(family="unet3d", spatial_multiple=UNET3D_VAE_SCALE, temporal_stride=1, max_frames=1024,
                       max_side=512, native_latent_frames=16),
        "branch_init": 0.1,  # see _build_unet3d
        "version": "v2",
    },
    # The real block layout (4 levels, 2 layers each: the same 34 temporal attentions and 22
    # temporal convs as zeroscope) at 1/5 of the width: 256x256, hundreds of frames.
    "bench-unet3d": {
        "unet": _unet((64, 128, 256, 256), groups=32, head_dim=8, text_dim=64, layers=2),
        "vae": _vae_kl(8),
        "text_encoder": _clip_text(64),
        "scheduler": _UNET3D_SCHEDULER,
        "limits": dict(family="unet3d", spatial_multiple=UNET3D_VAE_SCALE, temporal_stride=1, max_frames=1024,
                       max_side=512, native_latent_frames=16),
        "branch_init": 0.1,
        "version": "v2",
    },
    # AnimateDiff (an SD 1.5 UNet + MotionAdapter): seconds on CPU at 64x64.
    "tiny-animatediff": {
        "unet": _unet((32, 64), groups=8, head_dim=2, text_dim=32, dims=2),
        "motion_adapter": _motion_adapter((32, 64), groups=8, heads=2),
        "vae": _vae_kl(8),
        "text_encoder": _clip_text(32),
        "scheduler": _ANIMATEDIFF_SCHEDULER,
        "limits": dict(family="animatediff", spatial_multiple=UNET3D_VAE_SCALE, temporal_stride=1,
                       max_frames=MOTION_MAX_SEQ_LENGTH, max_side=512, native_latent_frames=16),
        "branch_init": 0.1,  # see _init_like_trained
    },
    # SD 1.5's module counts (4 levels, 2 layers each, 8 heads; with MotionAdapter v1.5-2: 21
    # motion modules, 42 temporal attentions) at 1/5 of the width: 256x256, up to 32 frames.
    "bench-animatediff": {
        "unet": _unet((64, 128, 256, 256), groups=32, head_dim=8, text_dim=64, layers=2, dims=2),
        "motion_adapter": _motion_adapter((64, 128, 256, 256), groups=32, heads=8, layers=2),
        "vae": _vae_kl(8),
        "text_encoder": _clip_text(64),
        "scheduler": _ANIMATEDIFF_SCHEDULER,
        "limits": dict(family="animatediff", spatial_multiple=UNET3D_VAE_SCALE, temporal_stride=1,
                       max_frames=MOTION_MAX_SEQ_LENGTH, max_side=512, native_latent_frames=16),
        "branch_init": 0.1,
    },
}

# Wan 2.2 A14B's layout (T2V-A14B-Diffusers) at tiny-wan's size: two experts, the high-noise
# `transformer` for timesteps >= boundary_ratio * 1000 and the low-noise `transformer_2` below
# (each built with its own random weights).
PRESETS["tiny-wan22"] = {**PRESETS["tiny-wan"], "boundary_ratio": 0.875}  # Wan2.2-T2V-A14B's model_index.json
PRESETS["bench-wan22"] = {**PRESETS["bench-wan"], "boundary_ratio": 0.875}  # the memory of two experts per stage

# Image-to-video at tiny-wan's size (WanImageToVideoPipeline folders): the transformer takes 36
# channels (16 noisy latents, 4 of first-frame mask, 16 of the encoded [image, zeros...]).
# Wan 2.1 I2V-14B also reads the image through a CLIP vision encoder (image_dim: its hidden size;
# added_kv_proj_dim: the transformer's inner dim, as 5120 is the 14B's); Wan 2.2 I2V-A14B has no
# image encoder and two experts (boundary 0.9, its model_index.json).
_I2V_TRANSFORMER = {**PRESETS["tiny-wan"]["transformer"], "in_channels": 36, "out_channels": 16}
PRESETS["tiny-wan-i2v"] = {
    **PRESETS["tiny-wan"], "pipeline": "WanImageToVideoPipeline",
    "transformer": {**_I2V_TRANSFORMER, "image_dim": 32, "added_kv_proj_dim": 24},
    "image_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=32)}
# Wan 2.2 TI2V-5B's layout at a tiny size: its VAE (z_dim 48, residual blocks, 2x2 patches as
# channels: x16 in space), a 48-channel transformer, and per-token timesteps (expand_timesteps):
# text-to-video, and image-to-video from the same folder (the first latent frame held at the image's).
PRESETS["tiny-wan-ti2v"] = {
    **PRESETS["tiny-wan"],
    "transformer": {**PRESETS["tiny-wan"]["transformer"], "in_channels": 48, "out_channels": 48},
    "vae": dict(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12,
                out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
    "expand_timesteps": True,
    "limits": {**PRESETS["tiny-wan"]["limits"], "spatial_multiple": 32, "native_latent_frames": 31}}
PRESETS["tiny-wan22-i2v"] = {**PRESETS["tiny-wan"], "pipeline": "WanImageToVideoPipeline",
                             "transformer": _I2V_TRANSFORMER, "boundary_ratio": 0.9}


def _wan_index(preset: dict) -> dict:
    """What a Wan preset's folder says in its model_index.json, of what picks its variant
    (families.variant_of): the pipeline class, a second expert, an image encoder, per-token timesteps."""
    return {"_class_name": preset.get("pipeline", "WanPipeline"),
            "transformer_2": ["diffusers", "WanTransformer3DModel"] if "boundary_ratio" in preset else [None, None],
            "image_encoder": ["transformers", "CLIPVisionModel"] if "image_encoder" in preset else [None, None],
            "expand_timesteps": bool(preset.get("expand_timesteps"))}


for _preset in PRESETS.values():  # as a folder of these configs reports them: modes, experts, strategies, layers, heads
    if _preset["limits"]["family"] == "wan":
        _variant = variant_of(_wan_index(_preset))
        _preset["limits"] = {"experts": _variant.experts, "modes": list(_variant.modes), **_preset["limits"]}
    _preset["limits"] = _with_shape(_preset["limits"], _denoiser_config(_preset))

_VERSION = "v2"  # bump when a preset's config changes, so stale cached folders are not reused
# (a preset's own "version" overrides it: bump that when only that preset's weights change)
_SEED = 20240601


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CLIPMESH_CACHE") or pathlib.Path.home() / ".cache" / "clipmesh")


TRAINED_ROOT = pathlib.Path(__file__).resolve().parent / "models"  # trained presets' folders, in the package


def model_folder(name_or_path: str) -> pathlib.Path:
    """A diffusers folder for a preset name (built on first use, or shipped trained) or a local folder path."""
    if PRESETS.get(name_or_path, {}).get("trained"):
        folder = TRAINED_ROOT / name_or_path
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"the trained preset {name_or_path!r} is missing from {folder} "
                                    f"(python -m clipmesh.toytrain makes it)")
        return folder
    if name_or_path in PRESETS:
        target = cache_root() / f"{name_or_path}-{PRESETS[name_or_path].get('version', _VERSION)}"
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


def _clip_tokenizer():
    """CLIP's byte-level BPE with no merges, built offline: every byte is a symbol (plus its
    end-of-word form), so any prompt tokenizes, deterministically on every host."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [a + "</w>" for a in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=[], model_max_length=77)


def _build(name: str, out: pathlib.Path) -> None:
    import torch

    torch.manual_seed(_SEED)  # same weights on every host (same torch version)
    family = PRESETS[name]["limits"]["family"]
    if family == "unet3d":
        return _build_unet3d(name, out)
    if family == "animatediff":
        return _build_animatediff(name, out)
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = PRESETS[name]
    tokenizer = _tokenizer()
    assert len(tokenizer) == cfg["text_encoder"]["vocab_size"], len(tokenizer)
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(UMT5Config(**cfg["text_encoder"])).eval(),
        vae=AutoencoderKLWan(**cfg["vae"]).eval(),
        scheduler=UniPCMultistepScheduler(**cfg["scheduler"]),
        transformer=WanTransformer3DModel(**cfg["transformer"]).eval(),
        transformer_2=WanTransformer3DModel(**cfg["transformer"]).eval() if cfg["limits"]["experts"] == 2 else None,
        boundary_ratio=cfg.get("boundary_ratio"),
    )
    if cfg.get("expand_timesteps"):  # TI2V: a WanPipeline folder that also takes an image
        return WanPipeline(**parts, expand_timesteps=True).save_pretrained(out)
    if cfg.get("pipeline") != "WanImageToVideoPipeline":
        return WanPipeline(**parts).save_pretrained(out)
    if "image_encoder" in cfg:  # Wan 2.1 I2V: CLIP ViT-H/14 and its processor, here tiny
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        side = cfg["image_encoder"]["image_size"]
        parts.update(image_encoder=CLIPVisionModel(CLIPVisionConfig(**cfg["image_encoder"])).eval(),
                     image_processor=CLIPImageProcessor(size={"shortest_edge": side},
                                                        crop_size={"height": side, "width": side}))
    WanImageToVideoPipeline(**parts).save_pretrained(out)


def _sd_parts(cfg: dict) -> dict:
    """The Stable Diffusion-style components of a UNet preset's pipeline beside its unet: VAE,
    CLIP text encoder and tokenizer, DDIM (made after the unet, in this order: same weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    assert len(tokenizer) == cfg["text_encoder"]["vocab_size"], len(tokenizer)
    return dict(vae=AutoencoderKL(**cfg["vae"]).eval(),
                text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval(),
                tokenizer=tokenizer, scheduler=DDIMScheduler(**cfg["scheduler"]))


def _build_unet3d(name: str, out: pathlib.Path) -> None:
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    cfg = PRESETS[name]
    unet = UNet3DConditionModel(**cfg["unet"]).eval()
    _init_like_trained(unet, cfg["branch_init"])
    TextToVideoSDPipeline(unet=unet, **_sd_parts(cfg)).save_pretrained(out)


def _build_animatediff(name: str, out: pathlib.Path) -> None:
    """As a user makes an AnimateDiff pipeline: an SD UNet2DConditionModel and a MotionAdapter,
    which AnimateDiffPipeline turns into a UNetMotionModel (UNetMotionModel.from_unet2d); saved
    with both, as a saved AnimateDiffPipeline folder is."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel

    cfg = PRESETS[name]
    unet, adapter = UNet2DConditionModel(**cfg["unet"]).eval(), MotionAdapter(**cfg["motion_adapter"]).eval()
    for part in (unet, adapter):  # before the merge: the saved adapter is the unet's motion modules
        _init_like_trained(part, cfg["branch_init"])
    AnimateDiffPipeline(unet=unet, motion_adapter=adapter, **_sd_parts(cfg)).save_pretrained(out)


def _init_like_trained(unet, scale: float) -> None:
    """Give a random UNet3D the conditioning of a trained one, in place.

    The LDM / ModelScope training code starts the last layer of every residual branch at zero
    (ResnetBlock2D.conv2, the proj_out of every Transformer2DModel and TransformerTemporalModel,
    the last conv of TemporalConvLayer.conv4) and the output conv too: each block starts as the
    identity and training grows its branch. diffusers keeps only the TemporalConvLayer zero;
    at PyTorch's default init every branch is as large as its input, so 1-ulp rounding
    differences grow through the network (this preset's 3-step DDIM at CFG 9 amplified them to
    4e-5 in the final latents, far above the 1e-5 the tests check). These layers get
    `scale` x their default init (weights and biases): every branch, every temporal path
    included, still changes the output, none is the identity. AnimateDiff's training starts
    every motion module's proj_out at zero too: `unet` may also be a MotionAdapter (no conv_out)."""
    import torch
    from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    layers = [unet.conv_out] if hasattr(unet, "conv_out") else []
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            layers.append(module.conv2)
        elif isinstance(module, (Transformer2DModel, TransformerTemporalModel, AnimateDiffTransformer3D)):
            layers.append(module.proj_out)
        elif isinstance(module, TemporalConvLayer):
            module.conv4[-1].reset_parameters()  # diffusers zeroes it
            layers.append(module.conv4[-1])
    with torch.no_grad():
        for layer in layers:
            for param in layer.parameters():
                param.mul_(scale)


def limits_from_configs(denoiser_cfg: dict, vae_cfg: dict, name: str = "", pipeline_cfg: dict | None = None) -> dict:
    """Limits of a model folder from its config json files: the denoiser's (transformer/ for
    Wan, unet/ for UNet3D and AnimateDiff), the VAE's and the pipeline's (model_index.json: its
    variant, families.variant_of, says what it makes, its experts and native length). `name`:
    the folder's name or path (a hint only)."""
    if _is_animatediff(denoiser_cfg):
        return _with_shape(_animatediff_limits(denoiser_cfg, vae_cfg), denoiser_cfg)
    if _is_unet3d(denoiser_cfg):
        return _with_shape(_unet3d_limits(vae_cfg, name), denoiser_cfg)
    variant = variant_of(pipeline_cfg or {"_class_name": "WanPipeline"})
    return _with_shape({**_wan_limits(denoiser_cfg, vae_cfg), "experts": variant.experts, "modes": list(variant.modes),
                        "native_latent_frames": variant.native}, denoiser_cfg)


def _is_animatediff(denoiser_cfg: dict) -> bool:
    return denoiser_cfg.get("_class_name") == "UNetMotionModel" or "motion_max_seq_length" in denoiser_cfg


def _is_unet3d(denoiser_cfg: dict) -> bool:
    return "down_block_types" in denoiser_cfg or str(denoiser_cfg.get("_class_name", "")).startswith("UNet")


def _wan_limits(transformer_cfg: dict, vae_cfg: dict) -> dict:
    """Limits of a Wan folder (real Wan folders lack scale_factor_*)."""
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
    )


def _unet3d_limits(vae_cfg: dict, name: str) -> dict:
    """Limits of a UNet3D folder (zeroscope_v2, ModelScope text-to-video-ms-1.7b, VideoCrafter2 in
    diffusers layout): 2D AutoencoderKL decoded frame by frame, so one latent frame per frame.
    UNet3D has no positional table in time or space: the frame and side caps are practical ones."""
    spatial = _kl_scale(vae_cfg)
    # Trained lengths: zeroscope_v2 24 frames; ModelScope and VideoCrafter2 16. The configs do not
    # tell zeroscope from ModelScope (same architecture), so the folder name decides.
    native = 24 if "zeroscope" in name.lower() else FAMILIES["unet3d"].native_latent_frames
    return dict(family="unet3d", spatial_multiple=spatial, temporal_stride=1, max_frames=1024, max_side=1024,
                native_latent_frames=native)


def _animatediff_limits(unet_cfg: dict, vae_cfg: dict) -> dict:
    """Limits of an AnimateDiff folder (a UNetMotionModel unet): 2D AutoencoderKL decoded frame by
    frame; the motion modules add sinusoidal positions by frame index from a table of
    motion_max_seq_length rows, so a video has at most that many frames. Trained on 16 frames."""
    return dict(family="animatediff", spatial_multiple=_kl_scale(vae_cfg), temporal_stride=1,
                max_frames=unet_cfg.get("motion_max_seq_length", MOTION_MAX_SEQ_LENGTH), max_side=1024,
                native_latent_frames=FAMILIES["animatediff"].native_latent_frames)


def _kl_scale(vae_cfg: dict) -> int:
    """The spatial factor of a 2D AutoencoderKL: one halving per block but the last."""
    return 2 ** (len(vae_cfg.get("block_out_channels", [128, 256, 512, 512])) - 1)


def model_limits(name_or_path: str) -> dict:
    """What a request must satisfy for this model; no torch import (used by the coordinator)."""
    if name_or_path in PRESETS:
        return {"name": name_or_path, **PRESETS[name_or_path]["limits"]}
    folder = model_folder(name_or_path)
    denoiser = "unet" if (folder / "unet" / "config.json").is_file() else "transformer"
    d_cfg = json.loads((folder / denoiser / "config.json").read_text())
    v_cfg = json.loads((folder / "vae" / "config.json").read_text())
    p_cfg = json.loads((folder / "model_index.json").read_text())
    return {"name": name_or_path, **limits_from_configs(d_cfg, v_cfg, str(folder), p_cfg), **declared_limits(folder)}


DECLARED_LIMITS = "clipmesh.json"  # in a model folder: what its configs cannot say
DECLARABLE = ("native_latent_frames", "block_pipeline_defaults")


def declared_limits(folder) -> dict:
    """The limits a model folder declares in its clipmesh.json, over those derived from its
    configs: the configs say the architecture, not the length it was trained on, so weights
    fine-tuned on other clips (toy-wan's exported by clipmesh.toytrain) say
    {"native_latent_frames": 5, "block_pipeline_defaults": {"block_frames": 3, "context_frames": 1}},
    and clip_parallel's window, entropy scaling and block_pipeline's blocks follow them."""
    path = pathlib.Path(folder) / DECLARED_LIMITS
    if not path.is_file():
        return {}
    declared = json.loads(path.read_text())
    unknown = set(declared) - set(DECLARABLE)
    native, blocks = declared.get("native_latent_frames", 1), declared.get("block_pipeline_defaults", {})
    if (unknown or not isinstance(native, int) or native < 1 or set(blocks) - {"block_frames", "context_frames"}
            or not all(isinstance(v, int) and v >= 0 for v in blocks.values())):
        raise ValueError(f"{path}: only native_latent_frames (an int >= 1) and block_pipeline_defaults "
                         f"({{block_frames, context_frames}}: ints >= 0) may be declared, got {declared}")
    return declared
