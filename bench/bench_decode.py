"""Benchmark the distributed decode of Wan's causal VAE: decode seconds and peak decode memory
per rank, 1 and 2 workers, at growing video lengths.

Why: before, every Wan job gathered the whole video's latents to one rank, which decoded all
of it alone (half of a 2-stage block_pipeline run at 513 frames); now each rank decodes its own
clip from a warm-up of the frames before it (worker/adapters/wan_decode.py). Every row runs the
runner's own Decoder (clipmesh.worker.render.Decoder: halo exchange, chunked decode) on the
clip the planner gives the rank, in fresh spawned processes with 1 thread each; frames are
decoded and dropped. The latents are random (the decode does not care what they show).

    python -m bench.bench_decode                 # bench-wan 256x256, 257 and 513 frames, 1 and 2 workers
    python -m bench.bench_decode --model tiny-wan --size 64 --frames 17,33 --output /tmp/d.md   # smoke test

Targets (checked under the table): decode time at 2 workers <= 0.6x of 1 worker; peak decode
memory per rank at 2 workers flat (<= 1.1x) from the shortest to the longest video.
"""

from __future__ import annotations

import argparse
import datetime
import time

from bench.common import DOCS
from bench.procs import maxrss_mb, run_ranks, stop_ranks_on_exit
from bench.report import busy_warning, load, machine, write_section
from bench.runners import open_mesh


def _rank(cfg: dict, rank: int, port_q) -> dict:
    import torch

    from clipmesh.plan import num_latent_frames, split_clips
    from clipmesh.v1 import clipmesh_pb2 as pb
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.job import FinishedLatents, Job
    from clipmesh.worker.peak_memory import PeakMemory
    from clipmesh.worker.render import Decoder

    model = load_adapter(cfg["folder"], "cpu", torch.float32)
    latent, world = num_latent_frames(cfg["frames"], model.temporal_stride), cfg["workers"]
    clips = split_clips(latent, world)
    plan = pb.RenderPlan(world_size=world, num_latent_frames=latent,
                         clips=[pb.ClipRange(start=s, end=e) for s, e in clips])
    channels, h, w = model.latent_shape(cfg["size"], cfg["size"])
    start, end = clips[rank]
    z = torch.randn(1, channels, latent, h, w, generator=torch.Generator().manual_seed(0))[:, :, start:end].clone()
    frames = [0]
    with open_mesh(rank, world, port_q, f"bench-decode-{world}-{cfg['frames']}") as mesh, torch.no_grad():
        mesh.any(False)  # everyone loaded: start the clock together
        memory = PeakMemory("cpu")
        memory.reset()
        before = memory.peak()
        began = time.perf_counter()
        Decoder(Job(model, plan, rank, mesh), lambda piece: frames.__setitem__(0, frames[0] + len(piece.frames))).add(
            FinishedLatents(start, end, z))
        seconds = time.perf_counter() - began
        peak = memory.peak()
    return dict(rank=rank, seconds=seconds, frames=frames[0], peak_mb=(peak - before) / 2**20,
                clip=end - start, warmup=min(start, model.decode_lookback), rss_mb=maxrss_mb())


def _per_rank(ranks: list[dict], key: str, fmt: str) -> str:
    return " / ".join(fmt.format(r[key]) for r in ranks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-wan")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", default="257,513")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--output", default=str(DOCS / "bench-strategies.md"))
    args = parser.parse_args()
    stop_ranks_on_exit()
    from clipmesh.presets import model_folder

    folder, at_start = str(model_folder(args.model)), load()
    rows, results = [], {}
    for frames in [int(f) for f in args.frames.split(",")]:
        for workers in [int(w) for w in args.workers.split(",")]:
            cfg = dict(folder=folder, model=args.model, size=args.size, frames=frames)
            out = run_ranks(_rank, cfg, workers, f"decode-{workers}w-{frames}f")
            if out.error:
                raise SystemExit(f"{workers} workers, {frames} frames: {out.error}")
            ranks = out.ranks
            assert sum(r["frames"] for r in ranks) == frames, ranks
            results[(workers, frames)] = ranks
            rows.append(f"| {workers} | {frames} | {_per_rank(ranks, 'clip', '{}')} | {_per_rank(ranks, 'warmup', '{}')} | "
                        f"{_per_rank(ranks, 'seconds', '{:.1f}')} | {max(r['seconds'] for r in ranks):.1f} | "
                        f"{_per_rank(ranks, 'peak_mb', '{:.0f}')} |")
            print(rows[-1], flush=True)
    checks = []
    lengths = sorted({f for _, f in results})
    for frames in lengths:
        if (1, frames) in results and (2, frames) in results:
            ratio = max(r["seconds"] for r in results[(2, frames)]) / results[(1, frames)][0]["seconds"]
            checks.append(f"- {frames} frames: decode time at 2 workers {ratio:.2f}x of 1 worker "
                          f"(target <= 0.6x): {'met' if ratio <= 0.6 else 'MISSED'}")
    if (2, lengths[0]) in results and (2, lengths[-1]) in results and len(lengths) > 1:
        growth = max(r["peak_mb"] for r in results[(2, lengths[-1])]) / max(
            max(r["peak_mb"] for r in results[(2, lengths[0])]), 1e-9)
        checks.append(f"- peak decode memory per rank at 2 workers, {lengths[0]} -> {lengths[-1]} frames: "
                      f"{growth:.2f}x (target <= 1.1x, flat): {'met' if growth <= 1.1 else 'MISSED'}")
    text = "\n".join([
        "## Decode: every rank decodes its own clip (Wan's causal VAE, exact)", "",
        f"`python -m bench.bench_decode` on {machine()}, {datetime.date.today()}. Model {args.model} at "
        f"{args.size}x{args.size}: the runner's Decoder on each rank's clip (halo exchange of the warm-up, "
        "decode in chunks of 4 latent frames), fresh spawned processes with 1 thread each. Seconds: the "
        "decode on that rank; peak: the rank's peak RSS during the decode minus its RSS before it.",
        busy_warning(at_start), "",
        "| workers | frames | latent frames per rank | warm-up frames per rank | decode s per rank | "
        "decode s (slowest) | peak decode MB per rank |",
        "|---:|---:|---|---|---|---:|---|", *rows, "", *checks])
    write_section(args.output, "decode", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
