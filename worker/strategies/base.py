"""The strategy interface: how a model is made to work on one clip of a video.

Why install/remove: a worker loads its model once and serves many jobs with different
meshes and clips, so a strategy patches the live model for one job and must leave it
exactly as it found it afterwards (use it as a context manager).
"""

from __future__ import annotations


class Strategy:
    name = ""

    def install(self, model, mesh, plan, rank: int) -> "Strategy":
        """Patch `model` (a ModelAdapter) so its denoiser, fed this rank's clip
        plan.clips[rank] of latent frames, computes that clip's part of the result. Returns self."""
        raise NotImplementedError

    def begin_step(self, t: float) -> None:
        """Called before every denoiser call of a step with its timestep (phase-dependent strategies)."""

    def remove(self) -> None:
        """Undo install (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> "Strategy":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
