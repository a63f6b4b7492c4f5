"""The strategy interface: how the work of a job is split over the ranks.

A strategy supplies three things and no loop (the runner, render.py, owns the loop):
- patches: one handler per kind of frame-mixing module (`patch_<kind>`, the kinds of
  adapters/base.py); `install` is the generic applier that walks the adapter's frame_mixers()
  and records everything in the job's Patches. A kind without a handler refuses the model.
- its partition of the work: the plan's clips (frames) or layers, as its spec says (clipmesh.specs).
- a schedule: which denoising step of which latent frames comes next. The default, StepSchedule,
  steps this rank's clip through every timestep; block_pipeline brings its block queue.
"""

from __future__ import annotations

from clipmesh.worker import checkpoint
from clipmesh.worker.strategies.frame_ops import TemporalOps
from clipmesh.worker.job import FinishedLatents, Job, Work


class Schedule:
    """What comes next, for the runner: `next()` a Work (None when done), `run(work)` computes it;
    `agree_stop` is the cancel decision, the same on every rank; `take_finished()` the final
    latents this rank is to decode, as they become final (the runner asks after every unit and
    once the schedule is done); `checkpoint(every)` after each unit: this rank's part of a
    checkpoint when one is due every `every` steps (None: none due, or nothing to give)."""

    total = 0  # steps per latent frame

    def agree_stop(self, asked: bool) -> bool:
        raise NotImplementedError

    def next(self) -> Work | None:
        raise NotImplementedError

    def run(self, work: Work) -> None:
        raise NotImplementedError

    def take_finished(self) -> list[FinishedLatents]:
        return []

    def checkpoint(self, every: int) -> checkpoint.Part | None:
        return None


class StepSchedule(Schedule):
    """Every rank steps its own clip through the timesteps [plan.start_step, T), all in lockstep;
    the schedulers we use are elementwise over the latents, so stepping each clip alone is exact."""

    def __init__(self, job: Job, denoising, resume: list[bytes] | None = None):
        self.job, self.d = job, denoising
        self.scheduler = denoising.new_scheduler()
        self.start, self.end = job.clip
        if resume:  # the checkpoint's latents and scheduler state of this clip, at plan.start_step
            self.latents = checkpoint.restore(resume, self.start, self.end, self.scheduler, job.model.device)
        else:
            self.latents = denoising.noise(self.start, self.end, self.scheduler)
        self.image = denoising.image_part(self.start, self.end)  # the same at every step
        self.i, self.total = job.plan.start_step, len(denoising.timesteps)

    def agree_stop(self, asked: bool) -> bool:
        # a collective at every boundary: one rank's cancel stops all ranks here, none hangs
        return self.i < self.total and self.job.mesh.any(asked)

    def next(self) -> Work | None:
        if self.i >= self.total:
            return None
        return Work(self.i, self.d.timesteps[self.i], self.start, self.end)

    def run(self, work: Work) -> None:
        pred = self.d.predict(self.latents, work.t, self.scheduler, self.image)
        self.latents = self.job.model.step(self.scheduler, pred, work.t, self.latents)
        self.i += 1

    def take_finished(self) -> list[FinishedLatents]:
        """The clip, once every step is done (its decode warm-up comes from the other ranks)."""
        if self.i < self.total or self.latents is None:
            return []
        latents = self.image.hold(self.latents) if self.image is not None else self.latents  # TI2V: the image's frame
        clip, self.latents = FinishedLatents(self.start, self.end, latents), None
        return [clip]

    def checkpoint(self, every: int) -> checkpoint.Part | None:
        """After every `every` steps, not after the last (the clip is final then)."""
        if self.latents is None or self.i % every or self.i >= self.total:
            return None
        return checkpoint.save(self.i, self.start, self.end, self.latents, self.scheduler)


class Strategy:
    name = ""

    def install(self, job: Job, patches) -> None:
        """Patch the job's model through `patches`: one handler call per frame-mixing module."""
        for mixer in job.model.frame_mixers():
            handler = getattr(self, f"patch_{mixer.kind}", None)
            if handler is None:
                raise NotImplementedError(f"{self.name} cannot split {job.model.family} models: it has no handler "
                                          f"for {mixer.kind} ({type(mixer.module).__name__})")
            handler(job, mixer, patches)

    def schedule(self, job: Job, denoising, resume: list[bytes] | None = None) -> Schedule:
        """`resume`: the checkpoint parts to start from at plan.start_step (None: from noise)."""
        return StepSchedule(job, denoising, resume)


class FrameStrategy(Strategy):
    """Ranks split the latent frames: each runs the whole model on its clip. Positions are made
    global, temporal convs get input halos and frame norms synchronised statistics (exact for
    every such strategy); the subclass says what its attention does (`attention`)."""

    def install(self, job: Job, patches) -> None:
        self._temporal = TemporalOps(job.mesh, job.clip_lengths, patches)
        super().install(job, patches)

    def attention(self, job: Job, ops, backend):
        """The attention processor for one frame-mixing self-attention of this job."""
        raise NotImplementedError

    def patch_attention(self, job, mixer, patches) -> None:
        backend = getattr(mixer.module.processor, "_attention_backend", None)  # keep the stock backend
        patches.set_processor(mixer.module, self.attention(job, mixer.ops, backend))

    def patch_positions(self, job, mixer, patches) -> None:
        patches.forward_hook(mixer.module, mixer.ops(job.clip[0]))

    def patch_temporal_conv(self, job, mixer, patches) -> None:
        self._temporal.halo_conv(mixer.module)

    def patch_frame_norm(self, job, mixer, patches) -> None:
        self._temporal.sync_norm(mixer.module)


class FrameAttention:
    """Base of a frames strategy's attention processor: the family's ops make q, k, v
    [B, F, S, H, D] of this rank's frames and the module's output; `attend` is the strategy."""

    def __init__(self, ops, frames: int, backend=None):
        self.ops, self.frames = ops, frames
        self._attention_backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{type(self).__name__} is for self-attention without a mask")
        q, k, v = self.ops.qkv(attn, hidden_states, self.frames, rotary_emb)  # per token: local is exact
        return self.ops.out(attn, self.attend(attn, q, k, v), hidden_states)

    def attend(self, attn, q, k, v):
        """q, k, v [B, F, S, H, D] of this rank's frames -> the attention output [B, F, S, H, Dv]."""
        raise NotImplementedError


class MeshAttention(FrameAttention):
    """A processor over the whole video's frames: this rank's clip, the mesh, every rank's clip length."""

    def __init__(self, ops, mesh, clip_lengths: list[int], backend=None):
        super().__init__(ops, clip_lengths[mesh.rank], backend)
        self.mesh, self.lengths = mesh, clip_lengths
