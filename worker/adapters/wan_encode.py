"""Exact image-to-video condition latents for any clip of a video, without encoding the video.

WanImageToVideoPipeline encodes [image, zeros x (num_frames - 1)] with the causal VAE, once,
over the whole video: a 257-frame video at 480p is 257 full frames through the encoder on one
rank. But the encoder runs chunk by chunk (the first frame alone, then 4 frames per latent
frame) and every causal conv looks back a fixed number of frames, so latent frame s depends only
on the chunks s - R .. s (R: the encoder's receptive field in latent frames). Past R + 1 every
chunk in reach is zeros, run through the same ops on the same shapes: every later latent frame
is the same tensor, bit for bit. So the condition of any clip is a prefix of R + 2 latent
frames (encoded by diffusers' own `vae.encode`) and that constant frame repeated: the cost and
memory of an encode of (R + 1) * 4 + 1 frames on each rank, whatever the video's length.

R from the encoder's layout: each causal conv looks back its time padding (2 frames for a
kernel of 3) at its input's rate (video frames per latent frame: 4, halved by each temporal
downsample), each temporal downsample one cached frame at its rate; R is the sum, rounded up.
tests/test_wan_i2v.py measures where the tail turns constant and checks R bounds it.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample


class ConditionEncoder:
    """The VAE latents of [image, zeros...] for latent frames [start, end) of a video."""

    def __init__(self, vae):
        if not self.supports(vae):
            raise NotImplementedError("the per-clip condition encode needs a Wan 2.1 VAE")
        self.vae = vae
        rate, lookback = vae.config.scale_factor_temporal, 0.0
        for module in vae.encoder.modules():
            if isinstance(module, WanCausalConv3d):
                lookback += module._padding[4] / rate
            elif isinstance(module, WanResample) and module.mode == "downsample3d":
                lookback += 1 / rate  # its time conv reads one cached frame before each chunk
                rate //= 2
        self.receptive_field = math.ceil(lookback)

    @staticmethod
    def supports(vae) -> bool:
        """Wan 2.1's VAE (Wan 2.2's patchified, residual encoder is cut differently)."""
        return vae.config.patch_size is None and not getattr(vae.config, "is_residual", False)

    def head_frames(self, latent_frames: int) -> int:
        """Latent frames to encode for a video of `latent_frames` (0: unbounded): every later one
        equals the last of them."""
        return min(latent_frames or self.receptive_field + 2, self.receptive_field + 2)

    @torch.no_grad()
    def encode_head(self, image: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """image [1, 3, H, W] in [-1, 1] -> the latents of the first head_frames(latent_frames)
        latent frames (the posterior's mode, as the pipeline's `retrieve_latents(...,
        sample_mode="argmax")`), by one `vae.encode` of [image, zeros...]."""
        vae, frames = self.vae, self.head_frames(latent_frames)
        zeros = image.new_zeros(*image.shape[:2], vae.config.scale_factor_temporal * (frames - 1), *image.shape[2:])
        return vae.encode(torch.cat([image.unsqueeze(2), zeros], dim=2).to(vae.device, vae.dtype)).latent_dist.mode()

    @staticmethod
    def clip(head: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Latent frames [start, end) of the video from its head (encode_head): past the head, its last frame."""
        index = torch.arange(start, end, device=head.device).clamp(max=head.shape[2] - 1)
        return head.index_select(2, index)
