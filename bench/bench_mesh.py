"""Benchmark a job's mesh (issue 22): cfg_parallel and shard_weights beside exact and clip_parallel.

Why: with guidance every step runs the transformer twice. Over 2 workers the frames split makes
each rank run both branches on half the frames, and every frame-mixing attention exchanges K/V
(exact: all of it; clip_parallel: halos and global frames); cfg 2 x 1 makes each rank run one
branch on every frame and exchange the prediction once per step. Sharding trades memory for
traffic: each rank holds 1/N of the weights and all-gathers each block's before its forward.
Rows: the same job on 1 worker, then on 2 workers each way (and cfg 2 x frames 2 on 4, for its
traffic: 4 ranks on 2 cores cannot be timed fairly), fresh spawned processes with 1 thread each, through
the production planner and runner (`render.denoise`); every row's latents are compared with the
first row of its strategy.

    python -m bench.bench_mesh                                  # bench-wan, 256x256, 129 frames, 3 steps
    python -m bench.bench_mesh --model tiny-wan --size 64 --frames 17 --steps 2 --output /tmp/m.md  # smoke test
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np

from bench.common import DOCS
from bench.procs import run_ranks, stop_ranks_on_exit
from bench.report import busy_warning, load, machine, write_section
from bench.bench_block_pipeline import _rank as block_pipeline_rank
from bench.runners import run_rank

# (label, workers, request fields): the first row of a strategy is the baseline its diff is taken against
MESHES = (("1 worker", 1, {}), ("frames 2", 2, {}), ("cfg 2 x frames 1", 2, dict(cfg_parallel=True)),
          ("frames 2, weights sharded", 2, dict(shard_weights=True)),
          ("cfg 2 x frames 2 (4 ranks on 2 cores: traffic, not time)", 4, dict(cfg_parallel=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-wan")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default=str(DOCS / "bench-strategies.md"))
    args = parser.parse_args()
    stop_ranks_on_exit()
    from clipmesh.presets import model_folder

    folder, at_start, rows = str(model_folder(args.model)), load(), []
    for strategy in ("exact", "clip_parallel"):
        first = None
        for label, workers, request in MESHES:
            cfg = dict(kind=strategy, folder=folder, model=args.model, size=args.size, frames=args.frames,
                       steps=args.steps, keep_latents=True, request=request)
            out = run_ranks(run_rank, cfg, workers, f"mesh-{strategy}-{len(rows)}")
            if out.error:
                raise SystemExit(f"{strategy}, {label}: {out.error}")
            latents = out.ranks[0]["latents"]
            first = latents if first is None else first
            steps = [s for r in out.ranks for s in r["steps"]]
            sent = np.mean([s["sent"] for s in steps]) / 2**20
            comm = sum(s["comm_seconds"] for s in steps) / sum(s["seconds"] for s in steps)
            held, whole = max(r["held_mb"] for r in out.ranks), out.ranks[0]["whole_mb"]
            # FSDP's gathers bypass the Mesh counters: each denoiser call gathers the weights a rank lacks
            gathered = (whole - held) * (1 if request.get("cfg_parallel") else 2)
            rows.append(f"| `{strategy}` | {label} | {max(r['wall'] for r in out.ranks):.1f} | {sent:.1f} | "
                        f"{gathered:.1f} | {comm:.0%} | {held:.1f} of {whole:.1f} | "
                        f"{max(r['rss_peak'] for r in out.ranks):.0f} | {np.abs(latents - first).max():.1e} |")
            print(rows[-1], flush=True)
    # block_pipeline: both branches batched through one pipeline of 2 stages, or one pipeline per branch
    blocks = []
    for label, request in (("2 stages, branches batched", {}), ("cfg 2 x 1 stage", dict(cfg_parallel=True))):
        cfg = dict(folder=folder, model=args.model, size=args.size, frames=args.frames, steps=args.steps,
                   block=8, context=4, decode=False, request=request)
        out = run_ranks(block_pipeline_rank, cfg, 2, f"mesh-block-{len(blocks)}")
        if out.error:
            raise SystemExit(f"block_pipeline, {label}: {out.error}")
        blocks.append(f"| `block_pipeline` | {label} | {max(r['wall'] for r in out.ranks):.1f} | "
                      f"{max(r['comm'] for r in out.ranks) / max(r['wall'] for r in out.ranks):.0%} | "
                      f"{max(r['rss_peak'] for r in out.ranks):.0f} |")
        print(blocks[-1], flush=True)
    text = "\n".join([
        "## A job's mesh: cfg_parallel and shard_weights", "",
        f"`python -m bench.bench_mesh` on {machine()}, {datetime.date.today()}. {args.model} at "
        f"{args.size}x{args.size}, {args.frames} frames, {args.steps} steps, guidance on, 2 workers (fresh "
        "spawned processes, 1 thread each), denoising only. Seconds: the slowest rank's; MB sent: per rank "
        "and step, through the job's Mesh (K/V, halos, predictions); MB gathered: the weights a sharded rank "
        "all-gathers per step (one gather per block per denoiser call; FSDP's own collectives); comm share: "
        "of the Mesh's traffic only; weights held: the denoiser's parameters a rank holds while the job runs (sharded: its "
        "shards; on a CPU the worker's whole copy stays in memory beside them, so the peak RSS does not "
        "show the saving a GPU's memory does); max |diff|: against the strategy's first row.",
        busy_warning(at_start), "",
        "| strategy | mesh | seconds | MB sent / step | MB gathered / step | comm share | weights held (MB) | "
        "peak RSS MB | max abs diff |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|", *rows, "",
        "block_pipeline on the same 2 workers (blocks of 8 latent frames, 4 of context, denoising only): both "
        "guidance branches as one batch through 2 stages, or one pipeline per branch (cfg 2 x 1 stage, the "
        "two heads pairing their predictions):", "",
        "| strategy | mesh | seconds | comm share | peak RSS MB |", "|---|---|---:|---:|---:|", *blocks])
    write_section(args.output, "mesh", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
