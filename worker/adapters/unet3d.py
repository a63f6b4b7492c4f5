"""UNet3D family adapter (zeroscope_v2, ModelScope text-to-video-ms-1.7b, VideoCrafter2 in
diffusers layout): *where* things are in a diffusers TextToVideoSDPipeline, and the one hook
VideoCrafter2 needs, attached through forward hooks so the stock model is never edited.

What mixes frames in a UNet3D (everything else is per frame, so a clip is exact on its own):
- temporal attention: attn1 and attn2 of every BasicTransformerBlock inside every
  TransformerTemporalModel (unet.transformer_in and each block's temp_attentions); both are
  temporal self-attention over the frames of one latent pixel;
- TemporalConvLayer: 4 stacked kernel-3 convolutions along time;
- GroupNorm over [B, C, F, H, W]: TransformerTemporalModel.norm and the norms opening
  TemporalConvLayer.conv1..conv4 (their statistics span all frames).
The VAE is a 2D AutoencoderKL run frame by frame, so decoding is exact per clip.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import TextToVideoSDPipeline, UNet3DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from diffusers.models.upsampling import Upsample2D
from diffusers.utils import logging as diffusers_logging

from clipmesh.worker.adapters.base import (ATTENTION, FRAME_NORM, PER_FRAME, PER_POSITION, TEMPORAL_CONV, AttentionOps,
                                           DeepPath, FrameMixer, ModelAdapter, SliceGroup)

log = logging.getLogger(__name__)
DEFAULT_FPS = 24  # VideoCrafter2's conditioning frame rate (its reference pipeline's default)
FPS_PREFIX = "fps_embedding."  # extra unet weights of VideoCrafter2 in diffusers layout
DECODE_CHUNK = 16  # frames per VAE call: bounds decode memory; frames are independent
PER_FRAME_MODULES = (ResnetBlock2D, Transformer2DModel, Downsample2D, Upsample2D)  # on [B*F, ...], frame by frame


def read_fps_embedding(unet_folder: Path) -> dict[str, torch.Tensor] | None:
    """The `fps_embedding.*` weights a VideoCrafter2 unet carries beside the stock UNet3D ones
    (stock UNet3DConditionModel ignores them), keyed without the prefix; None if absent.
    Reads safetensors (single file or shards) by key, or else .bin checkpoints."""
    unet_folder = Path(unet_folder)
    found: dict[str, torch.Tensor] = {}
    files = sorted(unet_folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(FPS_PREFIX):
                        found.setdefault(key[len(FPS_PREFIX):], f.get_tensor(key))
    else:
        for file in sorted(unet_folder.glob("*.bin")):
            state = torch.load(file, map_location="cpu", weights_only=True)
            found.update({k[len(FPS_PREFIX):]: v for k, v in state.items() if k.startswith(FPS_PREFIX)})
    return found or None


class FpsEmbedding(torch.nn.Module):
    """VideoCrafter2's frame-rate conditioning: fps -> sinusoidal projection (the same as the
    unet's time projection: flip_sin_to_cos, no shift) -> TimestepEmbedding MLP; the result is
    added to the unet's time embedding for every sample."""

    def __init__(self, weights: dict[str, torch.Tensor], act_fn: str = "silu"):
        super().__init__()
        channels, hidden = weights["linear_1.weight"].shape[1], weights["linear_1.weight"].shape[0]
        out = weights["linear_2.weight"].shape[0]
        self.proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedding = TimestepEmbedding(channels, hidden, act_fn=act_fn, out_dim=out)
        self.embedding.load_state_dict(weights, strict=True)

    def forward(self, fps: float, device, dtype) -> torch.Tensor:
        f = torch.tensor([fps], dtype=torch.float64, device=device)
        return self.embedding(self.proj(f).to(dtype))  # [1, time_embed_dim]


def install_fps_embedding(unet, fps_embedding: FpsEmbedding, fps_of):
    """Add fps_embedding(fps_of()) to unet.time_embedding's output (a forward hook). Returns the handle."""

    def hook(module, args, output):
        return output + fps_embedding(fps_of(), output.device, output.dtype).expand_as(output)

    return unet.time_embedding.register_forward_hook(hook)


def load_unet3d(folder, device: torch.device | str, dtype: torch.dtype) -> tuple[TextToVideoSDPipeline, FpsEmbedding | None]:
    """Load like zeroscope_v2 / ModelScope (`TextToVideoSDPipeline.from_pretrained`). The unet is
    loaded as a stock UNet3DConditionModel first, so a VideoCrafter2 folder whose unet config
    names a custom class (and carries fps weights) loads too; its fps weights come back separately."""
    weights = read_fps_embedding(Path(folder) / "unet")
    verbosity = diffusers_logging.get_verbosity()
    if weights is not None:  # diffusers would warn that the fps weights and config keys go unused: we use them
        diffusers_logging.set_verbosity_error()
    try:
        unet = UNet3DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe = TextToVideoSDPipeline.from_pretrained(folder, unet=unet, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    fps_embedding = None
    if weights is not None:
        fps_embedding = FpsEmbedding(weights, act_fn=unet.config.act_fn).to(device=device, dtype=dtype).eval()
        log.info("%s: VideoCrafter2 fps embedding found; conditioning on fps=%s", folder, DEFAULT_FPS)
    return pipe, fps_embedding


def temporal_transformers(unet) -> list[TransformerTemporalModel]:
    return [m for m in unet.modules() if isinstance(m, TransformerTemporalModel)]


def temporal_attentions(unet) -> list[torch.nn.Module]:
    """attn1 and attn2 of every block of every TransformerTemporalModel (unet.transformer_in
    included): in UNet3D both are self-attention over frames (double_self_attention)."""
    attns = []
    for tt in temporal_transformers(unet):
        for block in tt.transformer_blocks:
            attns += [a for a in (block.attn1, block.attn2) if a is not None]
    return attns


class TemporalAttentionOps(AttentionOps):
    """A temporal self-attention as diffusers' AttnProcessor runs it on [B*h*w, F, C], in the
    [B, F, S, H, D] layout with B = the latent pixels and S = 1 (no positions in time)."""

    def qkv(self, attn, hidden_states, frames, rotary_emb=None):
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.dim() != 3:
            raise NotImplementedError("temporal attention is expected as a plain Attention on [B*h*w, F, C]")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        rows = hidden_states.shape[0]
        return tuple(t.reshape(rows, frames, 1, attn.heads, -1) for t in (q, k, v))

    def out(self, attn, out, hidden_states):
        """The output projection, residual and rescale, as AttnProcessor ends."""
        out = out.reshape(*hidden_states.shape[:2], -1).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def scale(self, attn):
        return attn.scale


def temporal_convs(unet) -> list[TemporalConvLayer]:
    return [m for m in unet.modules() if isinstance(m, TemporalConvLayer)]


def frame_norms(unet) -> list[torch.nn.GroupNorm]:
    """Every GroupNorm whose statistics span frames: TransformerTemporalModel.norm and the
    norms inside TemporalConvLayer (conv1..conv4). Spatial norms run on [B*F, C, H, W] and are per frame."""
    norms = [tt.norm for tt in temporal_transformers(unet)]
    for conv in temporal_convs(unet):
        norms += [m for m in conv.modules() if isinstance(m, torch.nn.GroupNorm)]
    return norms


def slice_groups(unet, convs=(), per_frame=PER_FRAME_MODULES,
                 per_position=(TransformerTemporalModel,)) -> list[SliceGroup]:
    """The UNet's 2D `convs` and frame-wise modules (`per_frame` types) as PER_FRAME groups and its
    temporal transformers (`per_position` types) as PER_POSITION groups (the convs first, then in
    model order)."""
    groups = [SliceGroup(PER_FRAME, conv) for conv in convs]
    for module in unet.modules():
        if isinstance(module, per_position):
            groups.append(SliceGroup(PER_POSITION, module))
        elif isinstance(module, per_frame):
            groups.append(SliceGroup(PER_FRAME, module))
    return groups


def unet_deep_path(unet) -> DeepPath:
    """DeepCache's cut of a diffusers video UNet (UNet3DConditionModel, UNetMotionModel), whose
    forward calls conv_in, down_blocks, mid_block, up_blocks and conv_out in sequence, handing the
    down blocks' res_samples to the up blocks: the shallow path is conv_in (and transformer_in),
    down_blocks[0], up_blocks[-1] and conv_out; every other block is deep (skipped at rehash steps)
    and the input of the last up block, up_blocks[-2]'s output, is the reused feature. The skipped
    down blocks' stand-in res_samples are never read: the last up block takes only down_blocks[0]'s
    and conv_in's."""
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
        raise NotImplementedError("step rehash needs a UNet with at least two levels")
    mid = (unet.mid_block,) if unet.mid_block is not None else ()
    return DeepPath((*unet.down_blocks[1:], *mid, *unet.up_blocks[:-1]), unet.up_blocks[-2])


def is_stochastic(scheduler) -> bool:
    """Schedulers that draw noise inside step() (SDE DPM-Solver, ancestral samplers): that noise
    would depend on how the video is split. (DDIM's eta stays 0: step() passes none.)"""
    return str(scheduler.config.get("algorithm_type", "")).startswith("sde") or \
        type(scheduler).__name__ in ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


class UNet3DAdapter(ModelAdapter):
    family = "unet3d"
    pipeline_class = "TextToVideoSDPipeline"
    pipeline_aliases = ("VideoCrafterPipeline",)  # VideoCrafter2 folders in diffusers layout

    def __init__(self, pipe, device, fps_embedding: FpsEmbedding | None = None, fps: float = DEFAULT_FPS):
        super().__init__(pipe, device)
        self.fps_embedding, self.fps = fps_embedding, fps
        self._fps_hook = None
        if fps_embedding is not None:
            self._fps_hook = install_fps_embedding(pipe.unet, fps_embedding, lambda: self.fps)

    @classmethod
    def load(cls, folder, device, dtype) -> "UNet3DAdapter":
        pipe, fps_embedding = load_unet3d(folder, device, dtype)
        return cls(pipe, device, fps_embedding)

    def place(self, device, keep) -> None:
        """VideoCrafter2's fps embedding goes with the time embedding it adds to, on the device
        (a copy of the unet on the device runs it through the same hook)."""
        super().place(device, keep)
        if self.fps_embedding is not None:
            self.fps_embedding.to(device)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    # -- where the frame-mixing modules are (for strategies) ----------------
    def frame_mixers(self) -> list[FrameMixer]:
        ops = TemporalAttentionOps()
        return [*(FrameMixer(ATTENTION, attn, ops) for attn in self.temporal_attentions()),
                *(FrameMixer(TEMPORAL_CONV, conv) for conv in self.temporal_convs()),
                *(FrameMixer(FRAME_NORM, norm) for norm in self.frame_norms())]

    def temporal_attentions(self) -> list[torch.nn.Module]:
        return temporal_attentions(self.pipe.unet)

    def temporal_convs(self) -> list[TemporalConvLayer]:
        return temporal_convs(self.pipe.unet)

    def frame_norms(self) -> list[torch.nn.GroupNorm]:
        return frame_norms(self.pipe.unet)

    def slice_groups(self) -> list[SliceGroup]:
        """conv_in, every resnet, spatial transformer, down- and upsampler and conv_out per chunk of
        the B*F frame rows; every TransformerTemporalModel per chunk of latent pixels. The temporal
        convs stay whole (their norms span frames and positions; they carry the halo exchange)."""
        return slice_groups(self.pipe.unet, (self.pipe.unet.conv_in, self.pipe.unet.conv_out))

    def deep_path(self) -> DeepPath:
        return unet_deep_path(self.pipe.unet)

    # -- the denoising loop's pieces ------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return self.pipe.unet.config.in_channels, height // f, width // f

    def new_scheduler(self):
        scheduler = super().new_scheduler()
        if is_stochastic(scheduler):
            raise NotImplementedError(
                f"{type(scheduler).__name__} ({scheduler.config.get('algorithm_type', '')}) draws noise in every step, "
                "which would depend on how the video is split; use a deterministic scheduler (DDIM, DPM-Solver++)")
        return scheduler

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance_scale: float):
        """(cond, uncond) CLIP embeddings as TextToVideoSDPipeline.__call__ makes them; uncond None without CFG."""
        cond, uncond = self.pipe.encode_prompt(prompt, self.device, 1, guidance_scale > 1.0,
                                               negative_prompt=negative_prompt or None)
        dtype = self.pipe.unet.dtype
        return cond.to(dtype), (uncond.to(dtype) if uncond is not None else None)

    def predict(self, latents, t, scheduler, cond, uncond, guidance_scale, image=None):
        """TextToVideoSDPipeline's step body: one batched unet call [uncond; cond], then CFG."""
        text = torch.cat([uncond, cond]) if uncond is not None else cond
        return self.batched_cfg(self.pipe.unet, latents, t, scheduler, text, uncond, guidance_scale)

    def step(self, scheduler, pred, t, latents):
        """The pipeline steps the scheduler on frames as images [B*F, C, h, w]; so do we."""
        b, c, f, h, w = latents.shape
        as_images = lambda x: x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # noqa: E731
        out = scheduler.step(as_images(pred), t, as_images(latents), return_dict=False)[0]
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [1, C, F, h, w] -> uint8 frames [F, H, W, 3]: TextToVideoSDPipeline.decode_latents
        and postprocess, DECODE_CHUNK frames per VAE call (each frame is decoded alone anyway)."""
        vae = self.pipe.vae
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        b, c, f, h, w = latents.shape
        images = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        decoded = torch.cat([vae.decode(images[i:i + DECODE_CHUNK]).sample for i in range(0, b * f, DECODE_CHUNK)])
        return self.to_uint8(decoded.reshape((b, f) + decoded.shape[1:]).permute(0, 2, 1, 3, 4).float())
