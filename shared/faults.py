"""What a job asks for to survive faults, and what the planner resolves (no torch, no gRPC):
how often its ranks write a step checkpoint, and how many placements it gets.

Why every 4 steps by default: a checkpoint costs one serialisation of the clip's latents and
its scheduler history (a few x the latents' bytes) and its upload, which the render thread
does not wait for; measured on bench-wan (docs/bench-faults.md) it is a small share of a
step, so the interval bounds the work a fault loses rather than the overhead.
"""

from __future__ import annotations

DEFAULT_CHECKPOINT_EVERY = 4
MAX_CHECKPOINT_EVERY = 200       # = the most steps a job may have
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS = 10


def checkpoint_every(req) -> int:
    """Steps between checkpoints (block_pipeline: iterations of its queue); 0 = none."""
    return req.checkpoint_every if req.HasField("checkpoint_every") else DEFAULT_CHECKPOINT_EVERY


def max_attempts(req) -> int:
    return req.max_attempts if req.HasField("max_attempts") else DEFAULT_MAX_ATTEMPTS
