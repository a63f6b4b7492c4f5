"""Which denoiser weights a job runs on, and where they live (RenderPlan.parallel.shard_weights,
`clipmesh worker --denoiser-on`).

A worker serves many jobs, so the denoiser it loaded stays whole. Where it loaded it (`--denoiser-on`):
- `device` (the default): on its device; a job runs on it as it is, unless the plan shards it.
- `host`: in host memory, for a model the device cannot hold whole; a job then runs on a copy on
  the device of only what its rank needs: the whole denoiser (frames strategies), its stage's
  blocks (`block_pipeline`: the other blocks are left as empty meta tensors), or its shards.
  The text encoder stays on the host too and is lent to the device while it encodes the prompt
  (`borrowed`), before the job's copy is made: the device never holds both.

`shard_weights`: each rank keeps 1/F of every parameter of every expert, with FSDP2
(`torch.distributed.fsdp.fully_shard`); a transformer block's whole weights are all-gathered just
before its forward and freed after it (reshard_after_forward), so a rank holds its shards plus
one block in flight. The ranks of one guidance branch run the same blocks in the same order
(every frames strategy runs every block on every rank, and the step caches agree their skips
over those ranks), which is what FSDP's collectives need; the two branches of cfg_parallel each
shard over their own ranks, so a cache's decision taken per branch can never leave a rank
waiting in a gather its peers skip.

Every copy is built one block at a time (a rank never holds two whole copies of a denoiser), put
in the pipeline's place for the job (the strategy's patches go on it) and dropped after.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

from clipmesh.specs import LAYERS, spec_named

DENOISER_PLACES = ("device", "host")  # `clipmesh worker --denoiser-on`


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


def _skeleton(whole: torch.nn.Module, units: list[torch.nn.Module]) -> torch.nn.Module:
    """A copy of `whole` whose `units` hold meta tensors (no memory): what goes around the blocks."""
    empty = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
             for unit in units for p in unit.parameters()}
    return copy.deepcopy(whole, memo=empty).requires_grad_(False)


def _to(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module.to(device)`, leaving meta tensors (the blocks a copy does not hold) where they are."""
    return module._apply(lambda t: t if t.is_meta else t.to(device))


def shard_copy(whole: torch.nn.Module, units: list[torch.nn.Module], mesh: DeviceMesh) -> torch.nn.Module:
    """A copy of `whole` whose `units` (its blocks) are each fully_shard-ed over `mesh`, and the
    rest (embeddings, head) sharded as the root; built one unit at a time."""
    names = {id(module): name for name, module in whole.named_modules()}
    where = placement(mesh.size())
    skeleton = _skeleton(whole, units)
    for unit in units:
        part = copy.deepcopy(unit).requires_grad_(False)  # inference: FSDP then takes mixed dtypes (Wan's fp32 norms)
        fully_shard(part, mesh=mesh, shard_placement_fn=where)  # to the mesh's device; keeps this rank's shard
        skeleton.set_submodule(names[id(unit)], part)
    # explicitly: FSDP keeps a root unsharded after forward (for a backward that inference never runs)
    fully_shard(skeleton, mesh=mesh, shard_placement_fn=where, reshard_after_forward=True)
    return skeleton


def stage_copy(whole: torch.nn.Module, units: list[torch.nn.Module], start: int, end: int,
               device: torch.device) -> torch.nn.Module:
    """A copy of `whole` on `device` holding units [start, end) and what is not a unit (a
    block_pipeline stage's share); the other units keep their structure (their attentions can
    be listed) over meta tensors, and never run."""
    names = {id(module): name for name, module in whole.named_modules()}
    skeleton = _to(_skeleton(whole, units), device)
    for unit in units[start:end]:
        skeleton.set_submodule(names[id(unit)], copy.deepcopy(unit).requires_grad_(False).to(device))
    return skeleton


def whole_copy(whole: torch.nn.Module, units: list[torch.nn.Module], device: torch.device) -> torch.nn.Module:
    """A copy of `whole` on `device`, one unit at a time."""
    return stage_copy(whole, units, 0, len(units), device)


@contextlib.contextmanager
def job_weights(job):
    """While the job runs, the pipeline's denoisers are what this rank needs of them: sharded
    copies (plan.parallel.shard_weights), else from a worker holding them on the host, a copy on
    the device of its stage's blocks (a layers partition) or of the whole; else themselves."""
    model, plan = job.model, job.plan
    shard, on_host = plan.parallel.shard_weights, model.denoiser_on == "host"
    if not (shard or on_host):
        yield
        return
    device = model.device
    device_mesh = DeviceMesh.from_group(job.mesh.group, job.mesh.device.type) if shard else None
    layers = spec_named(plan.strategy).partition == LAYERS
    wholes = {}
    try:
        for name in model.denoiser_attrs:
            whole = getattr(model.pipe, name, None)
            if whole is None:
                continue
            units = model.shard_units(whole)
            if shard:
                part = shard_copy(whole, units, device_mesh)
            elif layers:
                part = stage_copy(whole, units, *job.layers, device)
            else:
                part = whole_copy(whole, units, device)
            wholes[name] = whole
            # past the pipeline's __setattr__, which would write the copy's class into its config
            object.__setattr__(model.pipe, name, part)
        yield
    finally:
        for name, whole in wholes.items():
            object.__setattr__(model.pipe, name, whole)


@contextlib.contextmanager
def borrowed(model, name: str):
    """A component a host-holding worker keeps on the host (adapters.HOST_HELD) on the device
    while it runs, back on the host after; otherwise nothing moves."""
    component = getattr(model.pipe, name, None)
    if model.denoiser_on != "host" or component is None:
        yield
        return
    component.to(model.device)
    try:
        yield
    finally:
        component.to("cpu")


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """The bytes of `module`'s parameters this rank holds (a sharded parameter: its shard; a
    meta tensor, a block the rank does not hold: none)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not local.is_meta:
            total += local.numel() * local.element_size()
    return total
