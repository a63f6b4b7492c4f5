"""Benchmark block_pipeline (DualParal): wall time, time to first frame, peak RSS per worker and
communication share, at growing video lengths, with 1 and 2 pipeline stages.

Why: the block queue promises memory per worker that does not grow with the video, a first
frame that comes after the same few iterations however long the video is, and stages that add
speed. Every row runs the worker's own path (BlockPipelineStrategy.render: queue, stages over
gloo P2P, streaming decode on rank 0) in fresh spawned processes, 1 thread each, so peak RSS is
the row's own. Frames are decoded as the worker decodes them and dropped (no upload).

    python bench/bench_block_pipeline.py          # bench-wan 256x256, 4 steps, 129/257/513/1025 frames
    python bench/bench_block_pipeline.py --model tiny-wan --size 64 --frames 17,33 --steps 2   # smoke test

Targets (checked under the table): RSS per worker at 1025 frames <= 1.1x that at 257; 2 stages
>= 1.6x faster than 1 at 513 frames; time to first frame within 1.2x from 257 to 1025 frames.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_strategies import GROUP_TIMEOUT_S, PROMPT, GUIDANCE, SEED, _machine, _maxrss_mb, _quiet, _rendezvous  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _plan(cfg: dict, info):
    """The plan the coordinator would make (make_plan: layer split, resolved options)."""
    from clipmesh.coordinator.planner import make_plan
    from clipmesh.v1 import clipmesh_pb2 as pb

    req = pb.SubmitJobRequest(prompt=PROMPT, num_frames=cfg["frames"], height=cfg["size"], width=cfg["size"],
                              num_inference_steps=cfg["steps"], guidance_scale=GUIDANCE, seed=SEED,
                              model=cfg["model"], strategy="block_pipeline", num_workers=cfg["workers"],
                              block_pipeline=pb.BlockPipelineOptions(block_frames=cfg["block"],
                                                                     context_frames=cfg["context"]))
    members = [pb.WorkerInfo(id=f"bench-{r}", speed=1.0) for r in range(cfg["workers"])]
    return make_plan(pb.Job(id=f"bench-bp-{cfg['workers']}w-{cfg['frames']}f", request=req), members, info,
                     GROUP_TIMEOUT_S)


def _rank(cfg: dict, rank: int, port_q, result_q) -> None:
    try:
        import torch

        torch.set_num_threads(1)
        _quiet()
        from clipmesh.worker.adapters import load_adapter
        from clipmesh.worker.mesh import Mesh
        from clipmesh.worker.strategies.block_pipeline import BlockPipelineStrategy

        model = load_adapter(cfg["folder"], "cpu", torch.float32)
        plan = _plan(cfg, model.model_info(cfg["model"]))
        store, port = _rendezvous(rank, cfg["workers"], port_q)
        rss_loaded = _maxrss_mb()
        with Mesh.open("127.0.0.1", port, rank, cfg["workers"], plan.group_name, timeout_s=GROUP_TIMEOUT_S,
                       store=store) as mesh:
            frames, comm = [], [0.0]
            strategy = BlockPipelineStrategy()
            decode_s = [0.0]
            stream_decoder = model.stream_decoder

            def timed_decoder():  # rank 0's decode time: it runs on the pipeline's critical path
                decoder = stream_decoder()
                plain = decoder.decode

                def decode(latents):
                    t0 = time.perf_counter()
                    out = plain(latents)
                    decode_s[0] += time.perf_counter() - t0
                    return out
                decoder.decode = decode
                return decoder
            model.stream_decoder = timed_decoder

            def on_frames(rendered):
                frames.append((time.perf_counter() - began, len(rendered.frames)))

            def on_step(report):
                comm[0] += report.comm_seconds

            mesh.any(False)  # everyone loaded: start the clock together
            mesh.take_stats()
            began = time.perf_counter()
            if cfg["decode"]:
                strategy.render(model, plan, rank, mesh, on_step=on_step, on_frames=on_frames)
            else:  # denoising only: the pipeline's own speed, without rank 0's VAE work
                strategy.run(model, plan, rank, mesh, on_step=on_step,
                             on_block=lambda start, end, latents: frames.append((time.perf_counter() - began, 0)))
            wall = time.perf_counter() - began
        result_q.put(dict(rank=rank, wall=wall, first_frame=frames[0][0] if frames else None,
                          frames=sum(n for _, n in frames), comm=comm[0], decode=decode_s[0], rss_loaded=rss_loaded,
                          rss_peak=_maxrss_mb()))
    except BaseException:
        result_q.put(dict(rank=rank, error=traceback.format_exc(limit=8)))


def run_row(cfg: dict) -> dict:
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(cfg, r, port_q, result_q), daemon=True) for r in range(cfg["workers"])]
    for p in procs:
        p.start()
    ranks = [result_q.get(timeout=3 * 3600) for _ in procs]
    for p in procs:
        p.join(60)
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    ranks.sort(key=lambda r: r["rank"])
    return dict(workers=cfg["workers"], frames=cfg["frames"], decoded=cfg["decode"], wall=max(r["wall"] for r in ranks),
                first_frame=ranks[0]["first_frame"], out_frames=ranks[0]["frames"], decode=ranks[0]["decode"],
                rss=max(r["rss_peak"] for r in ranks), rss_delta=max(r["rss_peak"] - r["rss_loaded"] for r in ranks),
                comm=max(r["comm"] / r["wall"] for r in ranks))


def table(rows: list[dict]) -> str:
    lines = ["| workers | frames | decode | wall (s) | of which decode on rank 0 (s) | first frame / block (s) | "
             "peak RSS / worker (MiB) | RSS growth (MiB) | comm share |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['frames']} | {'yes' if r['decoded'] else 'no'} | {r['wall']:.1f} | "
                     f"{r['decode']:.1f} | {r['first_frame']:.1f} | "
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
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-block-pipeline.md"))
    args = ap.parse_args()

    from clipmesh.presets import model_folder

    settings = dict(model=args.model, folder=str(model_folder(args.model)), size=args.size, steps=args.steps,
                    block=args.block, context=args.context)
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
        f"`python bench/bench_block_pipeline.py` on {_machine()}, {datetime.date.today()}. "
        f"Model {args.model} at {args.size}x{args.size}, {args.steps} steps with CFG {GUIDANCE}, blocks of "
        f"{args.block} latent frames with {args.context} context frames; every rank a spawned process with 1 "
        "thread, stages over gloo on loopback; frames decoded on rank 0 as blocks finish (the worker's path). "
        "Comm share: the largest per-rank fraction of wall time spent inside data-plane calls, which includes "
        "waiting for the previous stage (pipeline bubbles and imbalance), not only transfer.", "",
        table(rows), "", *checks(rows), ""])
    print(text)
    pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
