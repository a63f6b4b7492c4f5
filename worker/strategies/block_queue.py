"""block_pipeline's schedule (strategies/block_pipeline.py has the method): rank 0 keeps the
queue of video blocks and sends each item through the stages; ranks 1..N-1 run the items their
previous stage sends them. Both are Schedules the runner drives (render.py): `next()` is the
next item, `run(item)` this rank's layers on it. Finished blocks are decoded by the ranks in
turn, DECODE_RUN blocks at a time: rank 0 sends them down the ring (DECODE messages; a run's
first block carries the video's last frames before it as the causal VAE's warm-up), so the
decode is spread over the ranks and off rank 0's critical path, and each rank decodes in a
thread of its own (render.Decoder); the coordinator puts the pieces in order.

Timing: the runner starts an item's clock before `next()`, so an item's time and traffic include
waiting for what it reads (a follower's header, rank 0's predictions of the blocks it reads).

Checkpoints: rank 0 holds all the state (followers keep only per-iteration caches), so at an
iteration boundary every `checkpoint_every` iterations it waits for the predictions in flight
and writes the queue: each block's latents, scheduler and step, the tails the next blocks and
the decode read, how many blocks have entered, and the last finished blocks (RECENT_SLACK more
than an interval: those whose frames may still be on their way to the coordinator). A resumed
queue starts at that boundary and first hands out again the finished blocks whose frames the
video lacks (plan.frames_in_video), so the stream has no gap and no repeat.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from clipmesh.plan import block_ranges, num_output_frames
from clipmesh.specs import DECODE_RUN, decoding_rank
from clipmesh.worker import checkpoint
from clipmesh.worker.job import Cancelled, FinishedLatents, Work
from clipmesh.worker.memory import release_free_memory
from clipmesh.worker.noise import coordinated_noise
from clipmesh.worker.strategies.base import Schedule

WORK, DONE, CANCELLED, DECODE = 1, 0, 2, 3  # header kinds
log = logging.getLogger("clipmesh.worker")
# finished blocks a checkpoint keeps beyond one interval, per rank: a decode run waiting its turn,
# the decoder's backlog and the uploads behind it
RECENT_SLACK = DECODE_RUN + 2


def last_frames(pieces: list[torch.Tensor | None], n: int) -> torch.Tensor | None:
    """The last `n` latent frames of `pieces` joined in order (None entries skipped): a causal
    VAE's warm-up. None when there is nothing or n is 0."""
    pieces = [p for p in pieces if p is not None]
    if not n or not pieces:
        return None
    joined = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return joined[:, :, max(0, joined.shape[2] - n):]


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


@dataclass
class QueuedBlock:
    """Rank 0's state of one block in the queue."""

    start: int                  # latent frames [start, end)
    end: int
    latents: torch.Tensor       # [1, C, end - start, h, w]
    scheduler: object           # its own multistep scheduler
    step: int = 0               # steps applied
    issued: int = 0             # steps sent through the stages (ahead of `step` while in flight)


class _Stage(Schedule):
    """One rank's stage: its layers, the message ring, and (last rank) the output head."""

    def __init__(self, job, denoising, stages, cache):
        self.job, self.mesh, self.d, self.experts, self.cache = job, job.mesh, denoising, stages, cache
        self.layers = job.layers
        if job.cfg is not None:  # cfg_parallel: this branch's pipeline runs its own text; the heads pair up
            self.text = (denoising.cond, denoising.uncond)[job.branch]
        else:
            self.text = denoising.cond if denoising.uncond is None else torch.cat([denoising.cond, denoising.uncond])
        embeds = denoising.image.embeds if denoising.image is not None else None  # I2V: beside the text, per CFG row
        self.image_embeds = None if embeds is None else embeds.expand(self.text.shape[0], -1, -1)
        self.total = len(denoising.timesteps)
        self.last = job.rank == job.mesh.world_size - 1  # the last stage runs the head
        self.conditioning: dict[int, tuple] = {}
        self.sending: deque = deque()  # (work, tensor) pairs in flight
        # hidden states: header + data of two items; predictions: more than rank 0 ever leaves waiting
        self.send_window = 2 * self.total + 4 if self.last else 4
        self.header_buf = torch.empty(6, dtype=torch.int64, device=self.mesh.device)  # NCCL sends device tensors
        self.block_frames = job.plan.block_pipeline.block_frames
        self.finished: list[FinishedLatents] = []  # blocks this rank decodes

    def agree_stop(self, asked: bool) -> bool:
        return False  # a stop reaches the stages as a header from rank 0

    def take_finished(self) -> list[FinishedLatents]:
        finished, self.finished = self.finished, []
        return finished

    def stages(self, step: int):
        """The WanStages of the expert that denoises at `step` (one for most models)."""
        return self.experts[self.job.model.expert(self.d.timesteps[step])]

    def _stage(self, item: Item, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's layers on one item: hidden [B, tokens, dim] -> the same."""
        self.cache.item = item
        key = self._conditioning_key(item)
        if key not in self.conditioning:
            model, frames = self.job.model, item.context + item.own
            image = self.d.image_part(0, 1) if item.block == 0 else None  # block 0 starts the video
            t = model.timestep(self.d.timesteps[item.step], self.text.shape[0], frames, self.cache.h, self.cache.w, image)
            self.conditioning[key] = self.stages(item.step).condition(t, self.text, self.image_embeds)
        _, proj, text = self.conditioning[key]
        rope = self.cache.rope(item.context + item.own)
        return self.stages(item.step).blocks(hidden, *self.layers, text, proj, rope)

    def _conditioning_key(self, item: Item):
        """A step's conditioning is the same for every block, unless timesteps are per token (TI2V):
        then it depends on the item's frames and on whether it holds the video's first frame."""
        if self.job.model.expands_timesteps:
            return item.step, item.context + item.own, item.block == 0
        return item.step

    def _head(self, item: Item, hidden: torch.Tensor) -> torch.Tensor:
        """Last rank: output head, CFG, context dropped -> the block's prediction [1, C, own, h, w]."""
        temb = self.conditioning[self._conditioning_key(item)][0]
        out = self.stages(item.step).head(hidden, temb, item.context + item.own, self.cache.h, self.cache.w)
        guidance = self.d.guidance_at(self.d.timesteps[item.step])
        if self.job.cfg is not None:  # the other branch's last stage has the other half, for the same item
            pred = self.d.combine_branches(out, guidance)
        elif out.shape[0] == 2:  # WanPipeline's CFG: uncond + g * (cond - uncond)
            pred = out[1:] + guidance * (out[:1] - out[1:])
        else:
            pred = out
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

    def _pass_on(self, item: Item, hidden: torch.Tensor) -> torch.Tensor | None:
        """After this rank's layers: to the next stage; or (last rank) the prediction, sent back
        to rank 0, or returned where rank 0 is the last rank itself."""
        if not self.last:
            self._send(item.header(WORK, self.mesh.device), self.mesh.rank + 1)
            self._send(hidden.contiguous(), self.mesh.rank + 1)
            return None
        pred = self._head(item, hidden)
        if self.mesh.rank == 0:
            return pred
        self._send(pred, 0)
        return None

    def _signal(self, kind: int) -> None:
        """Pass DONE or CANCELLED down the ring, then let every send arrive."""
        if not self.last:
            self._send(Item(0, 0, 0, 0, False).header(kind, self.mesh.device), self.mesh.rank + 1)
        self._drain_sends()

    @staticmethod
    def _work(item: Item, t, start: int) -> Work:
        return Work(item.step, t, start, start + item.own, fresh=item.first, block=item.block)

    def _done_with(self, item: Item) -> None:
        if item.step == self.total - 1:  # once per block: freed memory back, so a stream stays flat
            release_free_memory()


class BlockQueue(_Stage):
    """Rank 0: the queue. Each iteration a new block enters and every queued block advances one
    step, tail -> head; the head block leaves after its last step."""

    def __init__(self, job, denoising, stages, cache, resume: list[bytes] | None = None):
        super().__init__(job, denoising, stages, cache)
        opts, (self.channels, self.h, self.w) = job.plan.block_pipeline, job.model.latent_shape(
            job.request.height, job.request.width)
        self.context_frames = opts.context_frames
        self.ranges = block_ranges(job.plan.num_latent_frames, opts.block_frames)
        self.noises = coordinated_noise(job.request.seed, opts.block_frames, opts.context_frames,
                                        self.channels, self.h, self.w)
        self.queue: dict[int, QueuedBlock] = {}
        self.finished_tail: torch.Tensor | None = None  # the last block that left: its last c frames
        self.in_flight: deque[Item] = deque()          # items whose prediction has not come back, in order
        self.local: deque[torch.Tensor] = deque()      # predictions made here (rank 0 is the last stage)
        self.pending: deque[Item] = deque()            # the rest of this iteration's items
        self.video_tail: torch.Tensor | None = None    # the finished video's last latent frames: a decode's warm-up
        self.iteration, self.entered, self.done = 0, 0, False
        # the last finished blocks a checkpoint keeps, and the decode warm-up before the first of them
        keep = job.plan.checkpoint_every + RECENT_SLACK * job.mesh.world_size if job.plan.checkpoint_every else 0
        self.recent: deque[FinishedLatents] = deque(maxlen=keep)
        self.recent_before: torch.Tensor | None = None
        self.new_run = False  # the next hand-out opens a decode stream (after a resume)
        if resume:
            self._resume(checkpoint.loads(resume[0]))

    def agree_stop(self, asked: bool) -> bool:
        """Stops only between iterations: every message in the ring arrives, then CANCELLED."""
        if not asked or self.pending or self.done:
            return False
        while self.in_flight and not self.local:
            self._receive(self.in_flight.popleft())
        self._signal(CANCELLED)
        return True

    def next(self) -> Work | None:
        if not self.pending and not self._start_iteration():
            while self.in_flight:
                self._take_prediction()
            self._signal(DONE)
            self.done = True
            return None
        item = self.pending.popleft()
        return self._work(item, self.d.timesteps[item.step], self.queue[item.block].start)

    def _start_iteration(self) -> bool:
        """A new block of pure noise enters at the tail; the iteration's items, tail -> head."""
        span = next(self.ranges, None)
        if span is not None:
            scheduler = self.d.new_scheduler()
            noise = next(self.noises)[:, :, : span[1] - span[0]].to(self.job.model.device)
            self.queue[self.iteration] = QueuedBlock(*span, noise * scheduler.init_noise_sigma, scheduler)
            self.entered += 1
        self.iteration += 1
        active = sorted((j for j, block in self.queue.items() if block.issued < self.total), reverse=True)
        for position, j in enumerate(active):  # the context is known once the predecessor is waited for
            block = self.queue[j]
            self.pending.append(Item(j, block.issued, 0, block.latents.shape[2], position == 0))
            block.issued += 1
        return bool(active)

    def run(self, work: Work) -> None:
        j = work.block
        # this block reads its own latents and its predecessor's: wait for those steps only
        while any(item.block in (j, j - 1) for item in self.in_flight):
            self._take_prediction()
        block = self.queue[j]
        before = self.queue[j - 1].latents if j - 1 in self.queue else self.finished_tail
        item = Item(j, work.step, 0, block.latents.shape[2], work.fresh)
        x = block.latents
        if j > 0 and self.context_frames and before is not None:
            context = before[:, :, before.shape[2] - self.context_frames:]
            x, item = torch.cat([context, x], 2), Item(j, work.step, context.shape[2], item.own, item.first)
        image = self.d.image_part(block.start - item.context, block.end)
        hidden = self.stages(work.step).embed(x, image).repeat(self.text.shape[0], 1, 1)
        pred = self._pass_on(item, self._stage(item, hidden))
        self.in_flight.append(item)
        if pred is not None:
            self.local.append(pred)
        self._done_with(item)

    def _receive(self, item: Item) -> torch.Tensor:
        # a fresh tensor: a scheduler may keep the model output it is given
        return self.mesh.recv(torch.empty((1, self.channels, item.own, self.h, self.w), dtype=self.job.model.denoiser.dtype,
                                          device=self.job.model.device), self.mesh.world_size - 1)

    def _take_prediction(self) -> None:
        item = self.in_flight.popleft()
        block = self.queue[item.block]
        pred = self.local.popleft() if self.local else self._receive(item)
        block.latents = self.job.model.step(block.scheduler, pred, self.d.timesteps[item.step], block.latents)
        block.step += 1
        if block.step == self.total:  # final: it leaves the queue
            del self.queue[item.block]
            image = self.d.image_part(block.start, block.end)
            if image is not None:  # TI2V: the first frame is the image's
                block.latents = image.hold(block.latents)
            self.finished_tail = block.latents[:, :, block.latents.shape[2] - self.context_frames:]
            piece = FinishedLatents(block.start, block.end, block.latents)
            self._remember(piece)
            self._hand_out(item.block, piece)

    # -- checkpoints ---------------------------------------------------------------
    def _remember(self, piece: FinishedLatents) -> None:
        if not self.recent.maxlen:
            return
        if len(self.recent) == self.recent.maxlen:  # the oldest goes; its frames become the warm-up before
            self.recent_before = last_frames([self.recent_before, self.recent[0].latents],
                                             self.job.model.decode_lookback)
        self.recent.append(piece)

    def checkpoint(self, every: int) -> checkpoint.Part | None:
        """At an iteration boundary every `every` iterations: the whole queue, once the predictions
        in flight are in (so every block's latents and scheduler are current)."""
        if self.pending or self.done or not self.iteration or self.iteration % every:
            return None
        while self.in_flight:
            self._take_prediction()
        blocks = [dict(j=j, start=b.start, end=b.end, latents=b.latents, step=b.step,
                       scheduler=checkpoint.scheduler_state(b.scheduler)) for j, b in self.queue.items()]
        state = dict(iteration=self.iteration, entered=self.entered, blocks=blocks, finished_tail=self.finished_tail,
                     video_tail=self.video_tail, recent=[(p.start, p.end, p.latents) for p in self.recent],
                     recent_before=self.recent_before)
        return checkpoint.Part(self.iteration, 0, 1, checkpoint.dumps(state))

    def _resume(self, state: dict) -> None:
        """The queue as the checkpoint left it; the finished blocks whose frames the video lacks are
        handed out again first. Where such a block is older than the checkpoint keeps, the queue
        starts from noise instead (the frames the video has are not uploaded again either way)."""
        device, stride = self.job.model.device, self.job.model.temporal_stride
        frames_upto = lambda latent: num_output_frames(latent, stride) if latent else 0  # noqa: E731
        have = self.job.plan.frames_in_video
        recent = [FinishedLatents(s, e, x.to(device)) for s, e, x in state["recent"]]
        finished_end = min((b["start"] for b in state["blocks"]), default=recent[-1].end if recent else 0)
        kept_from = recent[0].start if recent else finished_end
        if frames_upto(kept_from) > have:
            log.warning("checkpoint at iteration %d keeps no blocks before latent frame %d and the video has "
                        "%d frames: starting from noise", state["iteration"], kept_from, have)
            return
        missing = [p for p in recent if frames_upto(p.end) > have]
        self.iteration, self.entered = state["iteration"], state["entered"]
        for _ in range(self.entered):  # the blocks and noise already drawn
            next(self.ranges)
            next(self.noises)
        for b in state["blocks"]:
            scheduler = self.d.new_scheduler()
            checkpoint.set_scheduler_state(scheduler, b["scheduler"], device)
            self.queue[b["j"]] = QueuedBlock(b["start"], b["end"], b["latents"].to(device), scheduler, b["step"],
                                             b["step"])
        self.finished_tail = None if state["finished_tail"] is None else state["finished_tail"].to(device)
        self.recent.extend(recent)
        self.recent_before = state["recent_before"]
        self.video_tail = None if state["video_tail"] is None else state["video_tail"].to(device)
        if missing:  # their decode warms up on the frames before the first of them
            before = [None if self.recent_before is None else self.recent_before.to(device)]
            self.video_tail = last_frames(before + [p.latents for p in recent if p.end <= missing[0].start],
                                          self.job.model.decode_lookback)
        self.new_run = True  # the next hand-out opens a decode stream (with the warm-up, if any)
        for piece in missing:
            self._hand_out(piece.start // self.block_frames, piece)

    def _hand_out(self, j: int, piece: FinishedLatents) -> None:
        """Runs of DECODE_RUN blocks are decoded by the ranks in turn (run k on rank k mod N: the
        decode off rank 0's critical path); a run's first block carries the finished video's
        last frames as the causal VAE's warm-up, the others continue its decode stream. A DECODE
        message down the ring takes a block to its rank."""
        lookback, starts_run = self.job.model.decode_lookback, j % DECODE_RUN == 0 or self.new_run
        self.new_run = False
        if lookback:
            tail, self.video_tail = self.video_tail, last_frames([self.video_tail, piece.latents], lookback)
            piece = FinishedLatents(piece.start, piece.end, piece.latents, tail if starts_run else None)
        target = decoding_rank(self.job.plan, piece.start)
        if target == 0:
            self.finished.append(piece)
            return
        before = piece.before if piece.before is not None else piece.latents[:, :, :0]
        payload = torch.cat([before, piece.latents], dim=2).float().contiguous()
        # `first` says whether a warm-up (possibly empty: the video's start) opens a new stream
        header = Item(j, target, before.shape[2], piece.latents.shape[2], piece.before is not None)
        self._send(header.header(DECODE, self.mesh.device), 1)
        self._send(payload, 1)


class StageFollower(_Stage):
    """Ranks 1..N-1: run whatever the previous stage sends, until it says DONE or CANCELLED."""

    def __init__(self, job, denoising, stages, cache):
        super().__init__(job, denoising, stages, cache)
        dim = job.model.denoiser.config.num_attention_heads * job.model.denoiser.config.attention_head_dim
        opts = job.plan.block_pipeline
        tokens = (opts.block_frames + opts.context_frames) * cache.tokens_per_frame
        # hidden states arrive in one preallocated buffer: the largest message, viewed at each size
        self.hidden_buf = torch.empty(self.text.shape[0] * tokens * dim, dtype=job.model.denoiser.dtype,
                                      device=job.model.device)
        self.dim, self.item = dim, None

    def next(self) -> Work | None:
        kind, self.item = Item.parse(self.mesh.recv(self.header_buf, self.mesh.rank - 1))
        while kind == DECODE:  # a finished block on its way to the rank that decodes it
            self._decode_message(self.item)
            kind, self.item = Item.parse(self.mesh.recv(self.header_buf, self.mesh.rank - 1))
        if kind != WORK:
            self._signal(kind)
            if kind == CANCELLED:
                raise Cancelled("cancelled by rank 0")
            return None
        return self._work(self.item, self.d.timesteps[self.item.step], self.item.block * self.block_frames)

    def _decode_message(self, item: Item) -> None:
        """DECODE: block item.block's latents (item.context warm-up frames first) for rank item.step."""
        channels, h, w = self.job.model.latent_shape(self.job.request.height, self.job.request.width)
        payload = self.mesh.recv(torch.empty((1, channels, item.context + item.own, h, w), device=self.mesh.device),
                                 self.mesh.rank - 1)
        if item.step != self.mesh.rank:
            self._send(item.header(DECODE, self.mesh.device), self.mesh.rank + 1)
            self._send(payload, self.mesh.rank + 1)
            return
        start = item.block * self.block_frames
        self.finished.append(FinishedLatents(start, start + item.own, payload[:, :, item.context:],
                                             payload[:, :, :item.context] if item.first else None))

    def run(self, work: Work) -> None:
        item, batch = self.item, self.text.shape[0]
        tokens = (item.context + item.own) * self.cache.tokens_per_frame
        hidden = self.mesh.recv(self.hidden_buf[: batch * tokens * self.dim].view(batch, tokens, self.dim),
                                self.mesh.rank - 1)
        self._pass_on(item, self._stage(item, hidden))
        self._done_with(item)
