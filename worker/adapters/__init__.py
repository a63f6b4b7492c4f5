"""Model-family adapters: `load_adapter` picks one from the folder's model_index.json (its
variant, clipmesh.families, names the pipeline class each adapter loads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clipmesh.families import variant_of
from clipmesh.presets import declared_limits
from clipmesh.worker.adapters.animatediff import AnimateDiffAdapter
from clipmesh.worker.adapters.base import ModelAdapter
from clipmesh.worker.adapters.unet3d import UNet3DAdapter
from clipmesh.worker.adapters.wan import WanAdapter
from clipmesh.worker.adapters.wan_i2v import WanI2VAdapter
from clipmesh.worker.loras import Loras

# model_index.json `_class_name` -> adapter (an adapter may also accept aliases of its pipeline)
ADAPTERS: dict[str, type[ModelAdapter]] = {
    name: cls for cls in (WanAdapter, WanI2VAdapter, UNet3DAdapter, AnimateDiffAdapter)
    for name in (cls.pipeline_class, *getattr(cls, "pipeline_aliases", ()))}


# What a host-holding worker also keeps on the host: the text encoder runs once a job (Wan's UMT5-XXL
# is 11.4 GB in bf16, more than a 24 GB card can spare beside a shard); weights.borrowed lends it.
HOST_HELD = ("text_encoder",)


def load_adapter(folder: Path, device: torch.device | str, dtype: torch.dtype = torch.float32,
                 denoiser_on: str = "device", lora_dir: Path | None = None) -> ModelAdapter:
    """The folder's adapter with its pipeline on `device`; `denoiser_on` "host": but for its
    denoisers and text encoder, which stay in host memory (a job copies what its rank needs and
    borrows the text encoder while it encodes the prompt: worker/weights.py). `lora_dir`: the
    LoRA files its jobs may name (worker/loras.py)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    variant_of(index)  # an unsupported pipeline raises here, naming the supported ones
    cls = ADAPTERS[index["_class_name"]]
    if denoiser_on == "device":
        adapter = cls.load(folder, device, dtype)
    else:
        adapter = cls.load(folder, "cpu", dtype)  # everything on the host first: the device never holds it whole
        adapter.denoiser_on = denoiser_on
        adapter.place(torch.device(device), keep=(*cls.denoiser_attrs, *HOST_HELD))
    adapter.loras = Loras(adapter.pipe, lora_dir)
    adapter.declared_limits = declared_limits(folder)
    return adapter
