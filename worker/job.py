"""What one rank knows of a job, and what it hands back: the types the runner, the strategies
and the daemon share. Imports nothing of the worker but noise.py, so it can form no cycle."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from clipmesh.specs import clip_lengths
from clipmesh.worker.noise import initial_noise, rescheduled_noise


class Cancelled(Exception):
    """The job was cancelled; every rank raises it at the same step boundary."""


@dataclass(frozen=True)
class StepReport:
    """What one rank reports after each unit of work (becomes a StepProgress event)."""

    step: int                 # 1-based steps finished
    total: int
    seconds: float            # wall time of the step
    bytes_sent: int = 0       # data-plane traffic of the step
    bytes_received: int = 0
    comm_seconds: float = 0.0
    latent_start: int = 0     # the latent frames the step was on
    latent_end: int = 0
    block: int | None = None  # block_pipeline: the block this step advanced
    peak_memory_bytes: int = 0  # the worker's peak memory during the step (memory.PeakMemory)
    full_pass: bool = True      # False: a step cache reused features instead of the full denoiser


@dataclass(frozen=True)
class RenderedFrames:
    """Decoded frames of the video starting at global frame `first_frame`."""

    first_frame: int
    frames: np.ndarray        # uint8 [N, H, W, 3]


@dataclass(frozen=True)
class FinishedLatents:
    """Final latents of global latent frames [start, end) of the video: [1, C, end - start, h, w];
    `before`: those of the frames just before `start`, where the schedule has them (a causal
    VAE's warm-up; None: the runner fetches them from the ranks before)."""

    start: int
    end: int
    latents: torch.Tensor
    before: torch.Tensor | None = None


@dataclass(frozen=True)
class Work:
    """One unit a schedule hands the runner: a denoising step of some latent frames."""

    step: int                  # 0-based step
    t: torch.Tensor            # its timestep
    latent_start: int          # the latent frames it advances
    latent_end: int
    fresh: bool = True         # per-iteration state (feature caches) starts empty here
    block: int | None = None   # block_pipeline: the block it advances


@dataclass
class Job:
    """One rank's part of a job: the loaded model, the plan, this rank's place in the work split
    and the process group of that split; under cfg_parallel, its guidance branch and the group
    of this split rank across the branches (specs.branches)."""

    model: object              # a ModelAdapter
    plan: object               # pb.RenderPlan (checked against its strategy's spec)
    rank: int                  # among the ranks that split the work (plan.clips / plan.layers index)
    mesh: object               # a Mesh over those ranks
    branch: int = 0            # 0: the conditional branch (or both, without cfg_parallel); 1: unconditional
    cfg: object = None         # cfg_parallel: a Mesh of 2, this rank and its peer in the other branch

    @property
    def request(self):
        return self.plan.request

    @property
    def clip_lengths(self) -> list[int]:
        return clip_lengths(self.plan)

    @property
    def clip(self) -> tuple[int, int]:
        """This rank's latent frames [start, end) (frames partitions)."""
        c = self.plan.clips[self.rank]
        return c.start, c.end

    @property
    def layers(self) -> tuple[int, int]:
        """This rank's transformer blocks [start, end) (layers partitions)."""
        r = self.plan.layers[self.rank]
        return r.start, r.end


@dataclass
class Denoising:
    """What the runner prepares once per job for every schedule: text conditioning, timesteps,
    fresh schedulers and initial noise."""

    job: Job
    cond: torch.Tensor
    uncond: torch.Tensor | None    # None without CFG
    image: object = None           # image-to-video: the adapter's image_condition (None: text only)

    def image_part(self, start: int, end: int):
        """The image conditioning of latent frames [start, end) (adapters/base.ImagePart), or None."""
        return self.image.part(start, end) if self.image is not None else None

    @functools.cached_property
    def timesteps(self) -> torch.Tensor:
        """The job's timesteps, as every scheduler of the job has them."""
        return self.new_scheduler().timesteps

    @property
    def guidance_scale(self) -> float:
        return self.job.request.guidance_scale

    def guidance_at(self, t) -> float:
        """The guidance of the expert denoising at timestep t: a two-expert model's low-noise
        expert takes guidance_scale_2 where the request sets it (WanPipeline's rule)."""
        req = self.job.request
        if self.job.model.expert(t) == 1 and req.HasField("guidance_scale_2"):
            return req.guidance_scale_2
        return req.guidance_scale

    def predict(self, latents: torch.Tensor, t: torch.Tensor, scheduler, image=None) -> torch.Tensor:
        """The guided prediction for `latents` at t: both branches here (the adapter's predict), or
        under cfg_parallel this rank's branch, the other from its peer (one all-gather of the
        prediction), combined as the pipelines do: uncond + g * (cond - uncond)."""
        model, guidance, cfg = self.job.model, self.guidance_at(t), self.job.cfg
        if cfg is None:
            return model.predict(latents, t, scheduler, self.cond, self.uncond, guidance, image)
        text = self.cond if self.job.branch == 0 else self.uncond
        return self.combine_branches(model.predict(latents, t, scheduler, text, None, guidance, image), guidance)

    def combine_branches(self, mine: torch.Tensor, guidance: float) -> torch.Tensor:
        """cfg_parallel: this branch's prediction and its peer's (one all-gather over the pair),
        combined as the pipelines do: uncond + g * (cond - uncond)."""
        pred_c, pred_u = self.job.cfg.all_gather_uneven(mine, [mine.shape[0]] * 2, dim=0).chunk(2)
        return pred_u + guidance * (pred_c - pred_u)

    def new_scheduler(self):
        """A fresh scheduler (multistep schedulers keep state), its timesteps set, at plan.start_step."""
        model, req = self.job.model, self.job.request
        scheduler = model.new_scheduler()
        scheduler.set_timesteps(req.num_inference_steps, device=model.device)
        if hasattr(scheduler, "set_begin_index"):  # multistep schedulers; DDIM's step needs only t
            scheduler.set_begin_index(self.job.plan.start_step)
        return scheduler

    def noise(self, start: int, end: int, scheduler) -> torch.Tensor:
        """The initial latents of global latent frames [start, end): split-independent noise
        (FreeNoise's rescheduling under clip_parallel.noise_reschedule)."""
        model, req = self.job.model, self.job.request
        channels, h, w = model.latent_shape(req.height, req.width)
        opts = self.job.plan.clip_parallel
        if self.job.plan.HasField("clip_parallel") and opts.noise_reschedule:
            noise = rescheduled_noise(req.seed, start, end, 2 * opts.local_halo + 1, channels, h, w, torch.float32,
                                      model.device)
        else:
            noise = initial_noise(req.seed, start, end, channels, h, w, torch.float32, model.device)
        return noise * scheduler.init_noise_sigma
