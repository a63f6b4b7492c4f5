"""AnimateDiff family adapter (an SD 1.5-style UNet with a MotionAdapter, diffusers'
AnimateDiffPipeline with a UNetMotionModel): *where* things are, and the one hook the
frames partition needs, attached through forward hooks so the stock model is never edited.

What mixes frames in a UNetMotionModel (everything else runs on frames as images
[B*F, C, h, w], so a clip is exact on its own): its motion modules (AnimateDiffTransformer3D,
after the resnets of every block and in the mid block), each of which has
- a GroupNorm over [B, C, F, h, w] (its statistics span all frames): FRAME_NORM as it is;
- per transformer block a SinusoidalPositionalEmbedding that adds row f of its table to
  frame f, before attn1 and before attn2: POSITIONS, made global by `global_positions`;
- attn1 and attn2, both temporal self-attention over the frames of one latent pixel
  (double_self_attention, no text): ATTENTION, the same AttnProcessor layout as UNet3D's
  temporal attention, so UNet3D's TemporalAttentionOps serves.
The VAE is a 2D AutoencoderKL run frame by frame, so decoding is exact per clip.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AnimateDiffPipeline
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from clipmesh.worker.adapters.base import ATTENTION, FRAME_NORM, POSITIONS, FrameMixer, ModelAdapter, SliceGroup
from clipmesh.worker.adapters.unet3d import (DECODE_CHUNK, TemporalAttentionOps, UNet3DAdapter, is_stochastic,
                                             slice_groups, unet_deep_path)


def load_animatediff(folder, device: torch.device | str, dtype: torch.dtype) -> AnimateDiffPipeline:
    """Load like a saved AnimateDiffPipeline (its unet a UNetMotionModel)."""
    pipe = AnimateDiffPipeline.from_pretrained(folder, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def motion_modules(unet) -> list[AnimateDiffTransformer3D]:
    return [m for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)]


def global_positions(frame_start: int):
    """A forward hook for a SinusoidalPositionalEmbedding that adds the rows of global frames
    [frame_start, frame_start + F) to a clip of F frames, as the stock module adds rows [0, F)
    to a whole video: x + pe[:, s:s + F], the same addition, so bit for bit the whole video's."""

    def hook(module, args, output):
        (x,) = args
        end = frame_start + x.shape[1]
        if end > module.pe.shape[1]:
            raise ValueError(f"frames [{frame_start}, {end}) lie beyond the motion module's "
                             f"{module.pe.shape[1]} positions")
        return x + module.pe[:, frame_start:end]

    return hook


class AnimateDiffAdapter(ModelAdapter):
    family = "animatediff"
    pipeline_class = "AnimateDiffPipeline"

    @classmethod
    def load(cls, folder, device, dtype) -> "AnimateDiffAdapter":
        return cls(load_animatediff(folder, device, dtype), device)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def deep_path(self):
        """Step rehash skips what UNet3D's does: UNetMotionModel has the same block layout."""
        return unet_deep_path(self.pipe.unet)

    # -- where the frame-mixing modules are (for strategies) ----------------
    def frame_mixers(self) -> list[FrameMixer]:
        """Per motion module, in model order: its norm, then per block its positions and attn1, attn2."""
        ops, mixers = TemporalAttentionOps(), []
        for module in motion_modules(self.pipe.unet):
            mixers.append(FrameMixer(FRAME_NORM, module.norm))
            for block in module.transformer_blocks:
                if block.pos_embed is not None:
                    mixers.append(FrameMixer(POSITIONS, block.pos_embed, global_positions))
                mixers += [FrameMixer(ATTENTION, attn, ops) for attn in (block.attn1, block.attn2) if attn is not None]
        return mixers

    def slice_groups(self) -> list[SliceGroup]:
        """As UNet3D's (savers/slicing.py): conv_in, the resnets, spatial transformers, down- and
        upsamplers and conv_out per chunk of frame rows; every motion module per chunk of latent pixels."""
        unet = self.pipe.unet
        return slice_groups(unet, (unet.conv_in, unet.conv_out), per_position=(AnimateDiffTransformer3D,))

    # -- the denoising loop's pieces ------------------------------------------
    # AnimateDiffPipeline's vae_scale_factor and encode_prompt are Stable Diffusion's, as
    # TextToVideoSDPipeline's are: UNet3D's own methods serve as they are (nothing else of
    # UNet3DAdapter is taken). The prompt is encoded once; predict repeats it per frame.
    latent_shape = UNet3DAdapter.latent_shape
    encode_prompt = UNet3DAdapter.encode_prompt

    def new_scheduler(self):
        scheduler = super().new_scheduler()
        if is_stochastic(scheduler):  # UNet3D's refusal: noise drawn in step() would depend on the split
            raise NotImplementedError(f"{type(scheduler).__name__} draws noise in every step, so the video "
                                      "would depend on how it is split; use DDIM or DPM-Solver++")
        return scheduler

    def predict(self, latents, t, scheduler, cond, uncond, guidance_scale, image=None):
        """AnimateDiffPipeline's step body: one batched unet call [uncond; cond] with the text
        repeated per frame (repeat_interleave over this clip's frames), then CFG. (The scheduler
        step is the base one: the pipeline steps the 5D latents directly, with DDIM's eta 0.)"""
        text = (torch.cat([uncond, cond]) if uncond is not None else cond).repeat_interleave(latents.shape[2], dim=0)
        return self.batched_cfg(self.pipe.unet, latents, t, scheduler, text, uncond, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [1, C, F, h, w] -> uint8 frames [F, H, W, 3]: the pipeline's own decode_latents
        (DECODE_CHUNK frames per VAE call, its default) and postprocess."""
        vae = self.pipe.vae
        return self.to_uint8(self.pipe.decode_latents(latents.to(vae.device, vae.dtype), DECODE_CHUNK))
