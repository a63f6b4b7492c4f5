"""Wan family adapter: *where* things are in a diffusers Wan pipeline, and the few hooks
clipmesh needs, attached only through diffusers' extension points (attention processors,
forward hooks) so the stock model is never edited and can serve many jobs.
"""

from __future__ import annotations


import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline

from clipmesh.presets import PRESETS, limits_from_configs
from clipmesh.v1 import clipmesh_pb2
from clipmesh.worker.adapters.base import ModelAdapter

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default text length


def load_wan(folder, device: torch.device | str, dtype: torch.dtype) -> WanPipeline:
    """Load exactly like Wan2.1-T2V-*-Diffusers; the VAE stays fp32 as Wan recommends."""
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def self_attentions(transformer) -> list[torch.nn.Module]:
    """The modules that mix tokens across frames: attn1 of every block (attn2 is text cross-attention)."""
    return [block.attn1 for block in transformer.blocks]


def install_global_rope(transformer, frame_start: int):
    """Make `transformer.rope` return the RoPE of global latent frames [frame_start, frame_start+F)
    for a local clip of F frames, instead of [0, F). Returns the hook handle (call .remove()).

    The hook asks the stock rope module for a video of frame_start+F frames (a shape-only
    meta tensor: rope reads only the shape) and keeps the last F frames' rows, so the
    frequencies are the module's own, bit for bit. Rows are frame-major (f, h, w).
    """
    p_t, p_h, p_w = transformer.config.patch_size
    if p_t != 1:
        raise NotImplementedError(f"clip-parallel Wan needs temporal patch size 1, this model has {p_t}")
    rope = transformer.rope
    limit = rope.max_seq_len

    def hook(module, args, output):
        b, c, f, h, w = args[0].shape
        if frame_start + f > limit:
            raise ValueError(f"latent frames up to {frame_start + f} exceed the model's RoPE table ({limit})")
        stand_in = torch.empty((b, c, frame_start + f, h, w), device="meta")
        cos, sin = type(module).forward(module, stand_in)
        skip = frame_start * (h // p_h) * (w // p_w)
        return cos[:, skip:], sin[:, skip:]

    return rope.register_forward_hook(hook)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved-pair rotation, op for op as in diffusers' WanAttnProcessor.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, tokens, H, D] of a Wan attn1 exactly as WanAttnProcessor makes them (fused or
    not, RMSNorm across heads, RoPE): the part of self-attention that is per token, hence local."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary_emb is not None:
        q, k = _apply_rope(q, *rotary_emb), _apply_rope(k, *rotary_emb)
    return q, k, v


class WanAdapter(ModelAdapter):
    family = "wan"
    pipeline_class = "WanPipeline"

    @classmethod
    def load(cls, folder, device, dtype) -> "WanAdapter":
        return cls(load_wan(folder, device, dtype), device)

    def model_info(self, name: str) -> clipmesh_pb2.ModelInfo:
        """What this loaded model accepts, for Register: preset data, or derived from its configs."""
        if name in PRESETS:
            limits = PRESETS[name]["limits"]
        else:
            limits = limits_from_configs(dict(self.pipe.transformer.config), dict(self.pipe.vae.config))
        return clipmesh_pb2.ModelInfo(name=name, **limits)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def self_attentions(self) -> list[torch.nn.Module]:
        return self_attentions(self.pipe.transformer)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor_spatial
        return self.pipe.transformer.config.in_channels, height // f, width // f

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance_scale: float):
        """(cond, uncond) text embeddings as WanPipeline.__call__ makes them; uncond is None without CFG."""
        cond, uncond = self.pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt or None,
            do_classifier_free_guidance=guidance_scale > 1.0,
            max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.device)
        dtype = self.pipe.transformer.dtype
        return cond.to(dtype), (uncond.to(dtype) if uncond is not None else None)

    def predict(self, latents, t, scheduler, cond, uncond, guidance_scale):
        """WanPipeline's step body: two transformer calls (cond, uncond), then CFG."""
        transformer = self.pipe.transformer
        x, timestep = latents.to(transformer.dtype), t.expand(latents.shape[0])
        pred = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        if uncond is not None:
            pred_u = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[0]
            pred = pred_u + guidance_scale * (pred - pred_u)
        return pred

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [1, C, F, h, w] -> uint8 frames [N, H, W, 3]: WanPipeline.__call__'s post-loop steps.
        Wan's VAE is causal in time, so the whole video is decoded on one rank."""
        vae = self.pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        video = vae.decode(latents, return_dict=False)[0]
        frames = self.pipe.video_processor.postprocess_video(video, output_type="np")[0]  # float in [0, 1]
        return (frames * 255.0).round().clip(0, 255).astype(np.uint8)
