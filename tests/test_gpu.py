"""The CUDA paths, where CUDA is present (bench/device_check.sh runs these on a GPU machine):
an NCCL group of world size 1, the Wan adapter on CUDA against the same render on CPU, the
peak memory a step reports, and the dual-scope core on CUDA's log-sum-exp kernels against its
concatenating path. Skipped here, saying why: CI and this machine have no GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipmesh import presets
from clipmesh.coordinator.planner import make_plan
from clipmesh.v1 import clipmesh_pb2 as pb

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the NCCL paths cannot run")]


def solo(device: str, name: str):
    from clipmesh.worker.mesh import Mesh, host_store

    store, port = host_store("127.0.0.1", timeout_s=60)
    return Mesh.open("127.0.0.1", port, 0, 1, name, timeout_s=60, store=store, device=device)


def test_an_nccl_group_of_one():
    with solo("cuda:0", "nccl-one") as mesh:
        assert torch.distributed.get_backend() == "nccl"
        x = torch.arange(12.0, device="cuda:0").view(3, 4)
        assert torch.equal(mesh.all_gather_uneven(x, [3], dim=0), x)
        assert mesh.any(True) and not mesh.any(False)


def _render(device: str):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render

    model = load_adapter(presets.model_folder("tiny-wan"), device, torch.float32)
    req = pb.SubmitJobRequest(prompt="a lighthouse", num_frames=9, height=32, width=32, num_inference_steps=3,
                              guidance_scale=5.0, fps=8, seed=3, model="tiny-wan", strategy="exact", num_workers=1)
    plan = make_plan(pb.Job(id=f"gpu-{device[:4]}", request=req), [pb.WorkerInfo(id="w", speed=1.0)],
                     model.model_info("tiny-wan"), timeout_seconds=60)
    reports, frames = [], []
    with solo(device, plan.group_name) as mesh:
        render(model, plan, 0, mesh, on_step=reports.append, on_frames=lambda f: frames.append(f.frames))
    return reports, np.concatenate(frames)


def test_the_cuda_adapter_renders_what_the_cpu_renders_and_reports_peak_memory():
    cuda_reports, on_cuda = _render("cuda:0")
    _, on_cpu = _render("cpu")
    assert on_cuda.shape == on_cpu.shape == (9, 32, 32, 3)
    assert np.abs(on_cuda.astype(int) - on_cpu.astype(int)).max() <= 2  # fp32 kernels differ in rounding only
    assert all(r.peak_memory_bytes > 0 for r in cuda_reports)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dual_scope_on_cudas_log_sum_exp_kernels_equals_its_concat_path(dtype, tol):
    """fp32 takes the memory-efficient kernel, bf16 flash attention; the path without a
    log-sum-exp (one call over both key sets, the bias a mask) is the reference."""
    from unittest import mock

    from clipmesh.worker.strategies import dual_scope
    from test_clip_parallel_wan import CONFIGS, CORE_TIMESTEPS, F_CORE, NATIVE, _OneRank, core_inputs, hand_plan

    q, k, v = (x.to("cuda:0", dtype) for x in core_inputs())
    assert dual_scope._lse_kernel(q) == ("efficient" if dtype == torch.float32 else "flash")
    for halo, g, t, entropy, chunk, rekey, _ in CONFIGS:
        if rekey:
            continue
        runs = []
        for with_lse in (True, False):
            core = dual_scope.DualScope(_OneRank(), hand_plan([(0, F_CORE)], halo, g, entropy=entropy), 0, NATIVE,
                                        CORE_TIMESTEPS, chunk_frames=chunk)
            core.begin_step(t)
            with mock.patch.object(dual_scope, "_has_lse_attention", lambda q: with_lse):
                runs.append(core.attend(q, k, v).float())
        assert (runs[0] - runs[1]).abs().max() <= tol, (halo, g, t, entropy, chunk)
