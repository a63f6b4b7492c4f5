"""`clip_parallel`: Video-Infinity. Each rank denoises its clip; every module that mixes frames
is replaced by dual-scope attention (strategies/dual_scope.py): a +-P frame window that crosses
worker boundaries plus G global frames of the whole video, with a timestep-dependent phase bias.
Unlike `exact` it is not the single-device model: it is how videos longer than the model's
native length are made, at a cost per frame that does not grow with the video.

Family dispatch: install() picks `_install_<family>`; each one only says which modules to patch
and how their tokens map to [B, F_local, S, H, D]. The core is shared.

Wan: every attn1 (3D self-attention over frame-major tokens, S = h*w patches per frame).
Local tokens get RoPE at their true global frame positions (install_global_rope); halos arrive
rotated by their owners. Where the global frames are presented in time is GLOBAL_ROPE_POLICY
(measured in docs/clip-parallel-rope.md).

UNet3D: every temporal attention (attn1 and attn2 of each TransformerTemporalModel block, both
self-attention over [B*h*w, F, C]: S = 1, no positions). Temporal convs and frame-spanning
GroupNorms are made exact across clips as in `exact` (temporal_ops: input halos, synchronised
statistics); the reference leaves the norms unsynchronised, a flaw clipmesh fixes.
"""

from __future__ import annotations

import torch

from clipmesh.worker.adapters.unet3d import temporal_attention_out, temporal_attention_qkv
from clipmesh.worker.adapters.wan import install_global_rope, self_attention_qkv
from clipmesh.worker.strategies.base import Strategy
from clipmesh.worker.strategies.dual_scope import DualScope

# Frames a family's model attends over in training (entropy scaling's reference length, and the
# "native" RoPE policy's reach) where the model's own ModelInfo does not say.
NATIVE_FRAMES = {"wan": 21, "unet3d": 16}


def native_frames(model, plan) -> int:
    """The loaded model's native latent frames (ModelInfo of the model the plan names), else the family's."""
    try:
        frames = model.model_info(plan.request.model).native_latent_frames
    except Exception:  # a model whose info cannot be derived: the family default is the best we know
        frames = 0
    return frames or NATIVE_FRAMES[model.family]

# Temporal RoPE position at which query frame f sees global frame g (Wan; N = native frames):
#   "true":   g, its real position (|g - f| may be far beyond any distance seen in training);
#   "native": clamp(g, f - (N-1), f + (N-1)): the real position while the distance is one the model
#             was trained on (always, for videos up to N frames), else the farthest trained one;
#   "clamp":  clamp(g, f - P, f + P): inside f's window; globals beyond it sit at its edge;
#   "query":  f, the query's own time (like a temporal attention without positions).
GLOBAL_ROPE_POLICIES = ("true", "native", "clamp", "query")
GLOBAL_ROPE_POLICY = "native"


def presented_positions(policy: str, query_frames: torch.Tensor, global_frames: torch.Tensor, halo: int,
                        native: int) -> torch.Tensor:
    """[C, G] temporal positions of the global frames as each query frame sees them."""
    f, g = query_frames[:, None], global_frames[None, :]
    if policy == "true":
        return g.expand(f.shape[0], -1)
    if policy in ("native", "clamp"):
        reach = native - 1 if policy == "native" else halo
        return torch.minimum(torch.maximum(g, f - reach), f + reach)
    if policy == "query":
        return f.expand(-1, g.shape[1])
    raise ValueError(f"unknown global RoPE policy {policy!r}; known: {', '.join(GLOBAL_ROPE_POLICIES)}")


class WanGlobalRope:
    """DualScope rekey for Wan: moves the global keys (rotated at their true positions by their
    owners) to the policy's positions by one more temporal rotation, R(p - g) R(g) k = R(p) k.
    Only the temporal channels turn; the spatial (h, w) rotation is per token and unchanged.
    The keys are copied once per query frame, and only global frames that some query sees moved
    are turned (one complex product over their temporal channels)."""

    def __init__(self, rope: torch.nn.Module, policy: str, halo: int, native: int):
        if policy not in GLOBAL_ROPE_POLICIES:
            raise ValueError(f"unknown global RoPE policy {policy!r}; known: {', '.join(GLOBAL_ROPE_POLICIES)}")
        self.policy, self.halo, self.native, self.t_dim = policy, halo, native, rope.t_dim
        # rows: integer offsets 0..max_seq_len-1, the module's own frequency table (same dtype)
        self.cos_t, self.sin_t = rope.freqs_cos[:, :rope.t_dim], rope.freqs_sin[:, :rope.t_dim]

    def __call__(self, gk: torch.Tensor, query_frames: torch.Tensor, global_frames: torch.Tensor) -> torch.Tensor:
        delta = presented_positions(self.policy, query_frames, global_frames, self.halo, self.native) - global_frames[None, :]
        out = gk.unsqueeze(1).expand(gk.shape[0], delta.shape[0], *gk.shape[1:]).contiguous()  # [B, C, G, S, H, D]
        turn = (delta != 0).any(dim=0).nonzero().flatten().tolist()      # global frames some query sees moved
        if not turn:
            return out
        cos = self.cos_t[delta.abs()][..., 0::2]                            # [C, G, t_dim/2]; cos is even
        sin = (self.sin_t[delta.abs()] * delta.sign()[..., None].to(self.sin_t.dtype))[..., 1::2]  # sin is odd
        # Wan's interleaved pairs (x1, x2) turn as the complex number x1 + i x2 times cos + i sin
        rot = torch.complex(cos.float(), sin.float()) if cos.dtype != torch.float64 else torch.complex(cos, sin)
        exact = out.dtype in (torch.float32, torch.float64)
        for g in turn:  # only the temporal channels, only the moved global frames
            part = out[:, :, g, ..., :self.t_dim]                           # [B, C, S, H, t_dim]
            pairs = part.unflatten(-1, (-1, 2)) if exact else part.float().unflatten(-1, (-1, 2))
            turned = torch.view_as_complex(pairs)
            turned.mul_(rot[:, g, None, None, :].to(turned.dtype))
            if not exact:
                part.copy_(pairs.flatten(-2))
        return out


class WanDualScopeAttention:
    """Attention processor for one Wan attn1: Q/K/V as WanAttnProcessor makes them, then dual scope."""

    def __init__(self, core: DualScope, rekey):
        self.core, self.rekey = core, rekey

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanDualScopeAttention is for self-attention without a mask (attn1)")
        q, k, v = self_attention_qkv(attn, hidden_states, rotary_emb)  # [B, F_local*S, H, D]
        frames = self.core.end - self.core.start
        if q.shape[1] % frames:
            raise ValueError(f"{q.shape[1]} tokens are not {frames} frames of equal size")
        # tokens are frame-major: [B, F*S, H, D] -> [B, F, S, H, D]
        q, k, v = (t.unflatten(1, (frames, -1)) for t in (q, k, v))
        out = self.core.attend(q, k, v, rekey=self.rekey)
        out = out.flatten(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class TemporalDualScopeAttention:
    """Attention processor for one UNet3D temporal self-attention: [B*h*w, F_local, C] -> the same,
    dual scope over frames (S = 1, batch = the latent pixels)."""

    def __init__(self, core: DualScope):
        self.core = core

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("TemporalDualScopeAttention is for temporal self-attention without a mask")
        q, k, v = temporal_attention_qkv(attn, hidden_states)
        rows, frames = hidden_states.shape[:2]
        q, k, v = (t.reshape(rows, frames, 1, attn.heads, -1) for t in (q, k, v))  # [B, F, S=1, H, D]
        out = self.core.attend(q, k, v, scale=attn.scale)
        out = out.reshape(rows, frames, -1).to(q.dtype)
        return temporal_attention_out(attn, out, hidden_states)


class ClipParallelStrategy(Strategy):
    name = "clip_parallel"

    def __init__(self, rope_policy: str | None = None):
        super().__init__()
        self.rope_policy = rope_policy or GLOBAL_ROPE_POLICY
        self.core: DualScope | None = None

    def install(self, model, mesh, plan, rank):
        # one core per job, shared by every patched attention module
        self.core = DualScope(mesh, plan, rank, native_frames=native_frames(model, plan))
        return super().install(model, mesh, plan, rank)

    def _install_wan(self, model, mesh, plan, rank):
        transformer = model.denoiser
        self._hooks.append(install_global_rope(transformer, plan.clips[rank].start))
        rekey = None if self.rope_policy == "true" else \
            WanGlobalRope(transformer.rope, self.rope_policy, plan.clip_parallel.local_halo, self.core.native_frames)
        for attn in model.self_attentions():
            self._set_processor(attn, WanDualScopeAttention(self.core, rekey))

    def _install_unet3d(self, model, mesh, plan, rank):
        self._patch_temporal_ops(model, mesh, plan)
        for attn in model.temporal_attentions():
            self._set_processor(attn, TemporalDualScopeAttention(self.core))

    def begin_step(self, t: float) -> None:
        self.core.set_timestep(t)
