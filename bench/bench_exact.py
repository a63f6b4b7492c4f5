"""Time `exact` clip-parallel denoising of bench-wan at 1..N workers on this machine.

Why: the point of clip parallelism is long videos where self-attention dominates; this
measures `denoise` (prompt encoding, the steps, the final latent gather; model load and VAE
decode excluded) with every rank a real process on loopback gloo, each given cpu_count // workers threads
so all rows use the same cores.

    python -m bench.bench_exact --frames 129 --size 256 --steps 2 --workers 1,2
    python -m bench.bench_exact --model tiny-wan --frames 17 --size 64 --steps 1 --output /tmp/exact.md   # smoke test
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import DOCS
from bench.procs import run_ranks, stop_ranks_on_exit
from bench.report import write
from bench.runners import open_mesh, plan_for


def _rank(cfg: dict, rank: int, port_q) -> dict:
    import torch
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model = load_adapter(cfg["folder"], "cpu", torch.float32)
    plan = plan_for(cfg, model.model_info(cfg["model"]), "exact")
    with open_mesh(rank, cfg["workers"], port_q, plan.group_name) as mesh:
        mesh.any(False)  # everyone loaded: start the clock together
        began, steps = time.perf_counter(), []
        denoise(model, plan, rank, mesh, on_step=lambda report: steps.append(report.seconds))
        return dict(seconds=time.perf_counter() - began, steps=steps)


def run(settings: dict, world_size: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // world_size)
    out = run_ranks(_rank, dict(settings, threads=threads), world_size, f"exact-{world_size}w")
    if out.error:
        raise RuntimeError(out.error)
    seconds = max(r["seconds"] for r in out.ranks)  # the job is done when the slowest rank is
    per_step = max(sum(r["steps"]) / len(r["steps"]) for r in out.ranks)  # transformer calls + scheduler, per step
    return dict(workers=world_size, threads=threads, seconds=seconds, per_step=per_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench-wan")
    ap.add_argument("--frames", type=int, default=129)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", "--output", dest="out", default=str(DOCS / "bench-exact.md"), metavar="PATH")
    args = ap.parse_args()
    stop_ranks_on_exit()

    import torch
    from clipmesh.plan import num_latent_frames
    from clipmesh.presets import model_folder, model_limits

    limits = model_limits(args.model)
    settings = dict(model=args.model, folder=str(model_folder(args.model)), frames=args.frames, size=args.size,
                    steps=args.steps)
    latent = num_latent_frames(args.frames, limits["temporal_stride"])
    tokens = latent * (args.size // limits["spatial_multiple"]) ** 2
    rows = [run(settings, int(n)) for n in args.workers.split(",")]
    base = rows[0]["seconds"]
    lines = [
        f"{args.model}, exact strategy, {args.frames} frames ({latent} latent, {tokens} tokens) at "
        f"{args.size}x{args.size}, CFG (2 transformer calls per step), fp32 on CPU "
        f"({os.cpu_count()} cores, torch {torch.__version__}). seconds: all of `denoise`; "
        "s/step: mean step time of the slowest rank.",
        "",
        "| workers | threads/worker | frames | steps | seconds | s/step | speedup |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {r['workers']} | {r['threads']} | {args.frames} | {args.steps} | {r['seconds']:.1f} | "
         f"{r['per_step']:.1f} | {base / r['seconds']:.2f}x |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    note = ("\nAll rows share this machine's cores, so they show the cost of splitting (the K/V all-gather "
            "and the per-rank overheads), not the speedup of adding machines: `exact` splits the work, it "
            "does not shrink it. Regenerate with `python -m bench.bench_exact`.\n")
    write(args.out, "# exact strategy benchmark\n\n" + table + note)


if __name__ == "__main__":
    main()
