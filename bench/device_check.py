"""One small render per strategy on this machine's accelerator (CUDA + NCCL where present, else
CPU + gloo, and it says so), world size 1, through the worker's own runner: seconds, seconds
per step and the peak memory the step reports carry; then the dual-scope core against full
SDPA on the same frames, as counted FLOP rates (fp32, and bf16 on CUDA). `bench/device_check.sh`
runs it after the GPU-marked tests; it is not part of CI.

    python -m bench.device_check [--model tiny-wan] [--frames 33] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from clipmesh import presets, specs
from clipmesh.coordinator.planner import make_plan
from clipmesh.v1 import clipmesh_pb2 as pb


def render_once(model, info: pb.ModelInfo, strategy: str, args, device: str) -> dict:
    from clipmesh.worker.mesh import Mesh, host_store
    from clipmesh.worker.render import render

    req = pb.SubmitJobRequest(prompt="a red circle moving right", num_frames=args.frames, height=args.size,
                              width=args.size, num_inference_steps=args.steps, guidance_scale=5.0, fps=8, seed=1,
                              model=args.model, strategy=strategy, num_workers=1)
    plan = make_plan(pb.Job(id=f"check-{strategy}", request=req), [pb.WorkerInfo(id="w0", speed=1.0)], info,
                     timeout_seconds=120)
    reports, frames = [], []
    store, port = host_store("127.0.0.1", timeout_s=60)
    began = time.perf_counter()
    with Mesh.open("127.0.0.1", port, 0, 1, plan.group_name, timeout_s=60, store=store, device=device) as mesh:
        backend = torch.distributed.get_backend()
        render(model, plan, 0, mesh, on_step=reports.append, on_frames=lambda f: frames.append(len(f.frames)))
    seconds = time.perf_counter() - began
    return dict(strategy=strategy, backend=backend, frames=sum(frames), seconds=seconds,
                per_step=sum(r.seconds for r in reports) / max(len(reports), 1),
                peak=max((r.peak_memory_bytes for r in reports), default=0))


def attention_rates(device: str, dtype: torch.dtype, frames: int = 21, tokens: int = 1560, heads: int = 12,
                    dim: int = 128, repeats: int = 3) -> tuple[float, float, str]:
    """(full SDPA, dual-scope core) counted TFLOP/s on `frames` x `tokens` queries (Wan at 480x832,
    a 12-head slice), the core at Wan's defaults (P = 10, G = 16) on one rank, and its kernel."""
    from clipmesh.specs import STRATEGY_SPECS, resolve_options
    from clipmesh.worker.mesh import Mesh, host_store
    from clipmesh.worker.strategies.dual_scope import DualScope, _lse_kernel

    req = pb.SubmitJobRequest(num_frames=4 * frames + 1, num_inference_steps=4)
    plan = pb.RenderPlan(request=req, num_latent_frames=frames, clips=[pb.ClipRange(start=0, end=frames)])
    plan.clip_parallel.CopyFrom(resolve_options(STRATEGY_SPECS["clip_parallel"], req, pb.ModelInfo(family="wan")))
    q, k, v = (torch.randn(1, frames, tokens, heads, dim, device=device, dtype=dtype) for _ in range(3))

    def timed(run) -> float:
        run()
        if device != "cpu":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(repeats):
            run()
        if device != "cpu":
            torch.cuda.synchronize()
        return (time.perf_counter() - began) / repeats

    flat = [x.flatten(1, 2).transpose(1, 2) for x in (q, k, v)]
    full = timed(lambda: torch.nn.functional.scaled_dot_product_attention(*flat))
    store, port = host_store("127.0.0.1", timeout_s=60)
    with Mesh.open("127.0.0.1", port, 0, 1, f"rates-{dtype}", timeout_s=60, store=store, device=device) as mesh:
        core = DualScope(mesh, plan, 0, frames, [999.0, 500.0])
        core.begin_step(999.0)
        dual = timed(lambda: core.attend(q, k, v))
        keys = sum((last - first + 1 + len(out)) * tokens for (first, last), out in zip(core.windows, core.outside))
    flops_full = 4 * (frames * tokens) ** 2 * dim * heads
    flops_dual = 4 * tokens * keys * dim * heads
    return flops_full / full / 1e12, flops_dual / dual / 1e12, _lse_kernel(q.transpose(1, 2)) or "concat"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-wan")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    from clipmesh.worker.adapters import load_adapter

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name(0) if device != "cpu" else "CPU (no CUDA here: gloo, not NCCL)"
    model = load_adapter(presets.model_folder(args.model), device, torch.float32)
    info = model.model_info(args.model)
    rows = [render_once(model, info, name, args, device) for name in specs.strategies_for(info.family)]
    print(f"device check on {where}, torch {torch.__version__}: {args.model}, {args.frames} frames at "
          f"{args.size}x{args.size}, {args.steps} steps, world size 1")
    print("| strategy | backend | frames | wall s | s/step | peak memory MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['backend']} | {r['frames']} | {r['seconds']:.2f} | {r['per_step']:.3f} "
              f"| {r['peak'] / 2 ** 20:.0f} |")
    print()
    tokens = 1560 if device != "cpu" else 96  # a CPU would take minutes at Wan's 480x832
    print(f"| attention (21 frames x {tokens} tokens, 12 heads of 128) | dtype | kernel | TFLOP/s counted |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16) if device != "cpu" else (torch.float32,):
        full, dual, kernel = attention_rates(device, dtype, tokens=tokens)
        print(f"| full SDPA | {dtype} | - | {full:.2f} |")
        print(f"| dual-scope core (P 10, G 16) | {dtype} | {kernel} | {dual:.2f} |")
    return 0 if all(r["frames"] == args.frames for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
