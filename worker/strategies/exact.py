"""`exact`: clip parallelism that reproduces the single-device result.

Every op of a Wan block is per-token except self-attention, which mixes all frames. So each
rank runs its own clip of frames through the model, and only attn1 reaches out: it computes
Q/K/V for its tokens (RoPE at global frame positions), all-gathers K and V from every rank,
and attends its queries over the whole video's keys. Cross-attention, FFN, norms, the
timestep/text embeddings are untouched and local. Cost: one K/V all-gather per block per
transformer call.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from clipmesh.worker.adapters.wan import install_global_rope
from clipmesh.worker.strategies.base import Strategy


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved-pair rotation, op for op as in diffusers' WanAttnProcessor.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class ExactSelfAttention:
    """Attention processor for one attn1: local queries, whole-video keys and values."""

    def __init__(self, mesh, clip_lengths: list[int], rank: int, backend=None):
        self.mesh, self.lengths, self.rank = mesh, clip_lengths, rank
        self._attention_backend = backend  # keep whatever backend the stock processor used

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("ExactSelfAttention is for self-attention without a mask (attn1)")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMSNorm across heads: per token, so local is exact
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # [B, S, H, D]
        if rotary_emb is not None:
            q, k = _apply_rope(q, *rotary_emb), _apply_rope(k, *rotary_emb)

        # tokens are frame-major, so rank r holds lengths[r] * tokens_per_frame of them
        per_frame = hidden_states.shape[1] // self.lengths[self.rank]
        sizes = [n * per_frame for n in self.lengths]
        kv = self.mesh.all_gather_uneven(torch.cat([k, v], dim=-1), sizes, dim=1)  # one collective, not two
        k, v = (t.contiguous() for t in kv.chunk(2, dim=-1))

        out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class ExactStrategy(Strategy):
    name = "exact"

    def __init__(self):
        self._saved: list[tuple[torch.nn.Module, object]] = []
        self._hooks: list = []

    def install(self, model, mesh, plan, rank):
        if getattr(model.pipe, "transformer_2", None) is not None:
            raise NotImplementedError("two-transformer Wan (2.2 A14B) is not supported by 'exact' yet")
        clips = [(c.start, c.end) for c in plan.clips]
        lengths = [end - start for start, end in clips]
        try:
            self._hooks.append(install_global_rope(model.denoiser, clips[rank][0]))
            for attn in model.self_attentions():
                stock = attn.processor
                self._saved.append((attn, stock))
                attn.set_processor(ExactSelfAttention(mesh, lengths, rank, getattr(stock, "_attention_backend", None)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self):
        for attn, stock in reversed(self._saved):
            attn.set_processor(stock)
        for handle in self._hooks:
            handle.remove()
        self._saved, self._hooks = [], []
