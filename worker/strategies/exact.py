"""`exact`: clip parallelism that reproduces the single-device result.

Every op of a video denoiser is per frame (or per token) except the frame-mixing modules the
adapter lists. So each rank runs its own clip of frames through the model, and only
self-attention reaches out: it computes Q/K/V for its tokens (at global frame positions),
all-gathers K and V from every rank, and attends its queries over the whole video's keys.
Temporal convs and frame norms are made exact by the frames partition (input halos,
synchronised statistics; strategies/base.py). Cost: one K/V all-gather per frame-mixing
attention per denoiser call.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from clipmesh.worker.strategies.base import FrameStrategy, MeshAttention


class ExactAttention(MeshAttention):
    """Local queries, whole-video keys and values."""

    def attend(self, attn, q, k, v):
        kv = self.mesh.all_gather_uneven(torch.cat([k, v], dim=-1), self.lengths, dim=1)  # one collective, not two
        k, v = (t.flatten(1, 2).contiguous() for t in kv.chunk(2, dim=-1))
        out = dispatch_attention_fn(q.flatten(1, 2), k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        return out.unflatten(1, (self.frames, -1))


class ExactStrategy(FrameStrategy):
    name = "exact"

    def attention(self, job, ops, backend):
        return ExactAttention(ops, job.mesh, job.clip_lengths, backend)


STRATEGY = ExactStrategy
