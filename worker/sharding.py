"""`shard_weights` (RenderPlan.parallel): the denoiser's weights sharded over the ranks that split
the job's work, with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each rank keeps 1/F of every parameter of every expert; a transformer block's whole weights are
all-gathered just before its forward and freed after it (reshard_after_forward), so a rank
holds its shard of the model plus one block in flight. The ranks of one guidance branch run the
same blocks in the same order (every frames strategy runs every block on every rank, and the
step caches agree their skips over those ranks), which is what FSDP's collectives need; the two
branches of cfg_parallel each shard over their own ranks, so a cache's decision taken per branch
can never leave a rank waiting in a gather its peers skip.

A worker serves many jobs, so its loaded model stays whole: a job gets a sharded copy for its
duration, built one block at a time (a rank never holds two whole copies of the denoiser), in
place of the pipeline's denoisers while the job runs, and dropped after. The strategy's patches
go on the copy. On a GPU the copy's shards live on the device, so a worker whose device cannot
hold the whole denoiser keeps it in host memory (`clipmesh worker --denoiser-on host`) and
gathers one block at a time onto the device.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard


def placement(ranks: int):
    """FSDP's shard_placement_fn: dim 0 (FSDP's default; uneven is padded) where it has a row per
    rank, else a dimension the ranks divide (FSDP pads no other): along dim 0 alone Wan's
    modulation tables [1, 6, dim] would sit whole on the first rank."""
    def shard(param: torch.nn.Parameter) -> Shard:
        if param.ndim == 0 or param.shape[0] >= ranks:
            return Shard(0)
        even = [d for d in range(1, param.ndim) if param.shape[d] % ranks == 0]
        return Shard(max(even, key=lambda d: param.shape[d])) if even else Shard(0)
    return shard


def shard_copy(whole: torch.nn.Module, units: list[torch.nn.Module], mesh: DeviceMesh) -> torch.nn.Module:
    """A copy of `whole` whose `units` (its blocks) are each fully_shard-ed over `mesh`, and the
    rest (embeddings, head) sharded as the root; built one unit at a time."""
    names = {id(module): name for name, module in whole.named_modules()}
    where = placement(mesh.size())
    # the skeleton first, with an empty stand-in where each unit goes: no unit is copied whole twice
    skeleton = copy.deepcopy(whole, memo={id(unit): torch.nn.Module() for unit in units})
    skeleton.requires_grad_(False)  # inference: FSDP then takes blocks whose dtypes differ (Wan's fp32 norms)
    for unit in units:
        part = copy.deepcopy(unit).requires_grad_(False)
        fully_shard(part, mesh=mesh, shard_placement_fn=where)  # to the mesh's device; keeps this rank's shard
        skeleton.set_submodule(names[id(unit)], part)
    # explicitly: FSDP keeps a root unsharded after forward (for a backward that inference never runs)
    fully_shard(skeleton, mesh=mesh, shard_placement_fn=where, reshard_after_forward=True)
    return skeleton


@contextlib.contextmanager
def sharded_weights(job):
    """While the job runs: the pipeline's denoisers are sharded copies (plan.parallel.shard_weights;
    otherwise nothing changes)."""
    if not job.plan.parallel.shard_weights:
        yield
        return
    model, mesh = job.model, job.mesh
    device_mesh = DeviceMesh.from_group(mesh.group, mesh.device.type)
    wholes = {}
    try:
        for name in model.denoiser_attrs:
            whole = getattr(model.pipe, name, None)
            if whole is not None:
                wholes[name] = whole
                # past the pipeline's __setattr__, which would write the copy's class into its config
                object.__setattr__(model.pipe, name, shard_copy(whole, model.shard_units(whole), device_mesh))
        yield
    finally:
        for name, whole in wholes.items():
            object.__setattr__(model.pipe, name, whole)


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """The bytes of `module`'s parameters this rank holds (a sharded parameter: its shard)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
