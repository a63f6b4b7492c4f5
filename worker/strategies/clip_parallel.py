"""`clip_parallel`: Video-Infinity. Each rank denoises its clip; every frame-mixing attention
becomes dual-scope attention (strategies/dual_scope.py): a +-P frame window that crosses worker
boundaries plus G global frames of the whole video, with a timestep-dependent phase bias.
Unlike `exact` it is not the single-device model: it is how videos longer than the model's
native length are made, at a cost per frame that does not grow with the video.

The family says how its tokens map to [B, F_local, S, H, D] (adapters' AttentionOps) and how
global frames are presented to a query frame (Wan re-rotates their temporal RoPE: the option
clip_parallel.global_rope, measured in docs/clip-parallel-rope.md; UNet3D has no positions and
ignores it). Temporal
convs and frame norms are exact across clips, as in `exact` (the reference leaves the norms
unsynchronised, a flaw clipmesh fixes).
"""

from __future__ import annotations

from clipmesh.families import FAMILIES
from clipmesh.worker.job import Denoising
from clipmesh.worker.strategies.base import FrameAttention, FrameStrategy
from clipmesh.worker.strategies.dual_scope import DualScope


def native_frames(model, plan) -> int:
    """The loaded model's native latent frames (ModelInfo of the model the plan names), else the family's."""
    try:
        frames = model.model_info(plan.request.model).native_latent_frames
    except Exception:  # a model whose info cannot be derived: the family default is the best we know
        frames = 0
    return frames or FAMILIES[model.family].native_latent_frames


class DualScopeAttention(FrameAttention):
    def __init__(self, ops, core: DualScope, rekey):
        super().__init__(ops, core.end - core.start)
        self.core, self.rekey = core, rekey

    def attend(self, attn, q, k, v):
        return self.core.attend(q, k, v, rekey=self.rekey, scale=self.ops.scale(attn))


class ClipParallelStrategy(FrameStrategy):
    name = "clip_parallel"

    def install(self, job, patches) -> None:
        # one core per job, shared by every patched attention; it hears each step's timestep
        timesteps = Denoising(job, None, None).timesteps.tolist()
        self.core = patches.track(DualScope(job.mesh, job.plan, job.rank, native_frames(job.model, job.plan),
                                            timesteps))
        self._rekeys: dict[int, object] = {}
        super().install(job, patches)

    def attention(self, job, ops, backend):
        if id(ops) not in self._rekeys:  # one rekey per family ops, shared by its attentions
            opts = job.plan.clip_parallel
            self._rekeys[id(ops)] = ops.global_rekey(opts.global_rope, opts.local_halo, self.core.native_frames)
        return DualScopeAttention(ops, self.core, self._rekeys[id(ops)])


STRATEGY = ClipParallelStrategy
