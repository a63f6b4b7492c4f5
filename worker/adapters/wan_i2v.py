"""Wan image-to-video (WanImageToVideoPipeline folders: Wan 2.1 I2V-14B, Wan 2.2 I2V-A14B): the
T2V adapter plus the image's conditioning. Everything that mixes frames is the same transformer,
so every strategy runs it unchanged; what a rank adds is the conditioning of its own frames:
  channels  4 of first-frame mask (ones on latent frame 0) and the VAE latents of
            [image, zeros...] (normalised as the denoiser's latents), beside the 16 noisy ones;
  embeds    Wan 2.1 I2V only (transformer.config.image_dim): the CLIP vision encoder's
            penultimate states, read by every block's cross-attention beside the text.
The condition latents of a clip are encoded exactly without the video (wan_encode.py)."""

from __future__ import annotations

import functools

import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline

from clipmesh.worker.adapters.base import ImagePart
from clipmesh.worker.adapters.wan import WanAdapter
from clipmesh.worker.adapters.wan_encode import ConditionEncoder


class WanI2VAdapter(WanAdapter):
    pipeline_class = "WanImageToVideoPipeline"
    takes_image = True

    @classmethod
    def load(cls, folder, device, dtype) -> "WanI2VAdapter":
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        pipe = WanImageToVideoPipeline.from_pretrained(folder, vae=vae, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device)

    @functools.cached_property
    def condition_encoder(self) -> ConditionEncoder:
        return ConditionEncoder(self.pipe.vae)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The noisy latents' channels (the VAE's z_dim): the transformer's in_channels also
        count the image's."""
        f = self.pipe.vae_scale_factor_spatial
        return self.pipe.vae.config.z_dim, height // f, width // f

    @torch.no_grad()
    def image_condition(self, image, height: int, width: int, latent_frames: int = 0) -> "WanImageCondition":
        """As WanImageToVideoPipeline.__call__ prepares it, for a video of `latent_frames` (0:
        unbounded): the image resized and normalised by its video processor, encoded with zeros
        after it (wan_encode.py: only the head of the video), the CLIP embedding where the
        transformer reads one."""
        pipe = self.pipe
        embeds = None
        if pipe.transformer.config.image_dim is not None:
            embeds = pipe.encode_image(image, self.device).to(pipe.transformer.dtype)
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        head = self.condition_encoder.encode_head(pixels, latent_frames).to(self.device, torch.float32)
        return WanImageCondition(self, self.normalize(head), embeds)


class WanImageCondition:
    """One job's image, ready for any clip: `part(start, end)` is exactly what the pipeline's
    prepare_latents makes for latent frames [start, end) of the whole video."""

    def __init__(self, adapter: WanI2VAdapter, head: torch.Tensor, embeds: torch.Tensor | None):
        self.adapter, self.head, self.embeds = adapter, head, embeds

    def part(self, start: int, end: int) -> ImagePart:
        latents = ConditionEncoder.clip(self.head, start, end)
        mask = latents.new_zeros(1, self.adapter.pipe.vae_scale_factor_temporal, end - start, *latents.shape[3:])
        if start == 0:
            mask[:, :, 0] = 1.0  # the first latent frame is the given image
        return ImagePart(torch.cat([mask, latents], dim=1), self.embeds)
