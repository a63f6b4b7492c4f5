"""Step checkpoints: what a rank needs to go on exactly from a step.

Frames partitions (exact, clip_parallel, ulysses): every rank writes a part, below.
block_pipeline: rank 0 holds the whole queue and writes one part of it (block_queue.py, with
`dumps` / `loads` and the scheduler state helpers here).

A part holds the latents of the rank's latent frames [start, end) after `step` steps and its
scheduler's state. The schedulers we use step every latent frame alone (elementwise), so a
multistep scheduler's history (UniPC's and DPM-Solver's model_outputs, last_sample) is split
per frame like the latents, and the rest of its state (step index, order counters, timestep
list) is the same on every rank. A checkpoint can so be re-split: a resumed rank takes the
frames of its new clip from whichever parts hold them (`restore`).

The bytes are torch.save of tensors, lists, numbers and None only, and are read back with
weights_only=True: a checkpoint file cannot run code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

FRAME_DIM = 2  # latents [1, C, F, h, w]
_NOT_STATE = ("_internal_dict", "config")  # the scheduler's config comes from the model folder


@dataclass(frozen=True)
class Part:
    """One rank's part of a checkpoint: global latent frames [start, end) after `step` steps."""

    step: int
    start: int
    end: int
    data: bytes


def _is_per_frame(value, shape) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == shape


def scheduler_state(scheduler) -> dict:
    """What a scheduler changes while it steps (its config comes from the model folder)."""
    return {name: value for name, value in vars(scheduler).items() if name not in _NOT_STATE}


def set_scheduler_state(scheduler, state: dict, device="cpu") -> None:
    for name, value in state.items():
        setattr(scheduler, name, _to(value, device))


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def dumps(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def loads(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def save(step: int, start: int, end: int, latents: torch.Tensor, scheduler) -> Part:
    """The part of latents [1, C, end - start, h, w] and their scheduler after `step` steps."""
    frames, common = {}, {}
    for name, value in scheduler_state(scheduler).items():
        if _is_per_frame(value, latents.shape) or (isinstance(value, list) and any(
                _is_per_frame(v, latents.shape) for v in value)):
            frames[name] = value
        else:
            common[name] = value
    state = {"step": step, "start": start, "end": end, "latents": latents, "frames": frames, "common": common}
    return Part(step, start, end, dumps(state))


def restore(parts: list[bytes], start: int, end: int, scheduler, device="cpu") -> torch.Tensor:
    """Latents of global latent frames [start, end) from the parts that hold them, with
    `scheduler` set to their state (per-frame entries cut to the same frames)."""
    loaded = sorted((loads(p) for p in parts), key=lambda p: p["start"])
    pieces = [p for p in loaded if p["start"] < end and start < p["end"]]
    covered = sum(min(p["end"], end) - max(p["start"], start) for p in pieces)
    if covered != end - start:
        raise ValueError(f"checkpoint parts cover {covered} of latent frames [{start}, {end})")

    def cut(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([v.narrow(FRAME_DIM, max(p["start"], start) - p["start"],
                                   min(p["end"], end) - max(p["start"], start))
                          for p, v in zip(pieces, values)], dim=FRAME_DIM).to(device)

    set_scheduler_state(scheduler, pieces[0]["common"], device)
    for name, value in pieces[0]["frames"].items():
        if isinstance(value, list):  # a history: entry i of every part, or None where none is kept yet
            setattr(scheduler, name, [None if value[i] is None else cut([p["frames"][name][i] for p in pieces])
                                      for i in range(len(value))])
        else:
            setattr(scheduler, name, cut([p["frames"][name] for p in pieces]))
    return cut([p["latents"] for p in pieces])
