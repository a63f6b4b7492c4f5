"""The strategy interface: how a model is made to work on one clip of a video.

Why install/remove: a worker loads its model once and serves many jobs with different
meshes and clips, so a strategy patches the live model for one job and must leave it
exactly as it found it afterwards (use it as a context manager).
"""

from __future__ import annotations


class Strategy:
    name = ""

    def install(self, model, mesh, clips: list[tuple[int, int]], rank: int) -> "Strategy":
        """Patch `model` (a ModelAdapter) so its denoiser, fed rank's clip clips[rank] of latent frames,
        computes that clip's part of the whole-video result. Returns self."""
        raise NotImplementedError

    def remove(self) -> None:
        """Undo install (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> "Strategy":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
