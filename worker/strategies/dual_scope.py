"""Video-Infinity's dual-scope attention, family-agnostic: the math and the communication.

The oracle (what `DualScope.attend` computes, for every query token of global latent frame f):
one softmax over
  - local keys: the tokens of every *existing* frame j with |j - f| <= P (the window crosses
    worker boundaries; frames outside [0, F) do not exist and are masked, never zero-filled),
  - global keys: the tokens of the G frames plan.global_frame_indices(F, G), appended as extra
    keys (a global frame inside the window is seen twice, as in the reference),
with `phase_bias` added to the logits of the global columns while t >= phase_switch_t (the
high-noise, layout phase) and to the local columns after it, and optionally the logit scale
of each query multiplied by log(visible keys) / log(native keys) (entropy scaling).

Layout: the frame axis is explicit, q/k/v are [B, F_local, S, H, D] (S tokens per frame: Wan
has S = h*w patches per latent frame; UNet3D temporal attention has S = 1, B = batch*h*w).

Communication per attend call: one halo exchange of projected K|V (P frames each side,
multi-hop where a neighbour's clip is shorter than P) and one all-gather of the global frames'
K|V (each rank contributes the ones it owns). Hidden states never travel.

Cost: each query frame attends to its own window (<= 2P+1 frames) plus G frames, so compute
is O(F_local * (2P+1+G)) frames of keys, not O(F_local * F). Query frames are processed in
chunks; within a chunk every query frame is its own batch element with its own keys, so the
mask is only a per-column bias of shape [chunk, 1, 1, keys] (never [queries, keys]) and the
result does not depend on the chunk size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from clipmesh.plan import global_frame_indices

# Keys and values materialised per chunk of query frames are kept under this many bytes.
CHUNK_BYTES = 256 << 20

# rekey(global_k [B, G, S, H, Dk], query_frames [C] (global indices, long), global_frames [G] (long))
#   -> keys [B, C, G, S, H, Dk] that query frame c sees for the global frames.
# How a family presents global frames to a query (e.g. Wan re-rotates their temporal RoPE).
Rekey = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DualScope:
    """One job's dual-scope attention on one rank; shared by every patched attention module."""

    def __init__(self, mesh, plan, rank: int, native_frames: int, chunk_bytes: int = CHUNK_BYTES,
                 chunk_frames: int | None = None):
        """`native_frames`: frames the model was trained to attend over at once (Wan2.1: 21 latent
        frames; VideoCrafter2: 16); entropy scaling compares visible keys with native_frames * S.
        `chunk_frames` fixes the query frames per chunk (tests); by default it follows chunk_bytes."""
        opts = plan.clip_parallel
        for field in ("local_halo", "global_frames", "phase_switch_t", "phase_bias", "entropy_scaling"):
            if not opts.HasField(field):
                raise ValueError(f"plan.clip_parallel.{field} is unset (the planner resolves every field)")
        if opts.local_halo < 0 or opts.global_frames < 0:
            raise ValueError(f"local_halo and global_frames must be >= 0, got {opts.local_halo}, {opts.global_frames}")
        self.mesh, self.rank = mesh, rank
        self.halo, self.phase_switch_t, self.phase_bias = opts.local_halo, opts.phase_switch_t, opts.phase_bias
        self.entropy_scaling, self.native_frames = opts.entropy_scaling, native_frames
        self.chunk_bytes, self.chunk_frames = chunk_bytes, chunk_frames
        clips = [(c.start, c.end) for c in plan.clips]
        self.lengths = [end - start for start, end in clips]
        self.start, self.end = clips[rank]
        self.num_frames = plan.num_latent_frames
        self.global_frames = global_frame_indices(self.num_frames, opts.global_frames)
        # owned_global: clip-local indices of the global frames this rank contributes; rank r
        # contributes the ones inside its clip; concatenated in rank order they
        # are in global order, because both the indices and the clips are sorted
        self.global_counts = [sum(s <= g < e for g in self.global_frames) for s, e in clips]
        self.owned_global = [g - self.start for g in self.global_frames if self.start <= g < self.end]
        self.t: float | None = None

    def set_timestep(self, t: float) -> None:
        self.t = float(t)

    @property
    def global_phase(self) -> bool:
        if self.t is None:
            raise RuntimeError("DualScope.set_timestep was not called before attend")
        return self.t >= self.phase_switch_t

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rekey: Rekey | None = None,
               scale: float | None = None) -> torch.Tensor:
        """q, k, v [B, F_local, S, H, D] of this rank's clip (k already position-encoded as the
        window sees it) -> out [B, F_local, S, H, Dv]. Collective: every rank calls it in step."""
        b, f_local, s, h, dk = k.shape
        if f_local != self.end - self.start or q.shape[:4] != k.shape[:4] or v.shape[:4] != k.shape[:4]:
            raise ValueError(f"rank {self.rank}: q/k/v {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} "
                             f"do not fit a clip of {self.end - self.start} frames")
        global_phase = self.global_phase
        kv = torch.cat([k, v], dim=-1)  # one message per exchange, not two

        left, right = self.mesh.exchange_halos(kv, 1, self.halo, self.halo, sizes=self.lengths)
        ext = torch.cat([left, kv, right], dim=1)  # global frames [ext_start, ext_start + len)
        ext_start = self.start - left.shape[1]

        n_global = len(self.global_frames)
        if n_global:
            gkv = self.mesh.all_gather_uneven(kv[:, self.owned_global], self.global_counts, dim=1)
            gk, gv = gkv[..., :dk], gkv[..., dk:]
            global_idx = torch.tensor(self.global_frames, device=q.device)

        scale = 1.0 / math.sqrt(dk) if scale is None else scale
        width = 2 * self.halo + 1
        per_frame_bytes = (width + n_global) * s * h * kv.shape[-1] * kv.element_size() * b
        chunk = self.chunk_frames or max(1, self.chunk_bytes // max(1, per_frame_bytes))
        local_bias, global_bias = (0.0, self.phase_bias) if global_phase else (self.phase_bias, 0.0)

        outs = []
        for a in range(0, f_local, chunk):
            c = min(chunk, f_local - a)
            frames = torch.arange(self.start + a, self.start + a + c, device=q.device)  # global query frames
            # window slots: offsets o from each query frame; keep only offsets some query can use
            first, last = self.start + a, self.start + a + c - 1                # ints: no device sync
            lo = max(-self.halo, -last)
            hi = min(self.halo, self.num_frames - 1 - first)
            offsets = torch.arange(lo, hi + 1, device=q.device)
            keyframe = frames[:, None] + offsets[None, :]                        # [c, w]
            exists = (keyframe >= 0) & (keyframe < self.num_frames)
            idx = (keyframe - ext_start).clamp(0, ext.shape[1] - 1)             # masked slots point anywhere valid
            win = ext[:, idx]                                                    # [B, c, w, S, H, Dk+Dv]
            wk, wv = win[..., :dk], win[..., dk:]
            if n_global:
                ck = rekey(gk, frames, global_idx) if rekey else gk.unsqueeze(1).expand(b, c, *gk.shape[1:])
                keys = torch.cat([wk, ck], dim=2)
                values = torch.cat([wv, gv.unsqueeze(1).expand(b, c, *gv.shape[1:])], dim=2)
            else:
                keys, values = wk, wv
            n_slots = keys.shape[2]

            # per-column bias, frame level [c, slots], then token level
            bias = torch.full((c, n_slots), global_bias, dtype=torch.float32, device=q.device)
            bias[:, :offsets.numel()] = local_bias
            bias[:, :offsets.numel()].masked_fill_(~exists, float("-inf"))
            mask = bias.repeat_interleave(s, dim=1).to(q.dtype)                  # [c, slots*S]
            mask = mask[None].expand(b, c, -1).reshape(b * c, 1, 1, n_slots * s)

            qc = q[:, a:a + c]
            if self.entropy_scaling:
                visible = (exists.sum(dim=1) + n_global).to(torch.float64) * s   # tokens each query sees
                native = float(self.native_frames * s)
                if native <= 1:
                    raise ValueError(f"entropy scaling needs native keys > 1, got {native}")
                factor = (visible.log() / math.log(native)).to(q.dtype)
                qc = qc * factor.view(1, c, 1, 1, 1)

            out = F.scaled_dot_product_attention(
                qc.reshape(b * c, s, h, dk).transpose(1, 2),
                keys.reshape(b * c, n_slots * s, h, dk).transpose(1, 2),
                values.reshape(b * c, n_slots * s, h, -1).transpose(1, 2),
                attn_mask=mask, dropout_p=0.0, scale=scale)                      # [B*c, H, S, Dv]
            outs.append(out.transpose(1, 2).reshape(b, c, s, h, -1))
        return torch.cat(outs, dim=1)
