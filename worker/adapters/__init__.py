"""Model-family adapters: `load_adapter` picks one from the folder's model_index.json (its
variant, clipmesh.families, names the pipeline class each adapter loads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clipmesh.families import variant_of
from clipmesh.worker.adapters.animatediff import AnimateDiffAdapter
from clipmesh.worker.adapters.base import ModelAdapter
from clipmesh.worker.adapters.unet3d import UNet3DAdapter
from clipmesh.worker.adapters.wan import WanAdapter
from clipmesh.worker.adapters.wan_i2v import WanI2VAdapter

# model_index.json `_class_name` -> adapter (an adapter may also accept aliases of its pipeline)
ADAPTERS: dict[str, type[ModelAdapter]] = {
    name: cls for cls in (WanAdapter, WanI2VAdapter, UNet3DAdapter, AnimateDiffAdapter)
    for name in (cls.pipeline_class, *getattr(cls, "pipeline_aliases", ()))}


def load_adapter(folder: Path, device: torch.device | str, dtype: torch.dtype = torch.float32) -> ModelAdapter:
    index = json.loads((Path(folder) / "model_index.json").read_text())
    variant_of(index)  # an unsupported pipeline raises here, naming the supported ones
    return ADAPTERS[index["_class_name"]].load(folder, device, dtype)
