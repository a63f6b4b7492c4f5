"""Time `exact` clip-parallel denoising of bench-wan at 1..N workers on this machine.

Why: the point of clip parallelism is long videos where self-attention dominates; this
measures `denoise` (prompt encoding, the steps, the final latent gather; model load and VAE
decode excluded) with every rank a real process on loopback gloo, each given cpu_count // workers threads
so all rows use the same cores.

    python bench/bench_exact.py --frames 129 --size 256 --steps 2 --workers 1,2
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import torch
import torch.multiprocessing as mp

from clipmesh.plan import num_latent_frames, split_clips
from clipmesh.v1 import clipmesh_pb2 as pb


def _plan(args, world_size: int) -> pb.RenderPlan:
    latent = num_latent_frames(args.frames, 4)
    req = pb.SubmitJobRequest(prompt="a lighthouse on a cliff at dusk", num_frames=args.frames, height=args.size,
                              width=args.size, num_inference_steps=args.steps, guidance_scale=5.0, seed=0,
                              model="bench-wan", strategy="exact")
    return pb.RenderPlan(request=req, strategy="exact", world_size=world_size, num_latent_frames=latent,
                         clips=[pb.ClipRange(start=s, end=e) for s, e in split_clips(latent, world_size)],
                         decode_rank=0, group_name=f"bench-{world_size}", timeout_seconds=1800)


def _rank(rank, world_size, threads, folder, args, port_q, result_q):
    torch.set_num_threads(threads)
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.mesh import Mesh, host_store
    from clipmesh.worker.render import denoise

    model, plan, store = load_adapter(folder, "cpu", torch.float32), _plan(args, world_size), None
    if rank == 0:
        store, port = host_store("127.0.0.1", timeout_s=1800)
        for _ in range(world_size - 1):
            port_q.put(port)
    else:
        port = port_q.get()
    with Mesh.open("127.0.0.1", port, rank, world_size, plan.group_name, timeout_s=1800, store=store) as mesh:
        mesh.any(False)  # everyone loaded: start the clock together
        began, steps = time.perf_counter(), []
        denoise(model, plan, rank, mesh, on_step=lambda report: steps.append(report.seconds))
        result_q.put((rank, time.perf_counter() - began, steps))


def run(args, world_size: int, folder: str) -> dict:
    threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world_size, threads, folder, args, port_q, result_q))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = [result_q.get() for _ in procs]
    for p in procs:
        p.join()
    seconds = max(r[1] for r in results)  # the job is done when the slowest rank is
    per_step = max(sum(r[2]) / len(r[2]) for r in results)  # transformer calls + scheduler, per step
    return dict(workers=world_size, threads=threads, seconds=seconds, per_step=per_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=129)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "docs" / "bench-exact.md"))
    args = ap.parse_args()

    from clipmesh.presets import model_folder
    folder = str(model_folder("bench-wan"))
    latent = num_latent_frames(args.frames, 4)
    tokens = latent * (args.size // 16) ** 2
    rows = [run(args, int(n), folder) for n in args.workers.split(",")]
    base = rows[0]["seconds"]
    lines = [
        f"bench-wan, exact strategy, {args.frames} frames ({latent} latent, {tokens} tokens) at "
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
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    note = ("\nAll rows share this machine's cores, so they show the cost of splitting (the K/V all-gather "
            "and the per-rank overheads), not the speedup of adding machines: `exact` splits the work, it "
            "does not shrink it. Regenerate with `python bench/bench_exact.py`.\n")
    pathlib.Path(args.out).write_text("# exact strategy benchmark\n\n" + table + note)


if __name__ == "__main__":
    main()
