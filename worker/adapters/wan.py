"""Wan family adapter: *where* things are in a diffusers Wan pipeline, and the few hooks
clipmesh needs, attached only through diffusers' extension points (attention processors,
forward hooks) so the stock model is never edited and can serve many jobs.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline

from clipmesh.plan import num_output_frames
from clipmesh.worker.adapters.base import (ATTENTION, PER_TOKEN, POSITIONS, AttentionOps, FrameMixer, ImagePart,
                                           ModelAdapter, SliceGroup, tiling)
from clipmesh.worker.adapters.wan_decode import ClipDecoder
from clipmesh.worker.adapters.wan_rope import WanGlobalRope, apply_rope, global_positions_hook, rope_rows

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default text length
DECODE_CHUNK = 4  # latent frames per streamed VAE chunk (16 video frames): bounds the float video held at once


def text_length(tokenizer) -> int:
    """The text length prompts are padded to: WanPipeline's default, or the tokenizer's own limit
    where it is shorter (toy-wan's prompts fit in 32 tokens; 480 pads would only cost time)."""
    return min(MAX_SEQUENCE_LENGTH, tokenizer.model_max_length)


def load_wan(folder, device: torch.device | str, dtype: torch.dtype) -> WanPipeline:
    """Load exactly like Wan2.1-T2V-*-Diffusers; the VAE stays fp32 as Wan recommends."""
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class WanAttentionOps(AttentionOps):
    """Wan's attn1 (WanAttnProcessor's self-attention) in the [B, F, S, H, D] layout: tokens are
    frame-major, S = h*w patches per latent frame."""

    def __init__(self, rope: torch.nn.Module):
        self.rope = rope

    def project(self, attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw q, k, v [B, tokens, inner] (fused or not): before the norms and RoPE."""
        if getattr(attn, "fused_projections", False):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    def heads(self, attn, q, k, v) -> tuple[torch.Tensor, ...]:
        """RMSNorm across heads on q and k (per token), then [B, tokens, H, D]."""
        q, k = attn.norm_q(q), attn.norm_k(k)
        return tuple(t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))

    def qkv(self, attn, hidden_states, frames, rotary_emb=None):
        q, k, v = self.heads(attn, *self.project(attn, hidden_states))
        if rotary_emb is not None:
            q, k = apply_rope(q, *rotary_emb), apply_rope(k, *rotary_emb)
        if q.shape[1] % frames:
            raise ValueError(f"{q.shape[1]} tokens are not {frames} frames of equal size")
        return tuple(t.unflatten(1, (frames, -1)) for t in (q, k, v))

    def out(self, attn, out, hidden_states):
        out = out.flatten(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))

    def global_rekey(self, policy, halo, native):
        return None if policy == "true" else WanGlobalRope(self.rope, policy, halo, native)


class WanStages:
    """WanTransformer3DModel.forward cut at its block boundaries, op for op, so pipeline stages
    can each run a range of blocks: embed (rank 0), condition (every rank), blocks, head (last).
    Hidden states are [B, tokens, dim] with frame-major tokens."""

    def __init__(self, transformer):
        self.t = transformer
        p_t, self.p_h, self.p_w = transformer.config.patch_size
        if p_t != 1:
            raise NotImplementedError(f"block-wise Wan needs temporal patch size 1, this model has {p_t}")

    def embed(self, latents: torch.Tensor, image=None) -> torch.Tensor:
        """Patch embedding of latents [1, C, F, h, w] (image-to-video: with the ImagePart of the same frames)."""
        if image is not None:
            latents = image.denoiser_input(latents)
        x = self.t.patch_embedding(latents.to(self.t.dtype))
        return x.flatten(2).transpose(1, 2).contiguous()

    def condition(self, timestep: torch.Tensor, text: torch.Tensor, image_embeds: torch.Tensor | None = None):
        """(temb, timestep_proj [B, 6, dim], projected text) for timesteps [B] (TI2V: [B, tokens],
        then temb [B, tokens, dim] and timestep_proj [B, tokens, 6, dim]) and text [B, L, D]; image
        embeddings [B, L', D'] go before the text, as the transformer's forward puts them."""
        per_token = timestep.shape[1] if timestep.ndim == 2 else None
        temb, proj, text, image = self.t.condition_embedder(timestep.flatten(), text, image_embeds,
                                                            timestep_seq_len=per_token)
        if image is not None:
            text = torch.concat([image, text], dim=1)
        return temb, proj.unflatten(proj.ndim - 1, (6, -1)), text

    def blocks(self, hidden, start: int, end: int, text, timestep_proj, rotary_emb) -> torch.Tensor:
        for block in self.t.blocks[start:end]:
            hidden = block(hidden, text, timestep_proj, rotary_emb)
        return hidden

    def rope(self, frames: int, height: int, width: int):
        return rope_rows(self.t, frames, height, width)

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """Output norm, projection and unpatchify: [B, tokens, dim] -> [B, C, frames, height, width]."""
        if temb.ndim == 3:  # per token (TI2V)
            shift, scale = (self.t.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.t.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (self.t.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = self.t.proj_out(hidden)
        h, w = height // self.p_h, width // self.p_w
        hidden = hidden.reshape(hidden.shape[0], frames, h, w, 1, self.p_h, self.p_w, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class WanAdapter(ModelAdapter):
    family = "wan"
    pipeline_class = "WanPipeline"
    # every block's attentions and FFN, as in the TaylorSeer paper (diffusers' default, "^blocks.*attn",
    # matches no Wan module: they are attn1 and attn2)
    taylorseer_modules = (r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn")
    denoiser_attrs = ("transformer", "transformer_2")

    @classmethod
    def load(cls, folder, device, dtype) -> "WanAdapter":
        return cls(load_wan(folder, device, dtype), device)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        """Every expert: Wan 2.2 A14B's high-noise `transformer` and low-noise `transformer_2`."""
        second = getattr(self.pipe, "transformer_2", None)
        return [self.pipe.transformer] + ([second] if second is not None else [])

    @functools.cached_property
    def boundary_timestep(self) -> float | None:
        """WanPipeline's switch: `transformer` for t >= boundary_ratio * num_train_timesteps,
        `transformer_2` below (None: one expert)."""
        ratio = self.pipe.config.get("boundary_ratio") if len(self.denoisers) > 1 else None
        return None if ratio is None else ratio * self.pipe.scheduler.config.num_train_timesteps

    def shard_units(self, denoiser):
        """Every transformer block."""
        return list(denoiser.blocks)

    def expert(self, t) -> int:
        """The expert that denoises at timestep t: a property of the step, the same on every rank."""
        return 0 if self.boundary_timestep is None or t >= self.boundary_timestep else 1

    @property
    def temporal_stride(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    def self_attentions(self) -> list[torch.nn.Module]:
        """The modules that mix tokens across frames: attn1 of every block of every expert (attn2
        is text cross-attention)."""
        return [block.attn1 for transformer in self.denoisers for block in transformer.blocks]

    def frame_mixers(self) -> list[FrameMixer]:
        """RoPE (positions in time) and every block's attn1, of every expert; everything else in
        Wan is per token. `layer` counts the blocks of one expert."""
        mixers = []
        for transformer in self.denoisers:
            ops = WanAttentionOps(transformer.rope)
            mixers += [FrameMixer(POSITIONS, transformer.rope, functools.partial(global_positions_hook, transformer)),
                       *(FrameMixer(ATTENTION, block.attn1, ops, layer) for layer, block in enumerate(transformer.blocks))]
        return mixers

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor_spatial
        return self.pipe.transformer.config.in_channels, height // f, width // f

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance_scale: float):
        """(cond, uncond) text embeddings as WanPipeline.__call__ makes them; uncond is None without CFG."""
        cond, uncond = self.pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt or None,
            do_classifier_free_guidance=guidance_scale > 1.0,
            max_sequence_length=text_length(self.pipe.tokenizer), device=self.device)
        dtype = self.pipe.transformer.dtype
        return cond.to(dtype), (uncond.to(dtype) if uncond is not None else None)

    def predict(self, latents, t, scheduler, cond, uncond, guidance_scale, image=None):
        """WanPipeline's step body: the expert of timestep t, two calls of it (cond, uncond), each
        in its diffusers cache context as WanPipeline names them (when a step cache enabled one),
        then CFG (`guidance_scale`: the expert's, Denoising.guidance_at). Image-to-video
        (WanImageToVideoPipeline's body): the image's channels beside the latents, its embedding
        beside the text."""
        transformer = self.denoisers[self.expert(t)]
        x, embeds, timestep = latents, None, self.timestep(t, latents.shape[0], *latents.shape[2:], image)
        if image is not None:
            x, embeds = image.denoiser_input(latents), image.embeds
        x = x.to(transformer.dtype)
        with self.cache_context("cond", transformer):
            pred = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond,
                               encoder_hidden_states_image=embeds, return_dict=False)[0]
        if uncond is not None:
            with self.cache_context("uncond", transformer):
                pred_u = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                                     encoder_hidden_states_image=embeds, return_dict=False)[0]
            pred = pred_u + guidance_scale * (pred - pred_u)
        return pred

    @property
    def expands_timesteps(self) -> bool:
        """Wan 2.2 TI2V: a timestep per token, 0 on the tokens of a first frame held at the image."""
        return bool(self.pipe.config.get("expand_timesteps", False))

    def timestep(self, t, batch: int, frames: int, height: int, width: int, image=None) -> torch.Tensor:
        """The transformer's timestep for latents [batch, C, frames, height, width]: t per sample,
        or (TI2V) per token, as WanPipeline / WanImageToVideoPipeline make it for these frames."""
        if not self.expands_timesteps:
            return t.expand(batch)
        _, p_h, p_w = self.pipe.transformer.config.patch_size
        mask = torch.ones(frames, height // p_h, width // p_w, device=t.device)
        if image is not None and image.first_frame is not None:
            mask[0] = 0
        return (mask * t).flatten().unsqueeze(0).expand(batch, -1)

    @torch.no_grad()
    def image_condition(self, image, height: int, width: int, latent_frames: int = 0):
        """TI2V (expand_timesteps): the first latent frame is the image's, encoded alone, as
        WanImageToVideoPipeline prepares it for such a folder; a T2V-only Wan refuses."""
        if not self.expands_timesteps:
            return super().image_condition(image, height, width, latent_frames)
        vae = self.pipe.vae
        pixels = self.pipe.video_processor.preprocess(image, height=height, width=width).to(vae.device, vae.dtype)
        latents = vae.encode(pixels.unsqueeze(2)).latent_dist.mode().to(self.device, torch.float32)
        return FirstFrame(self.normalize(latents))

    def cache_context(self, name: str, transformer=None):
        """diffusers' `cache_context(name)` while a cache is enabled on the transformer (a step cache,
        savers/step_cache.py), so its state is kept per call; else nothing (the stock model stays untouched)."""
        transformer = transformer or self.pipe.transformer
        return transformer.cache_context(name) if transformer.is_cache_enabled else contextlib.nullcontext()

    def slice_groups(self) -> list[SliceGroup]:
        """Every transformer block of every expert: attn1 (the strategy's) on all tokens, the rest
        per chunk of tokens."""
        return [SliceGroup(PER_TOKEN, block) for transformer in self.denoisers for block in transformer.blocks]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [1, C, F, h, w] -> uint8 frames [N, H, W, 3]: WanPipeline.__call__'s post-loop
        steps, DECODE_CHUNK latent frames at a time through one decode stream (the causal cache
        carried across chunks): bit for bit one `vae.decode` call, one chunk's frames at a time."""
        frames: list[np.ndarray] = []
        self.decode_clip(latents, 0, 0, lambda latent_start, piece: frames.append(piece))
        return np.concatenate(frames)

    @functools.cached_property
    def clip_decoder(self) -> ClipDecoder:
        return ClipDecoder(self.pipe.vae)

    decode_chunk = DECODE_CHUNK

    @property
    def decode_lookback(self) -> int:
        """The causal VAE's warm-up before a clip (wan_decode.py: tiny-wan 31, Wan 2.1 39, Wan 2.2's
        residual VAE 39)."""
        return self.clip_decoder.warmup[0]

    def decode_stream(self, first, start, tiled=False):
        """Every rank decodes its own clip exactly, from the warm-up before it (wan_decode.py).
        Tiled (savers.tiled_decode): diffusers' own decode of what is fed (a new cache per feed:
        exact only for one feed from frame 0)."""
        if tiled:
            return WholeStream(self, first, start, tiled)
        return WanStream(self, self.clip_decoder.stream(first, start))

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latents_mean and 1 / latents_std, on `like`'s device and dtype."""
        vae = self.pipe.vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(like)
        return mean, 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(like)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents -> the denoiser's (the pipelines' step after vae.encode: an image's condition)."""
        mean, inv_std = self._latent_stats(latents)
        return (latents - mean) * inv_std

    def unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> the VAE's latent space (WanPipeline's step before vae.decode)."""
        latents = latents.to(self.pipe.vae.device, self.pipe.vae.dtype)
        mean, inv_std = self._latent_stats(latents)
        return latents / inv_std + mean


class FirstFrame:
    """A TI2V job's image: the part of frames that start the video holds latent frame 0 at it."""

    embeds = None

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def part(self, start: int, end: int) -> ImagePart:
        return ImagePart(first_frame=self.latents if start == 0 else None)


class WanStream:
    """wan_decode.ClipStream on denoiser latents, handing on uint8 frames."""

    def __init__(self, adapter: WanAdapter, stream):
        self.adapter, self.stream = adapter, stream

    def feed(self, latents, on_frames, chunk: int | None = None) -> None:
        to_uint8 = self.adapter.to_uint8
        self.stream.feed(self.adapter.unnormalize(latents), lambda s, video: on_frames(s, to_uint8(video)),
                         chunk or self.adapter.decode_chunk)


class WholeStream:
    """Each feed is one diffusers decode of what is fed (a new causal cache; tiled: in blended
    spatial tiles, frame memory bounded by a tile), the frames of latent frames before `start`
    dropped. Approximate where a run is fed in more than one piece, or tiled."""

    def __init__(self, adapter: WanAdapter, first: int, start: int, tiled: bool):
        self.adapter, self.start, self.next, self.tiled = adapter, start, first, tiled

    @torch.no_grad()
    def feed(self, latents, on_frames, chunk: int | None = None) -> None:
        first, self.next = self.next, self.next + latents.shape[2]
        with tiling(self.adapter.pipe.vae, self.tiled):
            video = self.adapter.pipe.vae.decode(self.adapter.unnormalize(latents), return_dict=False)[0]
        # a decode from `first` gives `first` one frame, every later latent frame `stride`
        skip = num_output_frames(self.start - first, self.adapter.temporal_stride) if self.start > first else 0
        on_frames(max(first, self.start), self.adapter.to_uint8(video[:, :, skip:]))
