"""The runner: one rank's part of a job, for every strategy and every model family.

It owns what every job has: prompt encoding, the timesteps and schedulers, the cancel vote,
per-step reports, and the decode of final latents into frames. The strategy (strategies/) only
patches the model, names its partition of the work, and brings a schedule (which step of which
latent frames runs next). The loop is otherwise step for step WanPipeline's /
TextToVideoSDPipeline's (text encoding, CFG, scheduler step), which the equivalence tests check.

Why our own loop instead of the pipelines' __call__: each rank holds only its clip (or its
layers), must start from split-independent noise, must stop at the same step as every other
rank, and reports every step.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from clipmesh.images import decode_image
from clipmesh.plan import num_output_frames
from clipmesh.specs import check_plan as check_against_spec
from clipmesh.specs import QUEUE, branch_of, branches, clip_lengths, split_rank, split_ranks, work_of
from clipmesh.worker import checkpoint
from clipmesh.worker.job import Cancelled, Denoising, FinishedLatents, Job, RenderedFrames, StepReport  # noqa: F401
from clipmesh.worker.peak_memory import PeakMemory
from clipmesh.worker.patches import Patches
from clipmesh.worker.savers import install_savers
from clipmesh.worker.strategies import get_strategy
from clipmesh.worker.weights import borrowed, job_weights


def check_plan(model, plan, rank: int, mesh) -> None:
    """Once, before any collective: the plan fits this mesh and this model (clipmesh.specs)."""
    if mesh.world_size != plan.world_size or mesh.rank != rank:
        raise ValueError(f"mesh is rank {mesh.rank}/{mesh.world_size}, plan says {rank}/{plan.world_size}")
    check_against_spec(plan, model.model_info(plan.request.model))


def job_for(model, plan, rank: int, mesh) -> Job:
    """Rank `rank` of the job's mesh as a Job, once the plan is checked: the ranks of its
    guidance branch split the work over one sub-mesh; under cfg_parallel a second sub-mesh pairs
    each split rank with its peer of the other branch (specs.branches; every rank makes both,
    in the same order)."""
    check_plan(model, plan, rank, mesh)
    if branches(plan) == 1:
        return Job(model, plan, rank, mesh)
    f = split_ranks(plan)
    split = mesh.split([list(range(b * f, (b + 1) * f)) for b in range(branches(plan))])
    pair = mesh.split([list(range(r, plan.world_size, f)) for r in range(f)])
    return Job(model, plan, split_rank(plan, rank), split, branch=branch_of(plan, rank), cfg=pair)


@torch.no_grad()
def run(job: Job, on_step: Callable[[StepReport], None] | None = None, should_stop: Callable[[], bool] | None = None,
        on_finished: Callable[[FinishedLatents], None] | None = None, resume: list[bytes] | None = None,
        on_checkpoint: Callable[[checkpoint.Part], None] | None = None) -> None:
    """Denoise this rank's part of the job; hand every piece of final latents to `on_finished`.

    `resume`: the checkpoint parts (worker/checkpoint.py) to go on from at plan.start_step
    (default: from the initial noise). Every plan.checkpoint_every steps (the schedule says
    when: block_pipeline counts iterations of its queue) this rank's part of a checkpoint goes
    to `on_checkpoint`."""
    model, req, mesh = job.model, job.request, job.mesh
    with borrowed(model, "text_encoder"):
        cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    image = model.image_condition(decode_image(req.image), req.height, req.width,
                                  job.plan.num_latent_frames) if req.image else None
    denoising = Denoising(job, cond, uncond, image)
    strategy, memory = get_strategy(job.plan.strategy), PeakMemory(model.device)
    # the job's LoRA adapters first: a per-job copy of the denoiser (weights.py) carries them
    with model.loras.active(req.loras), job_weights(job), Patches() as patches:
        strategy.install(job, patches)
        install_savers(job, patches)  # after the strategy: savers wrap whatever it installed
        schedule = strategy.schedule(job, denoising, resume)
        # both guidance branches hold the same latents: the conditional one writes the checkpoints
        every = job.plan.checkpoint_every if on_checkpoint and job.branch == 0 else 0
        done = 0
        while True:
            if schedule.agree_stop(bool(should_stop and should_stop())):
                raise Cancelled(f"cancelled after {done} steps")
            mesh.take_stats()  # the unit's traffic starts here (the cancel vote is not the unit's)
            memory.reset()
            began = time.perf_counter()
            work = schedule.next()
            if work is None:
                break
            if work.fresh:
                patches.reset_state()
            patches.begin_step(float(work.t))
            schedule.run(work)
            done += 1
            if on_step:
                sent, received, comm_seconds = mesh.take_stats()
                on_step(StepReport(work.step + 1, schedule.total, time.perf_counter() - began, sent, received,
                                   comm_seconds, work.latent_start, work.latent_end, work.block,
                                   peak_memory_bytes=memory.peak(), full_pass=patches.full_pass))
            if every and (part := schedule.checkpoint(every)) is not None:
                on_checkpoint(part)
            _deliver(schedule, on_finished)
        _deliver(schedule, on_finished)


def _deliver(schedule, on_finished) -> None:
    for piece in schedule.take_finished():
        if on_finished:
            on_finished(piece)


def denoise(model, plan, rank: int, mesh, on_step=None, should_stop=None, resume=None,
            on_checkpoint=None) -> torch.Tensor:
    """What `render` denoises, not decoded: the whole video's final latents [1, C, latent frames,
    h, w] on every rank (a frames partition), as diffusers' output_type="latent" gives them. The
    equivalence tests and the benches compare these; a worker's job renders."""
    job = job_for(model, plan, rank, mesh)
    pieces: list[FinishedLatents] = []
    run(job, on_step, should_stop, pieces.append, resume, on_checkpoint)
    local = torch.cat([p.latents for p in pieces], dim=2)
    return job.mesh.all_gather_uneven(local, clip_lengths(plan), dim=2)


class Decoder:
    """Final latents -> frames, on the rank that holds them: no rank decodes the whole video.
    A frame-wise VAE (UNet3D) decodes a piece alone; Wan's causal VAE decodes a piece exactly
    from a warm-up of the latent frames before it (adapters/wan_decode.py): a schedule may hand
    them over with the piece (block_pipeline), else they come from the ranks before (a clip of a
    frames partition: one halo exchange, which every rank makes at the same point). A piece that
    continues the last one (no `before`) continues its decode stream, so the warm-up is paid once
    per run of pieces. Frames are handed on in chunks (decode memory: a chunk, not the video).

    `background`: decode in a thread of its own (pieces that need no collective: block_pipeline's
    blocks), so the decode overlaps the stages instead of stalling the whole pipeline (measured
    on 2 CPU cores, 513 frames, 2 stages: 202 s with the thread, 288 s inline); at most BACKLOG
    pieces wait, so a slow decode slows the schedule rather than piling up latents."""

    BACKLOG = 2

    def __init__(self, job: Job, on_frames: Callable[[RenderedFrames], None], background: bool = False):
        self.job, self.on_frames = job, on_frames
        self.stream, self.stream_end = None, None
        self.queue: queue.Queue | None = queue.Queue(self.BACKLOG) if background else None
        self.error: BaseException | None = None
        self.abandoned = False
        if background:
            self.thread = threading.Thread(target=self._drain, name="clipmesh-decode", daemon=True)
            self.thread.start()

    def add(self, piece: FinishedLatents) -> None:
        if self.queue is None:
            return self._decode(piece)
        if self.error is not None:
            raise self.error
        self.queue.put(piece)

    def finish(self, abandon: bool = False) -> None:
        """Every piece added is decoded and handed on (background: wait for the thread).
        `abandon` (the job stopped: the attempt is over, so the coordinator would refuse their
        frames): the pieces still waiting are dropped, the thread ends after the one in hand, and
        its error is not raised; a cancelled endless job frees its workers at once."""
        self.abandoned = abandon  # before the thread is woken: it skips what it takes from now on
        if self.queue is not None:
            self.queue.put(None)
            self.thread.join()
            self.queue = None
            if self.error is not None and not abandon:
                raise self.error

    def _drain(self) -> None:
        while (piece := self.queue.get()) is not None:
            try:
                if self.error is None and not self.abandoned:
                    self._decode(piece)
            except BaseException as exc:  # handed to the render thread at its next add/finish
                self.error = exc

    @torch.no_grad()
    def _decode(self, piece: FinishedLatents) -> None:
        job, lookback = self.job, self.job.model.decode_lookback
        before, latents = piece.before, piece.latents
        if before is None and self.stream is not None and piece.start == self.stream_end:
            self.stream.feed(latents, self._emit)  # the same run of pieces: the stream goes on
        else:
            if before is None and lookback and job.plan.clips:
                before, _ = job.mesh.exchange_halos(latents, 2, lookback, 0, sizes=job.clip_lengths)
            first = piece.start - (0 if before is None else before.shape[2])
            self.stream = job.model.decode_stream(first, piece.start, tiled=job.plan.savers.tiled_decode)
            self.stream.feed(latents if before is None else torch.cat([before, latents], dim=2), self._emit)
        self.stream_end = piece.end

    def _emit(self, latent_start: int, frames) -> None:
        first = num_output_frames(latent_start, self.job.model.temporal_stride) if latent_start else 0
        self.on_frames(RenderedFrames(first_frame=first, frames=frames))


def render(model, plan, rank: int, mesh, on_step: Callable[[StepReport], None] | None = None,
           should_stop: Callable[[], bool] | None = None, on_frames: Callable[[RenderedFrames], None] | None = None,
           on_latents: Callable[[FinishedLatents], None] | None = None, decode: bool = True,
           resume: list[bytes] | None = None, on_checkpoint: Callable[[checkpoint.Part], None] | None = None) -> None:
    """Run this rank's part of the plan; hand every decoded piece of the video to `on_frames` as
    soon as it is decoded (and, first, its final latents to `on_latents`). `decode=False`
    denoises only. `resume`, `on_checkpoint`: as for run(). Under cfg_parallel the unconditional
    branch's ranks hold the same latents as their peers: only the conditional branch decodes."""
    job = job_for(model, plan, rank, mesh)
    decode = decode and job.branch == 0
    # block_pipeline's blocks decode beside the pipeline: inline, a rank's decode stalls every stage
    decoder = Decoder(job, on_frames or (lambda rendered: None), background=work_of(plan) == QUEUE) if decode else None

    def finished(piece: FinishedLatents) -> None:
        if on_latents:
            on_latents(piece)
        if decoder:
            decoder.add(piece)

    try:
        run(job, on_step, should_stop, finished, resume, on_checkpoint)
    except BaseException:  # stopped, failed or aborted: this attempt's later frames are refused
        if decoder:
            decoder.finish(abandon=True)
        raise
    if decoder:
        decoder.finish()
