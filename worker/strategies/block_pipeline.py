"""`block_pipeline`: DualParal (docs/algorithms.md section 2). The ranks split the transformer's
blocks (layers), not the frames, and a queue of video blocks at staggered noise levels flows
through them, so a worker's memory is bounded by the queue, not by the video's length, and a
video can go on until it is cancelled.

The queue: the video is cut into blocks of `block_frames` latent frames. Each iteration one new
block (pure noise) enters at the tail, every queued block advances one step, and the head block
leaves after T steps, final: adjacent blocks are one step apart. Within an iteration blocks go
tail -> head (noisiest first) through the stages, GPipe-style: rank 0 embeds and runs its
layers, each rank passes the hidden states on (point to point), the last rank runs the output
head and CFG and sends the noise prediction back to rank 0, which steps that block's own
scheduler. A block reads its own latents and its predecessor's, so rank 0 only waits for the
predictions those need; with more queued blocks than stages the pipeline does not bubble.

Context (`context_frames` = c): a block's input is its predecessor's last c latent frames
(at this block's timestep) followed by its own; the context is dropped from the output. The
feature cache gives the look-ahead: every stage keeps, per self-attention, the raw K/V (before
k-norm and RoPE) of the first c *own* frames of the block it just ran, which is the temporally
next block of the one it runs next; that block appends them to its keys, positioned right after
its own frames. Caches are reset every iteration and never cross steps.

Coordinated noise: one pool of block_frames + c Gaussian frames drawn from the job seed; each
new block's noise is a random permutation of the pool frames minus the previous block's
trailing c frames (FreeNoise-style reuse), identical on every rank and for any N.

Control travels with the data: every message to the next stage starts with a small header (what
to run, or stop), so only rank 0 knows the queue and an unbounded job stops when rank 0 says so.
The queue and the stages are this strategy's schedule (strategies/block_queue.py); the runner
(render.py) drives it like any other.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from clipmesh.worker.adapters.wan import WanStages
from clipmesh.worker.adapters.wan_rope import apply_rope
from clipmesh.worker.strategies.base import Strategy
from clipmesh.worker.strategies.block_queue import BlockQueue, Item, StageFollower

class FeatureCache:
    """What the self-attentions of one stage share: the item being run, its token layout, and
    RoPE tables by frame count."""

    def __init__(self, stages: WanStages, context_frames: int, h: int, w: int):
        self.stages, self.context_frames, self.h, self.w = stages, context_frames, h, w
        self.tokens_per_frame = (h // stages.p_h) * (w // stages.p_w)
        self.item: Item | None = None
        self._ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, frames: int):
        if frames not in self._ropes:
            self._ropes[frames] = self.stages.rope(frames, self.h, self.w)
        return self._ropes[frames]


class FeatureCacheAttention:
    """Wan attn1 processor: WanAttnProcessor's self-attention plus the feature cache, which the
    runner empties at every iteration's first item (reset_state)."""

    def __init__(self, shared: FeatureCache, ops, backend=None):
        self.shared, self.ops = shared, ops
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None  # raw K/V of the last block's first frames
        self._attention_backend = backend

    def reset_state(self) -> None:
        self.kv = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("FeatureCacheAttention is for self-attention without a mask (attn1)")
        shared, item = self.shared, self.shared.item
        q, k, v = self.ops.project(attn, hidden_states)
        n = shared.tokens_per_frame
        own_first = slice(item.context * n, (item.context + shared.context_frames) * n)
        keep = (k[:, own_first], v[:, own_first]) if shared.context_frames else None
        if self.kv is not None:  # the temporally next block's first frames, after our own
            k, v = torch.cat([k, self.kv[0]], dim=1), torch.cat([v, self.kv[1]], dim=1)
        self.kv = keep

        q, k, v = self.ops.heads(attn, q, k, v)  # per token (RMS across heads): the cache may be raw
        q = apply_rope(q, *rotary_emb)
        k = apply_rope(k, *(rotary_emb if k.shape[1] == q.shape[1] else shared.rope(k.shape[1] // n)))
        out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        return self.ops.out(attn, out.unflatten(1, (-1, n)), hidden_states)


class BlockPipelineStrategy(Strategy):
    name = "block_pipeline"

    def install(self, job, patches) -> None:
        # one WanStages per expert (Wan 2.2 A14B: two); each item runs on the expert of its step
        self.stages = [WanStages(transformer) for transformer in job.model.denoisers]
        _, h, w = job.model.latent_shape(job.request.height, job.request.width)
        self.cache = FeatureCache(self.stages[0], job.plan.block_pipeline.context_frames, h, w)
        super().install(job, patches)

    def patch_positions(self, job, mixer, patches) -> None:
        """Nothing to patch: tokens are positioned within their block, and the stages pass the
        block's RoPE to the layers themselves."""

    def patch_attention(self, job, mixer, patches) -> None:
        """This stage's layers of every expert. Each attention keeps its own cache, so at a
        two-expert model's switch the first block on the other expert has no look-ahead (the K/V
        of the block before it came from the other expert's projections)."""
        start, end = job.layers
        if start <= mixer.layer < end:  # this stage's layers only
            backend = getattr(mixer.module.processor, "_attention_backend", None)
            patches.set_processor(mixer.module, FeatureCacheAttention(self.cache, mixer.ops, backend))

    def schedule(self, job, denoising, resume=None):
        """Rank 0 keeps the queue (and resumes it from a checkpoint); the others follow."""
        if job.plan.start_step:  # a checkpoint resumes the queue's blocks, each at its own step
            raise ValueError("block_pipeline plans start at step 0; a resume comes as the queue's checkpoint")
        if job.rank == 0:
            return BlockQueue(job, denoising, self.stages, self.cache, resume)
        return StageFollower(job, denoising, self.stages, self.cache)


STRATEGY = BlockPipelineStrategy
