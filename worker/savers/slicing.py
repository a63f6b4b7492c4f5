"""The feature slicer with operator grouping (Streamlined Inference, docs/algorithms.md section 3): exact.

A group of operators that is independent along some axis runs chunk by chunk: each chunk goes
through the *whole* chain before the next one starts, so the chain's full-size intermediates
(a resnet's temporaries, a feed-forward's 4x-wide hidden layer) exist for one chunk at a time;
only the group's input and output are full size, and each chunk's output is written into the
output as it comes. Which groups, of which kind, is the adapter's data (`slice_groups()`,
adapters/base.py); here is what each kind does:

- PER_FRAME (UNet resnets, spatial transformers, down/upsamplers, 2D convs): the forward in
  effect (whatever a strategy left there) per chunk of dim-0 rows (batch*frames), every tensor
  argument with those rows (temb, the per-frame text) sliced alike. Such a group holds no
  frame-mixing module (checked at install), so it holds no collective either, and the chunks
  may follow the rank's own row count.
- PER_POSITION (UNet3D's TransformerTemporalModel, AnimateDiff's motion modules): its forward
  op for op, with the GroupNorm (spanning every frame and position, possibly synchronised over
  the ranks by the strategy: the module's own `norm` is called) on the whole input, then
  proj_in -> transformer blocks -> proj_out per chunk of the B*h*w latent pixels. The blocks'
  temporal attentions carry the strategy's collectives, so the chunks are cut from B*h*w,
  which is the same on every rank (never from the frames, which differ between clips): every
  rank makes the same collectives in the same order.
- PER_TOKEN (a WanTransformerBlock): its forward op for op (diffusers' transformer_wan.py),
  attn1 (the strategy's processor, which needs all of this rank's tokens) on all tokens, then
  norm2 -> attn2 -> residual -> norm3 -> FFN -> residual per chunk of tokens, the per-token
  modulation (Wan 2.2's [B, tokens, 6, dim] timestep) sliced alike. The chunked chain holds no
  frame-mixing module (checked), so the chunks may follow this rank's token count.

Every chunk count is slice_chunks, fewer where chunks would be under MIN_CHUNK_ROWS rows; chunks
are split_clips' (the first ones take the remainder). Everything is installed through the job's
Patches, after the strategy's patches, and restored after the job. A group whose per-chunk
modules carry a stateful diffusers hook (a step cache installed after us that takes every call
of a module for a step: TaylorSeer's forecasts of Wan's attn2 and FFN) runs in one chunk.
Temporal convs stay whole: their norms span frames and positions and they carry the
strategy's halo exchange. Self-attention is the strategy's and runs whole: its processors run
SDPA's fused kernels, which never hold the attention matrix, but their q, k, v (and gathered
keys and values) are full size, so with the FFN sliced, attn1 bounds a Wan block's peak.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput
from diffusers.utils import BaseOutput

from clipmesh.plan import split_clips
from clipmesh.worker.adapters.base import PER_FRAME, PER_POSITION, PER_TOKEN


# Rows a chunk has at least: a GEMM of fewer rows takes another kernel on CPU (one that rounds
# differently), and chunks that small save no memory worth having.
MIN_CHUNK_ROWS = 4


def spans(rows: int, chunks: int) -> list[tuple[int, int]]:
    """[a, b) of contiguous chunks of `rows`: `chunks` of them, fewer where a chunk would have
    fewer than MIN_CHUNK_ROWS rows; the first ones one longer."""
    return split_clips(rows, max(1, min(chunks, rows // MIN_CHUNK_ROWS))) if rows else [(0, 0)]


def _leaves(out):
    """(the tensors of a module's output, a function that makes the same kind of output of others)."""
    if torch.is_tensor(out):
        return [out], lambda leaves: leaves[0]
    if isinstance(out, BaseOutput):
        keys = list(out.keys())
        return [out[k] for k in keys], lambda leaves: type(out)(**dict(zip(keys, leaves)))
    if isinstance(out, tuple) and all(torch.is_tensor(t) for t in out):
        return list(out), tuple
    raise TypeError(f"a sliced module returned {type(out).__name__}, not tensors")


def run_chunks(run, rows: int, chunks: int, dim: int = 0, out=None):
    """run(a, b) for every chunk of `rows` along `dim`, each output copied into its place in one
    output as it comes (made from the first chunk's, unless `out`, a tensor, is given)."""
    cuts = spans(rows, chunks)
    if len(cuts) == 1:
        return run(0, rows)
    whole, make = None, None
    for a, b in cuts:
        pieces, rebuild = _leaves(run(a, b))
        if whole is None:
            make = rebuild
            whole = [out] if out is not None else [
                p.new_empty(p.shape[:dim] + (rows,) + p.shape[dim + 1:]) for p in pieces]
        for target, piece in zip(whole, pieces):
            target.narrow(dim, a, b - a).copy_(piece)
        del pieces
    return make(whole)


def _cut(value, rows: int, a: int, b: int, dim: int = 0):
    """value[a:b] along `dim` where it is a tensor with `rows` there; anything else as it is."""
    if torch.is_tensor(value) and value.dim() > dim and value.shape[dim] == rows:
        return value.narrow(dim, a, b - a)
    return value


def _stateful_hook(module) -> bool:
    """Whether a stateful diffusers hook sits on `module` (a step cache's)."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and any(hook._is_stateful for hook in registry.hooks.values())


class Chunked:
    """Base of a slice group's forward: `module` in `slice_chunks` chunks (fewer: spans)."""

    replaces = True       # the stock forward, redone op for op (False: wraps the forward in effect)
    holds_mixers = False  # True: the chunks are cut from an axis every rank has the same size of

    def __init__(self, module, slice_chunks: int):
        self.module, self.slice_chunks = module, slice_chunks
        self._chunks: int | None = None

    def per_chunk(self) -> list:
        """The modules run once per chunk (without holds_mixers: none of them mixes frames)."""
        raise NotImplementedError

    @property
    def chunks(self) -> int:
        """slice_chunks, or 1 where a module run per chunk carries a stateful diffusers hook: a step
        cache that takes each call for a step (TaylorSeer's forecasts of attn2 and the FFN). Decided
        at the first call, when the job's patches are all in."""
        if self._chunks is None:
            hooked = any(_stateful_hook(m) for part in self.per_chunk() for m in part.modules() if m is not self.module)
            self._chunks = 1 if hooked else self.slice_chunks
        return self._chunks


class FrameChunks(Chunked):
    """A PER_FRAME module's forward: the forward in effect before (`inner`) per chunk of rows."""

    replaces = False

    def __init__(self, module, slice_chunks: int):
        super().__init__(module, slice_chunks)
        self.inner = module.forward

    def per_chunk(self) -> list:
        return [self.module]  # all of it: the chunks follow this rank's own rows

    def __call__(self, *args, **kwargs):
        x = next(v for v in (*args, *kwargs.values()) if torch.is_tensor(v))
        rows = x.shape[0]

        def run(a, b):
            return self.inner(*(_cut(v, rows, a, b) for v in args),
                              **{k: _cut(v, rows, a, b) for k, v in kwargs.items()})

        return run_chunks(run, rows, self.chunks)


class PositionChunks(Chunked):
    """A temporal transformer's forward (TransformerTemporalModel.forward, op for op), the norm
    on the whole input, proj_in -> blocks -> proj_out per chunk of the B*h*w latent pixels."""

    holds_mixers = True  # B*h*w is the same on every rank

    def __init__(self, tt, slice_chunks: int):
        super().__init__(tt, slice_chunks)
        self.wraps_output = "return_dict" in inspect.signature(type(tt).forward).parameters

    def per_chunk(self) -> list:
        return [self.module.proj_in, *self.module.transformer_blocks, self.module.proj_out]

    def __call__(self, hidden_states, encoder_hidden_states=None, timestep=None, class_labels=None, num_frames=1,
                 cross_attention_kwargs=None, return_dict=True):
        tt = self.module
        batch_frames, channel, height, width = hidden_states.shape
        batch_size = batch_frames // num_frames
        x = hidden_states[None, :].reshape(batch_size, num_frames, channel, height, width).permute(0, 2, 1, 3, 4)
        x = tt.norm(x)  # the whole video's statistics (the strategy's norm)
        x = x.permute(0, 3, 4, 2, 1).reshape(batch_size * height * width, num_frames, channel)
        rows = x.shape[0]

        def run(a, b):
            y = tt.proj_in(x[a:b])
            for block in tt.transformer_blocks:
                y = block(y, encoder_hidden_states=_cut(encoder_hidden_states, rows, a, b), timestep=timestep,
                          cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)
            return tt.proj_out(y)

        x = run_chunks(run, rows, self.chunks)  # the normed input goes, proj_out's output comes
        x = x[None, None, :].reshape(batch_size, height, width, num_frames, channel).permute(0, 3, 4, 1, 2).contiguous()
        output = x.reshape(batch_frames, channel, height, width) + hidden_states
        if not self.wraps_output:
            return output
        return TransformerTemporalModelOutput(sample=output) if return_dict else (output,)


class TokenChunks(Chunked):
    """A WanTransformerBlock's forward (op for op): attn1 on all tokens, the rest per chunk of tokens."""

    def per_chunk(self) -> list:
        return [self.module.norm2, self.module.attn2, self.module.norm3, self.module.ffn]

    def __call__(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        blk = self.module
        if temb.ndim == 4:  # [B, tokens, 6, dim] (Wan 2.2 TI2V): a modulation per token, [B, tokens, dim] each
            mods = [m.squeeze(2) for m in (blk.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
        else:  # [B, 6, dim]: [B, 1, dim] each
            mods = (blk.scale_shift_table + temb.float()).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods

        # 1. Self-attention, on every token of this rank
        norm_hidden_states = (blk.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = blk.attn1(norm_hidden_states, None, None, rotary_emb)
        del norm_hidden_states
        hidden = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
        del attn_output
        tokens = hidden.shape[1]

        def run(a, b):
            h = hidden[:, a:b]
            c_shift, c_scale, c_gate = (_cut(m, tokens, a, b, dim=1) for m in (c_shift_msa, c_scale_msa, c_gate_msa))
            # 2. Cross-attention
            norm_h = blk.norm2(h.float()).type_as(h)
            h = h + blk.attn2(norm_h, encoder_hidden_states, None, None)
            # 3. Feed-forward
            norm_h = (blk.norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h)
            ff_output = blk.ffn(norm_h)
            return (h.float() + ff_output.float() * c_gate).type_as(h)

        # `hidden` is ours (made above): each chunk reads its tokens before it overwrites them
        fresh = hidden is not hidden_states and not torch.is_grad_enabled()
        return run_chunks(run, tokens, self.chunks, dim=1, out=hidden if fresh else None)


SLICERS = {PER_FRAME: FrameChunks, PER_POSITION: PositionChunks, PER_TOKEN: TokenChunks}  # kind -> its forward


def install_slicing(job, patches, chunks: int) -> None:
    """Run every slice group of the job's model in `chunks` chunks (through `patches`)."""
    model = job.model
    mixers = {id(mixer.module) for mixer in model.frame_mixers()}
    for group in model.slice_groups():
        if group.kind not in SLICERS:
            raise NotImplementedError(f"the feature slicer has no {group.kind!r} groups "
                                      f"({type(group.module).__name__} of {model.family})")
        module = group.module
        slicer = SLICERS[group.kind](module, chunks)
        if not slicer.holds_mixers and any(id(m) in mixers for part in slicer.per_chunk() for m in part.modules()):
            raise ValueError(f"{group.kind} {type(module).__name__} holds a frame-mixing module: its chunks "
                             "could differ between ranks")
        if slicer.replaces and "forward" in module.__dict__:
            raise NotImplementedError(f"{type(module).__name__}'s forward is already patched; {group.kind} slicing "
                                      "would run the stock one instead")
        patches.replace_forward(module, slicer)
