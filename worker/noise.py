"""Initial latent noise that does not depend on how the video is split across workers.

Why per-frame generators: one generator over the whole tensor would make frame k's noise
depend on every frame before it, so a worker owning [a, b) could not draw its part alone,
and changing the worker count would change the video. Seeding each latent frame from
(job seed, global frame index) makes the noise of frame k the same everywhere.
block_pipeline draws each block's noise from a pool of such frames (DualParal's coordinated
noise), permuted per block by a generator that is also a function of the seed alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from clipmesh.plan import frame_seed

PERMUTATION_STREAM = -1          # frame_seed index of the permutation generator: no frame has it
RESCHEDULE_STREAM = -2           # rescheduled_noise's window k permutes by frame_seed index -2 - k


def initial_noise(seed: int, frame_start: int, frame_end: int, channels: int, h: int, w: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise [1, C, frame_end - frame_start, h, w] for global latent frames [frame_start, frame_end)."""
    frames = []
    for index in range(frame_start, frame_end):
        # CPU generator: bit-identical on every host and device; drawn in fp32, then cast.
        gen = torch.Generator("cpu").manual_seed(frame_seed(seed, index))
        frames.append(torch.randn((1, channels, 1, h, w), generator=gen, dtype=torch.float32))
    return torch.cat(frames, dim=2).to(device=device, dtype=dtype)


def rescheduled_noise(seed: int, frame_start: int, frame_end: int, window: int, channels: int, h: int, w: int,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """FreeNoise's noise rescheduling, [1, C, frame_end - frame_start, h, w]: the first `window`
    latent frames draw their own noise; every later window of `window` frames is a shuffle of
    those, permuted by a generator of (seed, window index): the windows of a long video start
    from correlated noise, meant to keep them one video's. Split-independent, as initial_noise.
    Off by default: on toy-wan at 8x it kept no more colour and the object repeated in place
    (docs/quality.md)."""
    base = initial_noise(seed, 0, window, channels, h, w, dtype, device)
    picks = []
    for index in range(frame_start // window, (frame_end - 1) // window + 1 if frame_end > frame_start else 0):
        gen = torch.Generator("cpu").manual_seed(frame_seed(seed, RESCHEDULE_STREAM - index))
        order = list(range(window)) if index == 0 else torch.randperm(window, generator=gen).tolist()
        picks += [order[f - index * window] for f in range(max(frame_start, index * window),
                                                            min(frame_end, (index + 1) * window))]
    return base[:, :, picks]


def coordinated_noise(seed: int, block_frames: int, context_frames: int, channels: int, h: int, w: int,
                      dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """Initial noise of block 0, 1, 2, ... [1, C, block_frames, h, w] (a shorter last block takes
    the first frames of its draw). The pool is the job's per-frame noise of frames
    [0, block_frames + c); a block never reuses the frames its predecessor ended with."""
    pool = initial_noise(seed, 0, block_frames + context_frames, channels, h, w, dtype)
    gen = torch.Generator("cpu").manual_seed(frame_seed(seed, PERMUTATION_STREAM))
    tail: list[int] = []
    while True:
        allowed = [i for i in range(block_frames + context_frames) if i not in tail]
        picks = [allowed[i] for i in torch.randperm(len(allowed), generator=gen)[:block_frames].tolist()]
        yield pool[:, :, picks]
        tail = picks[len(picks) - context_frames:] if context_frames else []
