"""Per-job LoRA: the adapters a worker holds (`clipmesh worker --lora-dir DIR`: DIR/NAME.safetensors,
in diffusers' or the original trainers' key layout) are loaded once each, on first use, through
diffusers' own `load_lora_weights` (peft), and switched per job with `set_adapters`. The base
weights stay loaded; a job without LoRA runs with every adapter disabled, which is the base model
exactly. Two experts (Wan 2.2 A14B): each adapter goes into both (`load_into_transformer_2`).

The runner activates a job's adapters before it makes any per-job copy of the denoiser
(worker/weights.py), so sharded and host-copied jobs carry them too.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def held(folder: Path | None) -> list[str]:
    """The LoRA names in `folder` (files NAME.safetensors), sorted; none without a folder."""
    return sorted(p.stem for p in Path(folder).glob("*.safetensors")) if folder else []


class Loras:
    """One model's LoRA adapters: the files it may load, and which it has loaded."""

    def __init__(self, pipe, folder: Path | None = None):
        self.pipe, self.folder = pipe, Path(folder) if folder else None
        self.loaded: set[str] = set()

    @property
    def names(self) -> list[str]:
        return held(self.folder)

    def _load(self, name: str) -> None:
        path = self.folder / f"{name}.safetensors" if self.folder else None
        if path is None or not path.is_file():
            raise ValueError(f"loras: {name!r} is not held here (held: {', '.join(self.names) or 'none'})")
        kwargs = {"load_into_transformer_2": True} if getattr(self.pipe, "transformer_2", None) is not None else {}
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=name, **kwargs)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:  # not a LoRA, or not this model's
            raise ValueError(f"loras: {name!r} does not fit this model: {str(exc)[:300]}") from None
        self.loaded.add(name)

    @contextlib.contextmanager
    def active(self, refs):
        """While a job runs: its adapters (LoraRef: name, scale) on, every other one off."""
        if not refs:
            if self.loaded:
                self.pipe.disable_lora()
            yield
            return
        for ref in refs:
            if ref.name not in self.loaded:
                self._load(ref.name)
        self.pipe.enable_lora()
        self.pipe.set_adapters([ref.name for ref in refs], [ref.scale for ref in refs])
        try:
            yield
        finally:
            self.pipe.disable_lora()
