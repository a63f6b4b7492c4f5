"""Video-Infinity's dual-scope attention, family-agnostic: the math and the communication.

The oracle (what `DualScope.attend` computes, for every query token of global latent frame f):
one softmax over
  - local keys: the tokens of the 2P+1 frames of f's window plan.local_window(f, P, F): centred
    on f, shifted inward at the video's ends, never clipped (the window crosses worker
    boundaries; a video of at most 2P+1 frames is one window: full attention, as `exact`),
  - global keys: the tokens of those of the G frames plan.global_frame_indices(F, G) that f's
    window does not hold (the reference appends all G, counting a frame in the window twice),
with `phase_bias` added to the logits of the global columns during the first global_phase share
of the steps (the high-noise, layout phase) and to the local columns after it, and optionally the logit scale
of each query multiplied by max(1, log(visible keys) / log(native keys)) (entropy scaling).

Optionally (spectral_blend, FreeLong's SpectralBlend, docs/algorithms.md section 1) that output is
the "global branch", and the window part of the same softmax (each query's attention over its
window alone, the same q; for a frame whose window holds every global frame, the same) is the
"local branch": along the frame axis of the whole video, the result takes the global branch's
low temporal frequencies and the local branch's high ones,
  out = IFFT(LP * FFT(global)) + IFFT((1 - LP) * FFT(local)) = global - IFFT((1 - LP) * FFT(global - local)),
LP a Gaussian low-pass whose gain is 1/2 at 1/(2P+1) cycles per frame (periods longer than the
window come from the global branch). Cost: one all-gather of global - local (the attention
outputs of the whole video, [B, F, S, H, Dv]: half of exact's K|V all-gather) and a real FFT of
them per attend call, on every rank; none where no frame of the video has a global frame outside
its window (G = 0, or a video within one window: there the blend is the identity).

Layout: the frame axis is explicit, q/k/v are [B, F_local, S, H, D] (S tokens per frame: Wan
has S = h*w patches per latent frame; UNet3D temporal attention has S = 1, B = batch*h*w).

Communication per attend call: one halo exchange of projected K|V (P frames each side, up to
2P at the video's ends where the windows shift inward; multi-hop where a neighbour's clip is
shorter) and one all-gather of the global frames'
K|V (each rank contributes the ones it owns). Hidden states never travel.

Cost: each query frame attends to its own window (<= 2P+1 frames) plus G frames, so compute
is O(F_local * (2P+1+G)) frames of keys, not O(F_local * F). Nothing is materialised per query
frame on CPU: a query frame's window is a view of the halo-extended K/V, the global values are
one call per run of query frames that see the same ones, and the one softmax over both key sets
is two attention calls (window, globals) merged by their log-sum-exps, each weighed by
exp(lse + its phase bias); no mask is ever needed. Only a rekey (per-query global
keys) makes [B, chunk, G, S, H, Dk] at a time, chunk_bytes bounding it; without one, the globals
are a single call for all query frames. A query frame's result is a function of its query,
window and globals only, so it does not depend on the chunk size or the worker split (beyond
float rounding where frames share a call). The kernels that return the log-sum-exp are CPU
flash attention and, on CUDA, flash attention (fp16/bf16) or memory-efficient attention (fp32
too) (`_lse_kernel`); where none fits, a query frame's two key sets are concatenated and the
phase bias is a per-column mask instead (tested equal).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from clipmesh.plan import global_frame_indices, local_window

# Per-query global keys (a rekey's output) are made for chunks of query frames of at most this size.
CHUNK_BYTES = 32 << 20

# rekey(global_k [B, G, S, H, Dk], query_frames [C] (global indices, long), global_frames [G] (long))
#   -> keys [B, C, G, S, H, Dk] that query frame c sees for the global frames.
# How a family presents global frames to a query (e.g. Wan re-rotates their temporal RoPE).
Rekey = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DualScope:
    """One job's dual-scope attention on one rank; shared by every patched attention module."""

    def __init__(self, mesh, plan, rank: int, native_frames: int, timesteps=(), chunk_bytes: int = CHUNK_BYTES,
                 chunk_frames: int | None = None):
        """`native_frames`: frames the model was trained to attend over at once (Wan2.1: 21 latent
        frames; VideoCrafter2: 16); entropy scaling compares visible keys with native_frames * S.
        `timesteps`: the job's, in order; the first global_phase * T (rounded half up) run in the global phase.
        `chunk_frames` fixes the query frames per rekey chunk (tests); by default it follows chunk_bytes."""
        opts = plan.clip_parallel
        for field in ("local_halo", "global_frames", "global_phase", "phase_bias", "entropy_scaling",
                      "spectral_blend"):
            if not opts.HasField(field):
                raise ValueError(f"plan.clip_parallel.{field} is unset (the planner resolves every field)")
        if opts.local_halo < 0 or opts.global_frames < 0:
            raise ValueError(f"local_halo and global_frames must be >= 0, got {opts.local_halo}, {opts.global_frames}")
        self.mesh, self.rank = mesh, rank
        self.halo, self.phase_bias = opts.local_halo, opts.phase_bias
        # a share of the steps, not a timestep: t = 800 is 20% of a DDPM's steps but half of a
        # shifted flow-matching schedule's; timesteps fall, so t >= the last global one is global
        global_steps = math.floor(opts.global_phase * len(timesteps) + 0.5)  # half up: 0.25 of 2 steps is 1
        self.phase_switch_t = float(timesteps[global_steps - 1]) if global_steps else math.inf
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
        # each query frame's window [first, last] (never clipped: shifted inward at the ends), and
        # what each rank's windows reach beyond its clip (what it asks of the others per call)
        windows = [local_window(f, self.halo, self.num_frames) for f in range(self.num_frames)]
        self.windows = windows[self.start:self.end]
        self.reach = ([s - windows[s][0] if e > s else 0 for s, e in clips],
                      [windows[e - 1][1] - (e - 1) if e > s else 0 for s, e in clips])
        # per query frame: the global frames (positions in global_frames) its window does not
        # already hold; one the window holds adds nothing (it is not counted twice)
        outside = [tuple(j for j, g in enumerate(self.global_frames) if not first <= g <= last)
                   for first, last in windows]
        self.outside = outside[self.start:self.end]
        # the blend acts (and costs a collective) only where some frame of the video sees a global
        # outside its window: the same answer on every rank
        self.low_pass = (_low_pass(self.num_frames, self.halo)
                         if opts.spectral_blend and any(outside) else None)
        self.t: float | None = None

    def begin_step(self, t: float) -> None:
        """The timestep of the step about to run (the runner calls it through the job's Patches)."""
        self.t = float(t)

    @property
    def global_phase(self) -> bool:
        if self.t is None:
            raise RuntimeError("DualScope.begin_step was not called before attend")
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
        dv = v.shape[-1]
        kv = torch.cat([k, v], dim=-1)  # one message per exchange, not two

        left, right = self.mesh.exchange_halos(kv, 1, *self.reach, sizes=self.lengths)
        # global frames [ext_start, ext_start + len), keys and values apart so a window is a view
        ext_k = torch.cat([left[..., :dk], k, right[..., :dk]], dim=1)
        ext_v = torch.cat([left[..., dk:], v, right[..., dk:]], dim=1)
        ext_start = self.start - left.shape[1]

        n_global = len(self.global_frames)
        if n_global:
            gkv = self.mesh.all_gather_uneven(kv[:, self.owned_global], self.global_counts, dim=1)
            gk, gv = gkv[..., :dk].contiguous(), gkv[..., dk:].contiguous()   # [B, G, S, H, D]
            global_idx = torch.tensor(self.global_frames, device=q.device)

        def flat(x: torch.Tensor) -> torch.Tensor:  # [B, n, S, H, D] -> [B, H, n*S, D]
            return x.flatten(1, 2).transpose(1, 2)

        scale = 1.0 / math.sqrt(dk) if scale is None else scale
        local_bias, global_bias = (0.0, self.phase_bias) if global_phase else (self.phase_bias, 0.0)
        frames = torch.arange(self.start, self.end, device=q.device)            # global query frames
        if self.entropy_scaling:
            native = float(self.native_frames * s)
            if native <= 1:
                raise ValueError(f"entropy scaling needs native keys > 1, got {native}")
            visible = torch.tensor([(last - first + 1 + len(out)) * s for (first, last), out
                                    in zip(self.windows, self.outside)], dtype=torch.float64, device=q.device)
            # only beyond the native length: within it the model saw such key counts in training
            factor = (visible.log() / math.log(native)).clamp(min=1.0).to(q.dtype)
            q = q * factor.view(1, f_local, 1, 1, 1)

        out = q.new_empty(b, f_local, s, h, dv)
        # spectral blend: global branch - local branch per query frame (0 where no global is outside)
        diff = q.new_zeros(b, f_local, s, h, dv) if self.low_pass is not None else None
        with_lse = _has_lse_attention(q)
        shared: dict[int, tuple] = {}  # query frame -> its (out, lse) over the globals, from one call per run
        if n_global and rekey is None and with_lse:  # every query of a run sees the same global keys
            for a, z, seen in _runs(self.outside):
                if seen:
                    idx = list(seen)
                    g_out, g_lse = _attention(flat(q[:, a:z]), flat(gk[:, idx]), flat(gv[:, idx]), scale)
                    for i in range(a, z):
                        shared[i] = g_out[:, :, (i - a) * s:(i - a + 1) * s], g_lse[:, :, (i - a) * s:(i - a + 1) * s]
        chunk = f_local
        if n_global and rekey is not None:  # per-query global keys, made a chunk of frames at a time
            per_frame_bytes = n_global * s * h * dk * k.element_size() * b
            chunk = self.chunk_frames or max(1, self.chunk_bytes // max(1, per_frame_bytes))
        for a in range(0, f_local, chunk):
            c = min(chunk, f_local - a)
            if n_global and rekey is not None:
                ck = rekey(gk, frames[a:a + c], global_idx)                      # [B, c, G, S, H, Dk]
            for i in range(a, a + c):
                first, last = self.windows[i]
                lo, hi = first - ext_start, last - ext_start + 1                 # the window's frames
                qf = q[:, i].transpose(1, 2)                                     # [B, H, S, Dk]
                wk, wv = flat(ext_k[:, lo:hi]), flat(ext_v[:, lo:hi])            # views, no copy
                seen = list(self.outside[i])
                if not seen:
                    out[:, i] = F.scaled_dot_product_attention(qf, wk, wv, scale=scale).transpose(1, 2)
                    continue
                if rekey is None and with_lse:  # from the run's one call: no per-frame copy of the globals
                    g_o, g_l = shared[i]
                else:
                    gkf = flat((ck[:, i - a] if rekey is not None else gk)[:, seen])
                    gvf = flat(gv[:, seen])
                    if not with_lse:  # one call over both key sets, the biases as a per-column mask
                        bias = torch.full((wk.shape[2] + gkf.shape[2],), global_bias, dtype=q.dtype, device=q.device)
                        bias[:wk.shape[2]] = local_bias
                        res = F.scaled_dot_product_attention(qf, torch.cat([wk, gkf], dim=2),
                                                             torch.cat([wv, gvf], dim=2),
                                                             attn_mask=bias.view(1, 1, 1, -1), scale=scale)
                        out[:, i] = res.transpose(1, 2)
                        if diff is not None:  # the window alone (its bias is one constant: it cancels)
                            l_out = F.scaled_dot_product_attention(qf, wk, wv, scale=scale)
                            diff[:, i] = (res - l_out).transpose(1, 2)
                        continue
                    g_o, g_l = _attention(qf, gkf, gvf, scale)
                l_out, l_lse = _attention(qf, wk, wv, scale)
                # one softmax over both key sets: each part's softmax weighed by its share of the mass
                l_lse, g_l = l_lse + local_bias, g_l + global_bias
                top = torch.maximum(l_lse, g_l)
                w_l, w_g = (l_lse - top).exp_(), (g_l - top).exp_()
                total = w_l + w_g
                res = l_out.float() * (w_l / total).unsqueeze(-1)
                res.addcmul_(g_o.float(), (w_g / total).unsqueeze(-1))
                out[:, i] = res.transpose(1, 2)
                if diff is not None:
                    diff[:, i] = (res - l_out.float()).transpose(1, 2)
        return out if diff is None else self._blend(out, diff)

    def _blend(self, out: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
        """out - IFFT((1 - LP) * FFT(diff)) over the whole video's frames, this rank's slice: the
        global branch's low temporal frequencies and the local branch's high ones. Exact across
        ranks: the whole video's diff is gathered (one all-gather), every rank transforms it."""
        whole = self.mesh.all_gather_uneven(diff, self.lengths, dim=1).flatten(2)    # [B, F, S*H*Dv]
        dtype = torch.float64 if whole.dtype == torch.float64 else torch.float32
        high_pass = (1 - self.low_pass).to(whole.device, dtype).view(1, -1, 1)
        res = out.flatten(2).to(dtype, copy=True)
        # features a chunk at a time: the spectrum's memory is bounded by chunk_bytes
        step = max(1, self.chunk_bytes // (whole.shape[0] * self.num_frames * 2 * res.element_size()))
        for a in range(0, whole.shape[2], step):
            spectrum = torch.fft.rfft(whole[..., a:a + step].to(dtype), n=self.num_frames, dim=1) * high_pass
            res[..., a:a + step] -= torch.fft.irfft(spectrum, n=self.num_frames, dim=1)[:, self.start:self.end]
        return res.to(out.dtype).view(out.shape)


def _low_pass(num_frames: int, halo: int) -> torch.Tensor:
    """[F // 2 + 1] gains of the real FFT's bins k (k / F cycles per frame): 2^-(k(2P+1)/F)^2, a
    Gaussian that passes 1/2 at 1/(2P+1) cycles per frame, where a box would step from 1 to 0.
    Gaussian, not a box, as FreeLong: a box's step is a sinc across the whole video in time
    (ringing, far frames weighed with alternating signs, and which bins pass jumps as F grows by
    one frame); the Gaussian's kernel in time is itself a Gaussian, a few frames wide. The FFT
    treats the video as a loop, so the kernel also reaches from the last frames to the first."""
    cycles = torch.arange(num_frames // 2 + 1, dtype=torch.float64) / num_frames
    return torch.exp2(-(cycles * (2 * halo + 1)) ** 2)


def _runs(items: list) -> list[tuple[int, int, object]]:
    """[(start, end, item)] of the maximal runs of equal consecutive items."""
    runs, a = [], 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i] != items[a]:
            runs.append((a, i, items[a]))
            a = i
    return runs


# Kernels that return attention together with each query's log-sum-exp (what lets attend weigh two
# key sets without concatenating them): [B, H, L, D] in, (out, lse [B, H, L]) out.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_EFFICIENT_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)


def _lse_kernel(q: torch.Tensor) -> str | None:
    """The kernel _attention uses for q here: "cpu" (CPU flash attention, fp32/fp64), "flash"
    (CUDA flash attention: fp16/bf16, head dim a multiple of 8 up to 256), "efficient" (CUDA
    memory-efficient attention, fp32 too); None where none fits (attend then concatenates)."""
    if q.device.type == "cpu":
        return "cpu" if _FLASH_CPU is not None and q.dtype in (torch.float32, torch.float64) else None
    if q.device.type != "cuda":
        return None
    if _FLASH_CUDA is not None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 \
            and q.shape[-1] % 8 == 0:
        return "flash"
    if _EFFICIENT_CUDA is not None and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return "efficient"
    return None


def _has_lse_attention(q: torch.Tensor) -> bool:
    """Whether _attention can run here; elsewhere attend concatenates each query frame's two key
    sets instead (a copy per query frame, the biases as a mask)."""
    return _lse_kernel(q) is not None


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T scale) v and each query's log-sum-exp of its scaled logits: [B, H, L, Dv], [B, H, L]."""
    kernel = _lse_kernel(q)
    if kernel == "cpu":
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, scale=scale)[:2]
    elif kernel == "flash":
        out, lse = _FLASH_CUDA(q, k, v, 0.0, False, False, scale=scale)[:2]
    else:  # the memory-efficient kernel pads its log-sum-exp to a multiple of 32 queries
        out, lse = _EFFICIENT_CUDA(q, k, v, None, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., :q.shape[2]]
    return out, lse
