"""`exact`: clip parallelism that reproduces the single-device result.

Wan: every op of a Wan block is per-token except self-attention, which mixes all frames. So
each rank runs its own clip of frames through the model, and only attn1 reaches out: it
computes Q/K/V for its tokens (RoPE at global frame positions), all-gathers K and V from every
rank, and attends its queries over the whole video's keys. Cross-attention, FFN, norms, the
timestep/text embeddings are untouched and local. Cost: one K/V all-gather per block per
transformer call.

UNet3D: spatial layers and text cross-attention are per frame. Three kinds of module mix
frames: temporal attention (attn1 and attn2 of every TransformerTemporalModel block, both
self-attention over the frames of one latent pixel) gets the same local-Q / gathered-K,V
processor; every TemporalConvLayer gets input halos; every frame-spanning GroupNorm gets
synchronised statistics (temporal_ops). Cost per UNet call: one K/V all-gather per temporal
attention, one halo exchange per temporal conv, one tiny statistics all-gather per such norm.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from clipmesh.worker.adapters.unet3d import temporal_attention_out, temporal_attention_qkv
from clipmesh.worker.adapters.wan import install_global_rope, self_attention_qkv
from clipmesh.worker.strategies.base import Strategy


class ExactSelfAttention:
    """Attention processor for one attn1: local queries, whole-video keys and values."""

    def __init__(self, mesh, clip_lengths: list[int], rank: int, backend=None):
        self.mesh, self.lengths, self.rank = mesh, clip_lengths, rank
        self._attention_backend = backend  # keep whatever backend the stock processor used

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("ExactSelfAttention is for self-attention without a mask (attn1)")
        q, k, v = self_attention_qkv(attn, hidden_states, rotary_emb)  # per token: local is exact

        # tokens are frame-major, so rank r holds lengths[r] * tokens_per_frame of them
        per_frame = hidden_states.shape[1] // self.lengths[self.rank]
        sizes = [n * per_frame for n in self.lengths]
        kv = self.mesh.all_gather_uneven(torch.cat([k, v], dim=-1), sizes, dim=1)  # one collective, not two
        k, v = (t.contiguous() for t in kv.chunk(2, dim=-1))

        out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class ExactTemporalAttention:
    """Attention processor for one UNet3D temporal self-attention: input [B*h*w, F_local, C];
    local queries, keys and values of the whole video (all-gathered along frames)."""

    def __init__(self, mesh, clip_lengths: list[int]):
        self.mesh, self.lengths = mesh, clip_lengths

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("ExactTemporalAttention is for temporal self-attention without a mask")
        q, k, v = temporal_attention_qkv(attn, hidden_states)  # per frame: local is exact
        kv = self.mesh.all_gather_uneven(torch.cat([k, v], dim=-1), self.lengths, dim=1)  # one collective
        k, v = kv.chunk(2, dim=-1)
        rows, head_dim = hidden_states.shape[0], k.shape[-1] // attn.heads
        q, k, v = (t.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(q.dtype)
        return temporal_attention_out(attn, out, hidden_states)


class ExactStrategy(Strategy):
    name = "exact"

    def _install_wan(self, model, mesh, plan, rank):
        lengths = [c.end - c.start for c in plan.clips]
        self._hooks.append(install_global_rope(model.denoiser, plan.clips[rank].start))
        for attn in model.self_attentions():
            backend = getattr(attn.processor, "_attention_backend", None)
            self._set_processor(attn, ExactSelfAttention(mesh, lengths, rank, backend))

    def _install_unet3d(self, model, mesh, plan, rank):
        lengths = [c.end - c.start for c in plan.clips]
        self._patch_temporal_ops(model, mesh, plan)
        for attn in model.temporal_attentions():
            self._set_processor(attn, ExactTemporalAttention(mesh, lengths))
