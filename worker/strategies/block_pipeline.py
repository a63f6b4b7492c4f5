"""`block_pipeline`: DualParal (ALGORITHMS.md section 2). The ranks split the transformer's
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
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from clipmesh.plan import frame_seed
from clipmesh.worker.adapters.wan import WanStages, apply_rope
from clipmesh.worker.memory import release_free_memory
from clipmesh.worker.noise import initial_noise
from clipmesh.worker.strategies.base import Strategy

WORK, DONE, CANCELLED = 1, 0, 2  # header kinds
PERMUTATION_STREAM = -1          # frame_seed index of the permutation generator: no frame has it


def block_ranges(num_latent: int, block_frames: int) -> Iterator[tuple[int, int]]:
    """Latent [start, end) of each block in order; endless when num_latent is 0 (unbounded)."""
    for start in itertools.count(0, block_frames):
        if num_latent and start >= num_latent:
            return
        yield start, min(start + block_frames, num_latent) if num_latent else start + block_frames


def first_output_frame(latent_start: int, temporal_stride: int) -> int:
    """Video frame of latent frame `latent_start`'s first frame (Wan's causal VAE: latent frame 0
    is one video frame, every later one `temporal_stride` frames)."""
    return 0 if latent_start == 0 else temporal_stride * (latent_start - 1) + 1


def coordinated_noise(seed: int, block_frames: int, context_frames: int, channels: int, h: int, w: int,
                      dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """Initial noise of block 0, 1, 2, ... [1, C, block_frames, h, w] (a shorter last block takes
    the first frames of its draw). The pool is the job's per-frame noise of frames
    [0, block_frames + c); a block never reuses the frames its predecessor ended with."""
    pool = initial_noise(seed, 0, block_frames + context_frames, channels, h, w, dtype)
    gen = torch.Generator("cpu").manual_seed(frame_seed(seed, PERMUTATION_STREAM))
    tail: list[int] = []
    while True:
        allowed = [i for i in range(block_frames + context_frames) if i not in tail]
        picks = [allowed[i] for i in torch.randperm(len(allowed), generator=gen)[:block_frames].tolist()]
        yield pool[:, :, picks]
        tail = picks[len(picks) - context_frames:] if context_frames else []


@dataclass(frozen=True)
class Item:
    """One block's step on its way through the stages (the header of a stage message)."""

    block: int
    step: int        # 0-based step this block is at
    context: int     # context frames prepended
    own: int         # the block's own latent frames
    first: bool      # first item of its iteration: the feature caches start empty

    def header(self, kind: int = WORK, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([kind, self.block, self.step, self.context, self.own, int(self.first)],
                            dtype=torch.int64, device=device)

    @staticmethod
    def parse(header: torch.Tensor) -> tuple[int, "Item"]:
        kind, block, step, context, own, first = header.tolist()
        return kind, Item(block, step, context, own, bool(first))


class FeatureCache:
    """What the self-attentions of one stage share: the item being run, its token layout, an
    iteration counter that empties every cache, and RoPE tables by frame count."""

    def __init__(self, stages: WanStages, context_frames: int, h: int, w: int):
        self.stages, self.context_frames, self.h, self.w = stages, context_frames, h, w
        self.tokens_per_frame = (h // stages.p_h) * (w // stages.p_w)
        self.item: Item | None = None
        self.iteration = 0
        self._ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, frames: int):
        if frames not in self._ropes:
            self._ropes[frames] = self.stages.rope(frames, self.h, self.w)
        return self._ropes[frames]


class FeatureCacheAttention:
    """Wan attn1 processor: WanAttnProcessor's self-attention plus the feature cache."""

    def __init__(self, shared: FeatureCache, backend=None):
        self.shared = shared
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None  # raw K/V of the last block's first frames
        self.iteration = -1
        self._attention_backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("FeatureCacheAttention is for self-attention without a mask (attn1)")
        shared, item = self.shared, self.shared.item
        if self.iteration != shared.iteration:
            self.kv, self.iteration = None, shared.iteration
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        n = shared.tokens_per_frame
        own_first = slice(item.context * n, (item.context + shared.context_frames) * n)
        keep = (k[:, own_first], v[:, own_first]) if shared.context_frames else None
        if self.kv is not None:  # the temporally next block's first frames, after our own
            k, v = torch.cat([k, self.kv[0]], dim=1), torch.cat([v, self.kv[1]], dim=1)
        self.kv = keep

        q, k = attn.norm_q(q), attn.norm_k(k)  # per token (RMS across heads): the cache may be raw
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        q = apply_rope(q, *rotary_emb)
        k = apply_rope(k, *(rotary_emb if k.shape[1] == q.shape[1] else shared.rope(k.shape[1] // n)))
        out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class QueuedBlock:
    """Rank 0's state of one block in the queue."""

    start: int                  # latent frames [start, end)
    end: int
    latents: torch.Tensor       # [1, C, end - start, h, w]
    scheduler: object           # its own multistep scheduler
    step: int = 0               # steps applied
    issued: int = 0             # steps sent through the stages (ahead of `step` while in flight)


class BlockPipelineStrategy(Strategy):
    name = "block_pipeline"

    def _install_wan(self, model, mesh, plan, rank):
        layers = [(r.start, r.end) for r in plan.layers]
        if len(layers) != plan.world_size or any(a[1] != b[0] for a, b in zip(layers, layers[1:])) \
                or layers[0][0] != 0 or layers[-1][1] != len(model.denoiser.blocks) \
                or any(end <= start for start, end in layers):
            raise ValueError(f"plan layers {layers} do not tile the model's {len(model.denoiser.blocks)} "
                             f"blocks over {plan.world_size} ranks")
        if plan.start_step:
            raise NotImplementedError("block_pipeline cannot resume at a step yet")
        self.layers = layers[rank]
        self.stages = WanStages(model.denoiser)
        _, h, w = model.latent_shape(plan.request.height, plan.request.width)
        self.cache = FeatureCache(self.stages, plan.block_pipeline.context_frames, h, w)
        for attn in model.self_attentions()[self.layers[0]:self.layers[1]]:
            self._set_processor(attn, FeatureCacheAttention(self.cache, getattr(attn.processor, "_attention_backend", None)))

    # -- the job --------------------------------------------------------------
    def render(self, model, plan, rank: int, mesh, on_step=None, should_stop=None, on_frames=None) -> None:
        """Run this rank's stage; on rank 0 every block that leaves the queue is decoded and
        handed to `on_frames` at once (RenderedFrames), so the video streams out."""
        from clipmesh.worker.render import RenderedFrames

        decoder = model.stream_decoder() if rank == 0 else None
        stride = model.pipe.vae_scale_factor_temporal

        def on_block(start: int, end: int, latents: torch.Tensor) -> None:
            frames = decoder.decode(latents)
            if on_frames:
                on_frames(RenderedFrames(first_frame=first_output_frame(start, stride), frames=frames))

        self.run(model, plan, rank, mesh, on_step, should_stop, on_block)

    @torch.no_grad()
    def run(self, model, plan, rank: int, mesh, on_step=None, should_stop=None,
            on_block: Callable[[int, int, torch.Tensor], None] | None = None) -> None:
        """This rank's part of the job; rank 0 calls on_block(start, end, final latents) for each
        block as it leaves the queue, in order."""
        if mesh.world_size != plan.world_size or mesh.rank != rank:
            raise ValueError(f"mesh is rank {mesh.rank}/{mesh.world_size}, plan says {rank}/{plan.world_size}")
        with self.install(model, mesh, plan, rank):
            self._prepare(model, plan, mesh)
            if rank == 0:
                self._lead(plan, on_step, should_stop, on_block)
            else:
                self._follow(on_step)

    def _prepare(self, model, plan, mesh) -> None:
        req = plan.request
        self.model, self.plan, self.mesh, self.req = model, plan, mesh, req
        cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
        self.text = cond if uncond is None else torch.cat([cond, uncond])  # CFG as one batch of 2
        scheduler = model.new_scheduler()
        scheduler.set_timesteps(req.num_inference_steps, device=model.device)
        self.timesteps = scheduler.timesteps
        self.channels, self.h, self.w = model.latent_shape(req.height, req.width)
        self.conditioning: dict[int, tuple] = {}
        self.sending: deque = deque()  # (work, tensor) pairs in flight
        steps = len(self.timesteps)
        # hidden states: header + data of two items; predictions: more than rank 0 ever leaves waiting
        self.send_window = 2 * steps + 4 if mesh.rank == mesh.world_size - 1 else 4
        opts = plan.block_pipeline
        dim = model.denoiser.config.num_attention_heads * model.denoiser.config.attention_head_dim
        tokens = (opts.block_frames + opts.context_frames) * self.cache.tokens_per_frame
        # ranks past 0 receive hidden states into one preallocated buffer: the largest message,
        # viewed at each message's size
        self.hidden_buf = (torch.empty(self.text.shape[0] * tokens * dim, dtype=model.denoiser.dtype, device=model.device)
                           if mesh.rank > 0 else None)
        self.dim = dim
        self.header_buf = torch.empty(6, dtype=torch.int64, device=mesh.device)  # NCCL sends device tensors only

    # -- one stage ----------------------------------------------------------------
    def _stage(self, item: Item, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's layers on one item: hidden [B, tokens, dim] -> the same."""
        if item.first:
            self.cache.iteration += 1
        self.cache.item = item
        if item.step not in self.conditioning:
            t = self.timesteps[item.step].expand(self.text.shape[0])
            self.conditioning[item.step] = self.stages.condition(t, self.text)
        _, proj, text = self.conditioning[item.step]
        rope = self.cache.rope(item.context + item.own)
        return self.stages.blocks(hidden, *self.layers, text, proj, rope)

    def _head(self, item: Item, hidden: torch.Tensor) -> torch.Tensor:
        """Last rank: output head, CFG, context dropped -> the block's prediction [1, C, own, h, w]."""
        temb = self.conditioning[item.step][0]
        out = self.stages.head(hidden, temb, item.context + item.own, self.h, self.w)
        pred = out[:1]
        if out.shape[0] == 2:  # WanPipeline's CFG: uncond + g * (cond - uncond)
            pred = out[1:] + self.req.guidance_scale * (pred - out[1:])
        return pred[:, :, item.context:].contiguous()

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send without waiting, keeping at most `send_window` messages in flight. A send completes
        once its receiver takes it (gloo reports nothing before wait()), so the window is what
        bounds memory. The ring cannot deadlock: the last rank's window is larger than what rank 0
        may leave unreceived (two iterations of predictions), so the last rank never waits, and
        every other rank waits only for the next stage, which always moves on."""
        self.sending.append((self.mesh.isend(tensor, dst), tensor))
        while len(self.sending) > self.send_window:
            self.sending.popleft()[0].wait()

    def _drain_sends(self) -> None:
        while self.sending:
            self.sending.popleft()[0].wait()

    def _forward(self, item: Item, hidden: torch.Tensor, kind: int = WORK) -> None:
        """Pass an item on: to the next stage, or (last rank) its prediction back to rank 0."""
        mesh = self.mesh
        if mesh.rank == mesh.world_size - 1:
            self._send(self._head(item, hidden), 0)
        else:
            self._send(item.header(kind, mesh.device), mesh.rank + 1)
            self._send(hidden.contiguous(), mesh.rank + 1)

    def _finish_item(self, on_step, item: Item, began: float, start: int) -> None:
        """Report the item; once per block (its last step) give freed memory back, so a long
        stream stays at the queue's footprint."""
        if item.step == len(self.timesteps) - 1:
            release_free_memory()
        self._report(on_step, item, began, start)

    def _report(self, on_step, item: Item, began: float, start: int) -> None:
        if on_step:
            from clipmesh.worker.render import StepReport

            sent, received, comm = self.mesh.take_stats()
            on_step(StepReport(step=item.step + 1, total=len(self.timesteps), seconds=time.perf_counter() - began,
                               bytes_sent=sent, bytes_received=received, comm_seconds=comm,
                               latent_start=start, latent_end=start + item.own, block=item.block))

    # -- rank 0: the queue ----------------------------------------------------------
    def _lead(self, plan, on_step, should_stop, on_block) -> None:
        from clipmesh.worker.render import Cancelled

        opts, steps, mesh = plan.block_pipeline, len(self.timesteps), self.mesh
        ranges = block_ranges(plan.num_latent_frames, opts.block_frames)
        noises = coordinated_noise(self.req.seed, opts.block_frames, opts.context_frames,
                                   self.channels, self.h, self.w)
        queue: dict[int, QueuedBlock] = {}
        finished_tail: torch.Tensor | None = None  # the last block that left: its last c frames
        in_flight: deque[Item] = deque()           # items whose prediction has not come back, in order
        local: deque[torch.Tensor] = deque()       # world size 1: predictions made here

        def receive_prediction(item: Item) -> torch.Tensor:
            # a fresh tensor: a scheduler may keep the model output it is given
            return mesh.recv(torch.empty((1, self.channels, item.own, self.h, self.w),
                                         dtype=self.model.denoiser.dtype, device=self.model.device), mesh.world_size - 1)

        def take_prediction() -> None:
            nonlocal finished_tail
            item = in_flight.popleft()
            block = queue[item.block]
            pred = local.popleft() if local else receive_prediction(item)
            block.latents = self.model.step(block.scheduler, pred, self.timesteps[item.step], block.latents)
            block.step += 1
            if block.step == steps:  # final: it leaves the queue
                del queue[item.block]
                finished_tail = block.latents[:, :, block.latents.shape[2] - opts.context_frames:]
                if on_block:
                    on_block(block.start, block.end, block.latents)

        for iteration in itertools.count():
            if should_stop and should_stop():
                if not local:  # let every message in the ring arrive before the stop
                    for item in in_flight:
                        receive_prediction(item)
                if mesh.world_size > 1:
                    self._send(Item(0, 0, 0, 0, False).header(CANCELLED, mesh.device), 1)
                self._drain_sends()
                raise Cancelled(f"cancelled at iteration {iteration}")
            span = next(ranges, None)
            if span is not None:  # a new block of pure noise enters at the tail
                scheduler = self.model.new_scheduler()
                scheduler.set_timesteps(steps, device=self.model.device)
                noise = next(noises)[:, :, : span[1] - span[0]].to(self.model.device)
                queue[iteration] = QueuedBlock(*span, noise * scheduler.init_noise_sigma, scheduler)
            active = sorted((j for j, block in queue.items() if block.issued < steps), reverse=True)
            if not active:
                while in_flight:
                    take_prediction()
                break
            for position, j in enumerate(active):  # tail -> head
                mesh.take_stats()  # an item's time and traffic include waiting for what it reads
                began = time.perf_counter()
                # this block reads its own latents and its predecessor's: wait for those steps only
                while any(item.block in (j, j - 1) for item in in_flight):
                    take_prediction()
                block = queue[j]
                if j - 1 in queue:
                    before = queue[j - 1].latents
                    context = before[:, :, before.shape[2] - opts.context_frames:]
                else:
                    context = finished_tail if j > 0 else None
                x = block.latents if context is None or context.shape[2] == 0 else torch.cat([context, block.latents], 2)
                item = Item(j, block.step, x.shape[2] - block.latents.shape[2], block.latents.shape[2], position == 0)
                hidden = self.stages.embed(x).repeat(self.text.shape[0], 1, 1)
                hidden = self._stage(item, hidden)
                in_flight.append(item)
                block.issued += 1
                if mesh.world_size == 1:
                    local.append(self._head(item, hidden))
                else:
                    self._forward(item, hidden)
                self._finish_item(on_step, item, began, block.start)
        if mesh.world_size > 1:
            self._send(Item(0, 0, 0, 0, False).header(DONE, mesh.device), 1)
        self._drain_sends()

    # -- ranks 1..N-1: stages ---------------------------------------------------------
    def _follow(self, on_step) -> None:
        from clipmesh.worker.render import Cancelled

        mesh, prev = self.mesh, self.mesh.rank - 1
        batch, per_frame = self.text.shape[0], self.cache.tokens_per_frame
        while True:
            mesh.take_stats()  # an item's time and traffic include waiting for the previous stage
            began = time.perf_counter()
            kind, item = Item.parse(mesh.recv(self.header_buf, prev))
            if kind != WORK:
                if mesh.rank < mesh.world_size - 1:
                    self._send(item.header(kind, mesh.device), mesh.rank + 1)
                self._drain_sends()
                if kind == CANCELLED:
                    raise Cancelled("cancelled by rank 0")
                return
            tokens = (item.context + item.own) * per_frame
            hidden = mesh.recv(self.hidden_buf[: batch * tokens * self.dim].view(batch, tokens, self.dim), prev)
            self._forward(item, self._stage(item, hidden))
            self._finish_item(on_step, item, began, item.block * self.plan.block_pipeline.block_frames)
