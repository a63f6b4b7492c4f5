"""Initial latent noise that does not depend on how the video is split across workers.

Why per-frame generators: one generator over the whole tensor would make frame k's noise
depend on every frame before it, so a worker owning [a, b) could not draw its part alone,
and changing the worker count would change the video. Seeding each latent frame from
(job seed, global frame index) makes the noise of frame k the same everywhere.
"""

from __future__ import annotations

import torch

from clipmesh.plan import frame_seed


def initial_noise(seed: int, frame_start: int, frame_end: int, channels: int, h: int, w: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise [1, C, frame_end - frame_start, h, w] for global latent frames [frame_start, frame_end)."""
    frames = []
    for index in range(frame_start, frame_end):
        # CPU generator: bit-identical on every host and device; drawn in fp32, then cast.
        gen = torch.Generator("cpu").manual_seed(frame_seed(seed, index))
        frames.append(torch.randn((1, channels, 1, h, w), generator=gen, dtype=torch.float32))
    return torch.cat(frames, dim=2).to(device=device, dtype=dtype)
