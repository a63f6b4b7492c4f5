"""The model-family interface the render loop and the strategies use.

An adapter wraps one loaded diffusers pipeline and says *where* things are, as data: its
`frame_mixers()` lists every module that mixes frames and of which kind (diffusers' `_cp_plan`
is the model), each with the family's own helpers for it. A strategy supplies one handler per
kind (strategies/base.py), so neither the runner (render.py) nor a strategy knows a family.
Everything else in a model is per frame, so a clip of frames is exact on its own. Likewise
`slice_groups()` lists the operator groups the feature slicer may run in chunks. Patching
happens only through processors, hooks and instance forwards (worker/patches.py), never by
editing model code.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from clipmesh.presets import PRESETS, limits_from_configs
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.loras import Loras
from clipmesh.worker.weights import local_parameter_bytes


# The kinds of frame-mixing module (FrameMixer.kind):
ATTENTION = "attention"          # self-attention across frames; ops: the family's AttentionOps
POSITIONS = "positions"          # a module that gives tokens their position in time (Wan's RoPE)
TEMPORAL_CONV = "temporal_conv"  # a convolution along time (UNet3D's TemporalConvLayer)
FRAME_NORM = "frame_norm"        # a GroupNorm whose statistics span frames

# The kinds of operator group the feature slicer runs in chunks (SliceGroup.kind; savers/slicing.py):
PER_FRAME = "per_frame"        # acts on every row of dim 0 (batch*frames) alone (a resnet, a spatial
#                                transformer, a 2D conv): chunks of rows, every batched input sliced alike
PER_POSITION = "per_position"  # a temporal transformer on [B*F, C, H, W] (norm, proj_in, transformer_blocks,
#                                proj_out): the norm on the whole input, then proj_in -> blocks -> proj_out
#                                per chunk of the B*h*w latent pixels (never of the frames)
PER_TOKEN = "per_token"        # a Wan transformer block: attn1 on all tokens, then norm2 -> attn2 -> norm3
#                                -> FFN (and their residuals and modulation) per chunk of tokens


@dataclass(frozen=True)
class FrameMixer:
    kind: str
    module: torch.nn.Module
    ops: object = None   # ATTENTION: how this family's q/k/v and output are made (AttentionOps);
    #                      POSITIONS: ops(frame_start) -> a forward hook that starts positions there
    layer: int = 0       # ATTENTION: the transformer block it sits in (layer partitions)


@dataclass(frozen=True)
class SliceGroup:
    kind: str
    module: torch.nn.Module


class AttentionOps:
    """A family's view of one kind of frame-mixing self-attention, in one layout for every
    strategy: q, k, v and the attention output are [B, F, S, H, D] (F frames of S tokens)."""

    def qkv(self, attn, hidden_states: torch.Tensor, frames: int, rotary_emb=None) -> tuple[torch.Tensor, ...]:
        """q, k, v of `frames` frames as the stock processor makes them (k position-encoded)."""
        raise NotImplementedError

    def out(self, attn, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The module's output from the attention output [B, F, S, H, Dv] (projection, residual)."""
        raise NotImplementedError

    def scale(self, attn) -> float | None:
        """The logit scale (None: 1/sqrt(D))."""
        return None

    def global_rekey(self, policy: str, halo: int, native: int):
        """How global frames are presented to a query frame (dual_scope.Rekey), None: as they are."""
        return None


@dataclass(frozen=True)
class ImagePart:
    """Image-to-video conditioning of some latent frames, as the denoiser takes it: `channels`
    [1, C, n, h, w] go beside the noisy latents (Wan I2V: first-frame mask and the encoded
    [image, zeros...]); `embeds` the image's encoder states (None: the model reads none);
    `first_frame` [1, C, 1, h, w] (Wan 2.2 TI2V, where these frames start the video): latent
    frame 0 is held at the image's latents, in and out of the denoiser."""

    channels: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    first_frame: torch.Tensor | None = None

    def hold(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents with the first frame held at the image's (the pipelines' `(1 - mask) *
        condition + mask * latents`, exact for a 0/1 mask)."""
        if self.first_frame is None:
            return latents
        return torch.cat([self.first_frame.to(latents), latents[:, :, 1:]], dim=2)

    def denoiser_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the denoiser takes for these latents: held, with the image's channels beside them."""
        latents = self.hold(latents)
        return latents if self.channels is None else torch.cat([latents, self.channels], dim=1)


@dataclass(frozen=True)
class DeepPath:
    """Where step rehash (savers/step_cache.py) cuts the denoiser: the `skipped` modules run only
    at full steps; at a rehash step each returns a stand-in of its last output without running,
    and `reused` (one of them) its last full-step output: the deep feature the shallow path
    reads. The shallow path (everything else) runs at every step."""

    skipped: tuple[torch.nn.Module, ...]
    reused: torch.nn.Module


class ModelAdapter:
    family = ""
    pipeline_class = ""  # model_index.json `_class_name` this adapter loads
    temporal_stride = 1        # video frames per latent frame (after the first)
    takes_image = False        # an image-to-video model: every step needs image_condition's part
    # step cache taylorseer (savers/step_cache.py): the denoiser modules whose outputs are forecast
    # between full passes, as diffusers' TaylorSeerCacheConfig.cache_identifiers (re.fullmatch on names)
    taylorseer_modules: tuple[str, ...] = ()

    denoiser_attrs: tuple[str, ...] = ("unet",)  # the pipeline's attributes that hold its denoisers
    denoiser_on = "device"  # or "host": the denoisers stay in host memory, a job copies what it needs (weights.py)

    declared_limits: dict = {}  # what the folder's clipmesh.json says (load_adapter: presets.declared_limits)

    def __init__(self, pipe, device: torch.device | str):
        self.pipe, self.device = pipe, torch.device(device)
        self.loras = Loras(pipe)  # per-job LoRA adapters (none held until load_adapter gives a folder)

    def place(self, device: torch.device, keep: tuple[str, ...]) -> None:
        """Run on `device`: every pipeline component goes there but those named in `keep`, which
        stay where they are (a host-holding worker's denoisers and text encoder)."""
        self.device = device
        for name, component in self.pipe.components.items():
            if isinstance(component, torch.nn.Module) and name not in keep:
                component.to(device)

    # -- what a request must satisfy ---------------------------------------
    def model_info(self, name: str) -> pb.ModelInfo:
        """What this loaded model accepts, for Register: preset data, or derived from its configs."""
        if name in PRESETS:
            limits = PRESETS[name]["limits"]
        else:
            limits = {**limits_from_configs(dict(self.denoiser.config), dict(self.pipe.vae.config), name,
                                            {**self.pipe.config, "_class_name": type(self.pipe).__name__}),
                      **self.declared_limits}
        return pb.ModelInfo(name=name, **limits)

    @property
    def denoiser_bytes(self) -> int:
        """The weights of every expert, as loaded (Register.denoiser_bytes)."""
        return sum(local_parameter_bytes(d) for d in self.denoisers)

    # -- what mixes frames (for strategies) ------------------------------------
    def frame_mixers(self) -> list[FrameMixer]:
        """Every frame-mixing module of the denoiser, in model order; a strategy that cannot
        handle one of its kinds refuses the model. Raises NotImplementedError where the loaded
        model is a variant clipmesh cannot split."""
        raise NotImplementedError

    # -- what step rehash may skip (savers/step_cache.py) -----------------------
    def deep_path(self) -> DeepPath:
        """The denoiser's deep path for step rehash; NotImplementedError where the family has none."""
        raise NotImplementedError(f"{self.family} models have no deep path for step rehash")

    # -- what the feature slicer may chunk (savers/slicing.py) -------------------
    def slice_groups(self) -> list[SliceGroup]:
        """The denoiser's operator groups that may run in chunks, as data (none: slicing does
        nothing for this family). A PER_FRAME group holds no frame-mixing module; the others
        chunk along an axis every rank has the same size of, so collectives inside stay in step."""
        return []

    # -- the denoising loop's pieces ------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network run every step (transformer or UNet); of two experts, the first."""
        raise NotImplementedError

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        """Every expert, in the order of the schedule (one for most models)."""
        return [self.denoiser]

    def shard_units(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules of a denoiser whose weights shard_weights gathers one at a time (its blocks;
        worker/weights.py): a UNet's down, mid and up blocks."""
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]

    def expert(self, t) -> int:
        """The index in `denoisers` of the expert that denoises at timestep t."""
        return 0

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, latent height, latent width) of one latent frame."""
        raise NotImplementedError

    def encode_prompt(self, prompt: str, negative_prompt: str, guidance_scale: float):
        """(cond, uncond) text conditioning as the family's pipeline makes it; uncond None without CFG."""
        raise NotImplementedError

    def new_scheduler(self):
        """A fresh scheduler per job: multistep schedulers keep state."""
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, scheduler, cond, uncond,
                guidance_scale: float, image: ImagePart | None = None) -> torch.Tensor:
        """The guided model output for `latents` [1, C, F_local, h, w] at timestep t; `image`:
        the image-to-video conditioning of the same frames (image_condition(...).part)."""
        raise NotImplementedError

    def image_condition(self, image, height: int, width: int, latent_frames: int = 0):
        """A first-frame image (PIL) for a video of `latent_frames` (0: unbounded) -> an object
        whose `part(start, end)` is the ImagePart of latent frames [start, end) and `embeds` its
        ImagePart.embeds; ValueError for a model that takes no image."""
        raise ValueError(f"{self.family} models here take no image (text-to-video only)")

    @staticmethod
    def batched_cfg(unet, x, t, scheduler, text, uncond, guidance_scale: float) -> torch.Tensor:
        """The UNet pipelines' step body: one call on [uncond; cond] (`text` already so batched),
        the scheduler's input scaling first, then CFG."""
        x = scheduler.scale_model_input(torch.cat([x] * 2) if uncond is not None else x, t)
        pred = unet(x.to(unet.dtype), t, encoder_hidden_states=text, return_dict=False)[0]
        if uncond is not None:
            pred_u, pred_c = pred.chunk(2)
            pred = pred_u + guidance_scale * (pred_c - pred_u)
        return pred

    def step(self, scheduler, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One scheduler step on this rank's latents (elementwise schedulers: exact per clip)."""
        return scheduler.step(pred, t, latents, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [1, C, F, h, w] -> uint8 frames [N, H, W, 3]."""
        raise NotImplementedError

    def to_uint8(self, video: torch.Tensor) -> np.ndarray:
        """The VAE's video [1, 3, N, H, W] in [-1, 1] -> uint8 frames [N, H, W, 3], through the
        pipeline's own postprocess (what its output_type="np" gives, rounded)."""
        frames = self.pipe.video_processor.postprocess_video(video, output_type="np")[0]  # float in [0, 1]
        return (frames * 255.0).round().clip(0, 255).astype(np.uint8)

    # Latent frames before a clip that an exact decode of the clip needs (a causal VAE's warm-up);
    # 0: the VAE decodes frame by frame, so a clip decodes alone.
    decode_lookback = 0
    decode_chunk = 8  # latent frames per decoded piece: what decode memory holds at once

    @property
    def decodes_per_frame(self) -> bool:
        """The VAE decodes frame by frame, so a clip decodes alone."""
        return self.decode_lookback == 0

    def decode_stream(self, first: int, start: int, tiled: bool = False) -> "FrameStream":
        """A decode of latents fed in order from global latent frame `first` (>= start -
        decode_lookback): stream.feed(latents [1, C, n, h, w], on_frames(latent_start, uint8
        frames), chunk) hands on the frames of latent frames >= start, `chunk` latent frames at a
        time (memory: one chunk), exactly the frames a decode of the whole video gives them.
        `tiled`: in the VAE's blended spatial tiles (approximate; for frames too big to decode)."""
        return FrameStream(self, first, start, tiled)

    def decode_clip(self, latents: torch.Tensor, first: int, start: int, on_frames, chunk: int | None = None) -> None:
        """Latents of [first, first + n) -> the frames of [start, first + n): one stream, one feed."""
        self.decode_stream(first, start).feed(latents, on_frames, chunk)

    # -- registration -------------------------------------------------------
    def measure_speed(self, frames: int = 4, side: int = 32) -> float:
        """Latent pixels per second of one guided denoiser call on a small input (after one
        warm-up call): a relative speed the coordinator uses to size clips."""
        c, h, w = self.latent_shape(side, side)
        x = torch.randn(1, c, frames, h, w, device=self.device, dtype=self.denoiser.dtype)
        cond, uncond = self.encode_prompt("speed", "", 2.0)
        image = self.image_condition(PIL.Image.new("RGB", (side, side)), side, side, frames).part(0, frames) \
            if self.takes_image else None
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(2, device=self.device)
        t = scheduler.timesteps[0]
        seconds = 0.0
        for _ in range(2):
            self._sync()
            began = time.perf_counter()
            self.predict(x, t, scheduler, cond, uncond, 2.0, image)
            self._sync()
            seconds = time.perf_counter() - began
        return frames * h * w / max(seconds, 1e-9)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class FrameStream:
    """A frame-wise VAE's decode stream: every frame decodes alone."""

    def __init__(self, adapter: ModelAdapter, first: int, start: int, tiled: bool = False):
        self.adapter, self.start, self.next, self.tiled = adapter, start, first, tiled

    @torch.no_grad()
    def feed(self, latents: torch.Tensor, on_frames, chunk: int | None = None) -> None:
        first, self.next, chunk = self.next, self.next + latents.shape[2], chunk or self.adapter.decode_chunk
        with tiling(self.adapter.pipe.vae, self.tiled):
            for a in range(max(0, self.start - first), latents.shape[2], chunk):
                on_frames(first + a, self.adapter.decode(latents[:, :, a:a + chunk]))


@contextlib.contextmanager
def tiling(vae, on: bool):
    """The VAE's spatial tiling on for a decode (if `on`), as it was afterwards."""
    was = getattr(vae, "use_tiling", False)
    if on and not was:
        vae.enable_tiling()
    try:
        yield
    finally:
        if on and not was:
            vae.disable_tiling()
