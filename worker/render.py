"""The denoising loop, driven by a RenderPlan: one rank's share of a job.

Why our own loop instead of WanPipeline.__call__: each rank holds only its clip of latent
frames, must start from split-independent noise, must check for cancellation at the same
step on every rank, and reports per-step progress. The loop is otherwise step for step
WanPipeline's (two transformer calls for CFG, UniPC step), which the equivalence test checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from clipmesh.worker.noise import initial_noise
from clipmesh.worker.strategies import get_strategy


class Cancelled(Exception):
    """The job was cancelled; every rank raises it at the same step boundary."""


@dataclass(frozen=True)
class StepReport:
    """What one rank reports after each step (becomes a StepProgress event)."""

    step: int                 # 1-based steps finished
    total: int
    seconds: float            # wall time of the step
    bytes_sent: int = 0       # data-plane traffic of the step
    bytes_received: int = 0
    comm_seconds: float = 0.0
    latent_start: int = 0     # the latent frames the step was on
    latent_end: int = 0
    block: int | None = None  # block_pipeline: the block this step advanced


@dataclass(frozen=True)
class RenderedFrames:
    """Decoded frames of the video starting at global frame `first_frame`."""

    first_frame: int
    frames: np.ndarray        # uint8 [N, H, W, 3]


def plan_clips(plan) -> list[tuple[int, int]]:
    """clips[rank] = (start, end); checked to tile [0, num_latent_frames) in rank order."""
    clips, edge = [(c.start, c.end) for c in plan.clips], 0
    for start, end in clips:
        if start != edge or end <= start:
            break
        edge = end
    else:
        if len(clips) == plan.world_size and edge == plan.num_latent_frames:
            return clips
    raise ValueError(f"plan clips {clips} do not tile [0, {plan.num_latent_frames}) over {plan.world_size} ranks")


@torch.no_grad()
def denoise_clip(model, plan, rank: int, mesh, on_step: Callable[[StepReport], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Run this rank's clip through steps [plan.start_step, steps); return its latents
    [1, C, clip frames, h, w].

    `latents`: this rank's clip to resume from at start_step (default: the initial noise).
    """
    req, clips = plan.request, plan_clips(plan)
    if mesh.world_size != plan.world_size or mesh.rank != rank:
        raise ValueError(f"mesh is rank {mesh.rank}/{mesh.world_size}, plan says {rank}/{plan.world_size}")
    start, end = clips[rank]

    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(req.num_inference_steps, device=model.device)
    if hasattr(scheduler, "set_begin_index"):  # multistep schedulers; DDIM's step needs only t
        scheduler.set_begin_index(plan.start_step)
    timesteps = scheduler.timesteps
    if latents is None:
        channels, h, w = model.latent_shape(req.height, req.width)
        latents = initial_noise(req.seed, start, end, channels, h, w, torch.float32, model.device)
        latents = latents * scheduler.init_noise_sigma

    with get_strategy(plan.strategy).install(model, mesh, plan, rank) as strategy:
        for i in range(plan.start_step, len(timesteps)):
            # collective at every boundary: one rank's cancel stops all ranks here, none hangs
            if mesh.any(bool(should_stop and should_stop())):
                raise Cancelled(f"cancelled before step {i + 1}")
            mesh.take_stats()  # the step's traffic starts here (the cancel vote is not the step's)
            began = time.perf_counter()
            t = timesteps[i]
            strategy.begin_step(float(t))
            pred = model.predict(latents, t, scheduler, cond, uncond, req.guidance_scale)
            # the schedulers we use are elementwise over the latents, so stepping each clip alone is exact
            latents = model.step(scheduler, pred, t, latents)
            if on_step:
                sent, received, comm_seconds = mesh.take_stats()
                on_step(StepReport(i + 1, len(timesteps), time.perf_counter() - began, sent, received, comm_seconds,
                                   start, end))

    return latents


def denoise(model, plan, rank: int, mesh, on_step: Callable[[StepReport], None] | None = None,
            should_stop: Callable[[], bool] | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
    """denoise_clip, then the whole video's latents [1, C, num_latent_frames, h, w] on every rank."""
    local = denoise_clip(model, plan, rank, mesh, on_step, should_stop, latents)
    return mesh.all_gather_uneven(local, [c.end - c.start for c in plan.clips], dim=2)


def render(model, plan, rank: int, mesh, on_step: Callable[[StepReport], None],
           should_stop: Callable[[], bool], on_frames: Callable[[RenderedFrames], None]) -> None:
    """Run this rank's part of the plan; hand every decoded piece of the video to `on_frames`.

    A strategy with a loop of its own (block_pipeline) streams blocks as they finish. Otherwise:
    a frame-wise VAE (UNet3D family) decodes each clip exactly on its own rank, in parallel;
    a causal video VAE (Wan) needs the whole video, so the decode rank decodes it all."""
    strategy = get_strategy(plan.strategy)
    if hasattr(strategy, "render"):
        return strategy.render(model, plan, rank, mesh, on_step, should_stop, on_frames)
    local = denoise_clip(model, plan, rank, mesh, on_step, should_stop)
    with torch.no_grad():
        if model.decodes_per_frame:
            on_frames(RenderedFrames(first_frame=plan.clips[rank].start, frames=model.decode(local)))
            return
        full = mesh.all_gather_uneven(local, [c.end - c.start for c in plan.clips], dim=2)
        if rank == plan.decode_rank:
            on_frames(RenderedFrames(first_frame=0, frames=model.decode(full)))
