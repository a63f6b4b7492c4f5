"""`ulysses`: exact attention by sequence <-> head all-to-all (DeepSpeed-Ulysses).

Each rank holds a clip of the video's frames, as in `exact`. Around every frame-mixing
self-attention, one all-to-all turns "my frames, all heads" into "all frames, my H/N heads":
the rank attends the whole video with its heads, and a second all-to-all turns the output
back. So a rank moves 3 x its q/k/v share and receives its output share, instead of every
rank's K and V (`exact`); attention itself is split N ways by heads. Heads must divide by
the number of workers (the spec refuses the rest up front). Temporal convs and frame norms
are exact as for every frames partition (strategies/base.py).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from clipmesh.worker.strategies.base import FrameStrategy, MeshAttention


class UlyssesAttention(MeshAttention):
    def attend(self, attn, q, k, v):
        n, (b, f, s, h, d) = self.mesh.world_size, q.shape
        if h % n:
            raise ValueError(f"{h} attention heads do not split over {n} ranks")
        dv = v.shape[-1]
        # [B, F, S, H, D] -> [N (head group = destination rank), F*S, B, H/N, D]: one message of q|k|v
        qkv = torch.cat([q, k, v], dim=-1).flatten(1, 2).unflatten(2, (n, h // n)).permute(2, 1, 0, 3, 4)
        tokens = [length * s for length in self.lengths]
        full = self.mesh.all_to_all(qkv.flatten(0, 1), [f * s] * n, tokens)  # [all tokens, B, H/N, 2D+Dv]
        q, k, v = (t.transpose(0, 1).contiguous() for t in full.split([d, d, dv], dim=-1))  # [B, L, H/N, D]
        out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        back = self.mesh.all_to_all(out.transpose(0, 1), tokens, [f * s] * n)  # [N * F*S, B, H/N, Dv]
        return back.unflatten(0, (n, f, s)).permute(3, 1, 2, 0, 4, 5).reshape(b, f, s, h, dv)


class UlyssesStrategy(FrameStrategy):
    name = "ulysses"

    def attention(self, job, ops, backend):
        return UlyssesAttention(ops, job.mesh, job.clip_lengths, backend)


STRATEGY = UlyssesStrategy
