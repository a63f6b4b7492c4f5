"""The strategy interface: how a model is made to work on one clip of a video.

Why install/remove: a worker loads its model once and serves many jobs with different
meshes and clips, so a strategy patches the live model for one job and must leave it
exactly as it found it afterwards (use it as a context manager).
"""

from __future__ import annotations


class Strategy:
    name = ""

    def __init__(self):
        self._saved: list[tuple[object, object]] = []  # (attention module, its stock processor)
        self._hooks: list = []                          # removable hook handles
        self._patches = None                            # temporal_ops.TemporalPatches, where used

    def install(self, model, mesh, plan, rank: int) -> "Strategy":
        """Patch `model` (a ModelAdapter) so its denoiser, fed this rank's clip
        plan.clips[rank] of latent frames, computes that clip's part of the result. Returns self.

        Dispatches to the subclass's `_install_<family>`, which patches through the helpers
        below; a failure part-way undoes what was already patched."""
        installer = getattr(self, f"_install_{model.family}", None)
        if installer is None:
            raise NotImplementedError(f"{self.name} does not support the {model.family!r} family")
        if getattr(model.pipe, "transformer_2", None) is not None:
            raise NotImplementedError(f"two-transformer Wan (2.2 A14B) is not supported by {self.name!r} yet")
        try:
            installer(model, mesh, plan, rank)
        except BaseException:
            self.remove()
            raise
        return self

    def _set_processor(self, attn, processor) -> None:
        """Give `attn` a job-specific processor, remembering the stock one for remove()."""
        self._saved.append((attn, attn.processor))
        attn.set_processor(processor)

    def _patch_temporal_ops(self, model, mesh, plan) -> None:
        """UNet3D-style models: input halos for every temporal conv and synchronised statistics for
        every frame-spanning GroupNorm, so both are exact across clips (temporal_ops)."""
        from clipmesh.worker.strategies.temporal_ops import TemporalPatches

        self._patches = TemporalPatches(mesh, [(c.start, c.end) for c in plan.clips])
        for layer in model.temporal_convs():
            self._patches.halo_conv(layer)  # also synchronises the layer's own norms
        for norm in model.frame_norms():
            self._patches.sync_norm(norm)   # TransformerTemporalModel.norm (the rest: already done)

    def begin_step(self, t: float) -> None:
        """Called before every denoiser call of a step with its timestep (phase-dependent strategies)."""

    def remove(self) -> None:
        """Undo install (idempotent): the stock processors, hooks and patched modules come back."""
        for attn, stock in reversed(self._saved):
            attn.set_processor(stock)
        for handle in self._hooks:
            handle.remove()
        if self._patches is not None:
            self._patches.remove()
        self._saved, self._hooks, self._patches = [], [], None

    def __enter__(self) -> "Strategy":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
