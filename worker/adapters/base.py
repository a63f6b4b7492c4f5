"""The model-family interface the render loop and the strategies use.

An adapter wraps one loaded diffusers pipeline and says *where* things are (which modules
mix frames, how a denoiser call is made, how latents become pixels) so the denoising loop
(render.py) and the strategies (strategies/) stay family-agnostic. Patching happens only
through diffusers' extension points (attention processors, hooks), never by editing models.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from clipmesh.presets import PRESETS, limits_from_configs
from clipmesh.v1 import clipmesh_pb2 as pb


class ModelAdapter:
    family = ""
    pipeline_class = ""  # model_index.json `_class_name` this adapter loads
    decodes_per_frame = False  # True: the VAE decodes frame by frame, so each rank decodes its own clip

    def __init__(self, pipe, device: torch.device | str):
        self.pipe, self.device = pipe, torch.device(device)

    # -- what a request must satisfy ---------------------------------------
    def model_info(self, name: str) -> pb.ModelInfo:
        """What this loaded model accepts, for Register: preset data, or derived from its configs."""
        if name in PRESETS:
            limits = PRESETS[name]["limits"]
        else:
            limits = limits_from_configs(dict(self.denoiser.config), dict(self.pipe.vae.config), name)
        return pb.ModelInfo(name=name, **limits)

    # -- the denoising loop's pieces ------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network run every step (transformer or UNet)."""
        raise NotImplementedError

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
                guidance_scale: float) -> torch.Tensor:
        """The guided model output for `latents` [1, C, F_local, h, w] at timestep t."""
        raise NotImplementedError

    def step(self, scheduler, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One scheduler step on this rank's latents (elementwise schedulers: exact per clip)."""
        return scheduler.step(pred, t, latents, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [1, C, F, h, w] -> uint8 frames [N, H, W, 3]."""
        raise NotImplementedError

    # -- registration -------------------------------------------------------
    def measure_speed(self, frames: int = 4, side: int = 32) -> float:
        """Latent pixels per second of one guided denoiser call on a small input (after one
        warm-up call): a relative speed the coordinator uses to size clips."""
        c, h, w = self.latent_shape(side, side)
        x = torch.randn(1, c, frames, h, w, device=self.device, dtype=self.denoiser.dtype)
        cond, uncond = self.encode_prompt("speed", "", 2.0)
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(2, device=self.device)
        t = scheduler.timesteps[0]
        seconds = 0.0
        for _ in range(2):
            self._sync()
            began = time.perf_counter()
            self.predict(x, t, scheduler, cond, uncond, 2.0)
            self._sync()
            seconds = time.perf_counter() - began
        return frames * h * w / max(seconds, 1e-9)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
