"""Benchmark block_pipeline (DualParal): wall time, time to first frame, peak RSS per worker and
communication share, at growing video lengths, with 1 and 2 pipeline stages.

Why: the block queue promises memory per worker that does not grow with the video, a first
frame that comes after the same few iterations however long the video is, and stages that add
speed. Every row runs the worker's own path (clipmesh.worker.render.render: the block queue,
stages over gloo P2P, runs of blocks decoded by the ranks in turn) in fresh spawned processes, 1 thread each, so
peak RSS is the row's own. Frames are decoded as the worker decodes them and dropped (no upload);
denoising-only rows run render(decode=False) and time the blocks' final latents.

    python -m bench.bench_block_pipeline          # bench-wan 256x256, 4 steps, 129/257/513/1025 frames
    python -m bench.bench_block_pipeline --model tiny-wan --size 64 --frames 17,33 --one-stage-frames 33 \
        --denoise-only-frames 33 --steps 2 --output /tmp/bp.md   # smoke test

Targets (checked under the table): RSS per worker at 1025 frames <= 1.1x that at 257; 2 stages
>= 1.6x faster than 1 at 513 frames; time to first frame within 1.2x from 257 to 1025 frames.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

from bench import plots
from bench.common import DOCS, GUIDANCE
from bench.procs import maxrss_mb, run_ranks, stop_ranks_on_exit
from bench.report import machine, write
from bench.runners import open_mesh, plan_for


def _rank(cfg: dict, rank: int, port_q) -> dict:
    import torch
    from clipmesh.v1 import clipmesh_pb2 as pb
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render

    from clipmesh.worker.weights import local_parameter_bytes

    model = load_adapter(cfg["folder"], "cpu", torch.float32, cfg.get("denoiser_on", "device"))
    options = pb.BlockPipelineOptions(block_frames=cfg["block"], context_frames=cfg["context"])
    plan = plan_for(cfg, model.model_info(cfg["model"]), "block_pipeline", block_pipeline=options,
                    **cfg.get("request", {}))
    with open_mesh(rank, cfg["workers"], port_q, plan.group_name) as mesh:
        rss_loaded = maxrss_mb()
        frames, comm, decode_s = [], [0.0], [0.0]
        decode_stream = model.decode_stream

        def timed_stream(*args, **kwargs):  # this rank's decode time (runs of blocks decode on the ranks in turn)
            stream = decode_stream(*args, **kwargs)
            feed = stream.feed

            def timed_feed(*feed_args, **feed_kwargs):
                t0 = time.perf_counter()
                feed(*feed_args, **feed_kwargs)
                decode_s[0] += time.perf_counter() - t0
            stream.feed = timed_feed
            return stream
        model.decode_stream = timed_stream  # what the runner's Decoder calls for every run of blocks

        def on_frames(rendered):
            frames.append((time.perf_counter() - began, len(rendered.frames)))

        held: list[int] = []  # the denoisers' parameter bytes the job runs on (a host-held one: the stage's copy)

        def on_step(report):
            comm[0] += report.comm_seconds
            if not held:
                held.append(sum(local_parameter_bytes(d) for d in model.denoisers))

        mesh.any(False)  # everyone loaded: start the clock together
        mesh.take_stats()
        began = time.perf_counter()
        if cfg["decode"]:
            render(model, plan, rank, mesh, on_step=on_step, on_frames=on_frames)
        else:  # denoising only: the pipeline's own speed, without rank 0's VAE work
            render(model, plan, rank, mesh, on_step=on_step, decode=False,
                   on_latents=lambda piece: frames.append((time.perf_counter() - began, 0)))
        wall = time.perf_counter() - began
    return dict(wall=wall, first_frame=frames[0][0] if frames else None, frames=sum(n for _, n in frames),
                comm=comm[0], decode=decode_s[0], rss_loaded=rss_loaded, rss_peak=maxrss_mb(),
                held_mb=held[0] / 2**20 if held else 0.0, whole_mb=model.denoiser_bytes / 2**20)


def run_row(cfg: dict) -> dict:
    out = run_ranks(_rank, cfg, cfg["workers"], f"bp-{cfg['workers']}w-{cfg['frames']}f")
    if out.error:
        raise RuntimeError(out.error)
    ranks = out.ranks
    return dict(workers=cfg["workers"], frames=cfg["frames"], decoded=cfg["decode"], wall=max(r["wall"] for r in ranks),
                first_frame=min(r["first_frame"] for r in ranks if r["first_frame"] is not None),
                out_frames=sum(r["frames"] for r in ranks), decode=[r["decode"] for r in ranks],
                rss=max(r["rss_peak"] for r in ranks), rss_delta=max(r["rss_peak"] - r["rss_loaded"] for r in ranks),
                comm=max(r["comm"] / r["wall"] for r in ranks))


def table(rows: list[dict]) -> str:
    lines = ["| workers | frames | decode | wall (s) | of which decode per rank (s) | first frame / block (s) | "
             "peak RSS / worker (MiB) | RSS growth (MiB) | comm share |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['frames']} | {'yes' if r['decoded'] else 'no'} | {r['wall']:.1f} | "
                     f"{' / '.join(f'{d:.1f}' for d in r['decode'])} | {r['first_frame']:.1f} | "
                     f"{r['rss']:.0f} | {r['rss_delta']:.0f} | {100 * r['comm']:.1f}% |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[str]:
    def find(workers, frames, decoded=True):
        return next((r for r in rows if (r["workers"], r["frames"], r["decoded"]) == (workers, frames, decoded)), None)

    out = []
    a, b = find(2, 257), find(2, 1025)
    if a and b:
        ratio = b["rss"] / a["rss"]
        out.append(f"- flat memory: peak RSS per worker 1025 / 257 frames = {ratio:.3f}x (target <= 1.1x): "
                   f"{'PASS' if ratio <= 1.1 else 'MISS'}")
        ratio = b["first_frame"] / a["first_frame"]
        out.append(f"- time to first frame 1025 / 257 frames = {ratio:.2f}x (target within 1.2x): "
                   f"{'PASS' if ratio <= 1.2 else 'MISS'}")
    for decoded, what in ((True, "end to end"), (False, "denoising only")):
        one, two = find(1, 513, decoded), find(2, 513, decoded)
        if one and two:
            speedup = one["wall"] / two["wall"]
            out.append(f"- 2 stages vs 1 at 513 frames, {what}: {speedup:.2f}x faster (target >= 1.6x): "
                       f"{'PASS' if speedup >= 1.6 else 'MISS'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench-wan")
    ap.add_argument("--frames", default="129,257,513,1025")
    ap.add_argument("--one-stage-frames", default="513", help="frame counts also run on 1 worker")
    ap.add_argument("--denoise-only-frames", default="513",
                    help="frame counts also run without decoding, on 1 and 2 workers")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--block", type=int, default=8, help="block_frames (latent)")
    ap.add_argument("--context", type=int, default=4, help="context_frames (latent)")
    ap.add_argument("--out", "--output", dest="out", default=str(DOCS / "bench-block-pipeline.md"), metavar="PATH")
    args = ap.parse_args()
    stop_ranks_on_exit()

    from clipmesh.presets import model_folder

    settings = dict(model=args.model, folder=str(model_folder(args.model)), size=args.size, steps=args.steps,
                    block=args.block, context=args.context, threads=1)
    plan = [(2, int(f), True) for f in args.frames.split(",")]
    plan += [(1, int(f), True) for f in args.one_stage_frames.split(",") if f]
    plan += [(w, int(f), False) for f in args.denoise_only_frames.split(",") if f for w in (1, 2)]
    rows = []
    for workers, frames, decode in plan:
        row = run_row(dict(settings, workers=workers, frames=frames, decode=decode))
        rows.append(row)
        print(f"{workers}w {frames}f decode={decode}: wall {row['wall']:.1f}s, first frame {row['first_frame']:.1f}s, "
              f"rss {row['rss']:.0f} MiB, comm {100 * row['comm']:.1f}%", flush=True)
    text = "\n".join([
        "# block_pipeline benchmark (DualParal)", "",
        f"`python -m bench.bench_block_pipeline` on {machine()}, {datetime.date.today()}. "
        f"Model {args.model} at {args.size}x{args.size}, {args.steps} steps with CFG {GUIDANCE}, blocks of "
        f"{args.block} latent frames with {args.context} context frames; every rank a spawned process with 1 "
        "thread, stages over gloo on loopback; runs of 4 blocks decoded by the ranks in turn, each in a decode thread (the worker's path). "
        "Comm share: the largest per-rank fraction of wall time spent inside data-plane calls, which includes "
        "waiting for the previous stage (pipeline bubbles and imbalance), not only transfer.", "",
        table(rows), "", *checks(rows), ""])
    print(text)
    write(args.out, text)
    plots.draw(args.out, "bench-block-pipeline.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
