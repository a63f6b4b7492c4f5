"""Wan's rotary positions, as clip-split strategies need them: the stock rope module asked for
global frame positions, Wan's rotation itself, and how global frames are presented to a query
frame under dual-scope attention (a temporal re-rotation of their keys)."""

from __future__ import annotations

import torch

from clipmesh.specs import GLOBAL_ROPE_POLICIES


def rope_rows(transformer, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock rope module's (cos, sin) for a latent video of `frames` frames of height x width:
    rope reads only the shape, so it is asked with a shape-only meta tensor (the module's
    forward is called directly, bypassing hooks, so a global-position hook does not apply)."""
    stand_in = torch.empty((1, transformer.config.in_channels, frames, height, width), device="meta")
    return type(transformer.rope).forward(transformer.rope, stand_in)


def global_positions_hook(transformer, frame_start: int):
    """A forward hook for `transformer.rope` that returns the RoPE of global latent frames
    [frame_start, frame_start+F) for a local clip of F frames, instead of [0, F).

    It asks the stock rope module for a video of frame_start+F frames and keeps the last F
    frames' rows, so the frequencies are the module's own, bit for bit. Rows are frame-major."""
    p_t, p_h, p_w = transformer.config.patch_size
    if p_t != 1:
        raise NotImplementedError(f"clip-split Wan needs temporal patch size 1, this model has {p_t}")
    limit = transformer.rope.max_seq_len

    def hook(module, args, output):
        b, c, f, h, w = args[0].shape
        if frame_start + f > limit:
            raise ValueError(f"latent frames up to {frame_start + f} exceed the model's RoPE table ({limit})")
        cos, sin = rope_rows(transformer, frame_start + f, h, w)
        skip = frame_start * (h // p_h) * (w // p_w)
        return cos[:, skip:], sin[:, skip:]

    return hook


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved-pair rotation, op for op as in diffusers' WanAttnProcessor.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def presented_positions(policy: str, query_frames: torch.Tensor, global_frames: torch.Tensor, halo: int,
                        native: int) -> torch.Tensor:
    """[C, G] temporal positions of the global frames as each query frame sees them, under one of
    GLOBAL_ROPE_POLICIES (clip_parallel.global_rope; each is described where specs defines it)."""
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
