"""Quality of each strategy on the trained toy-wan preset, measured by the toy world's detector.

Why: an approximation (dual-scope attention, block_pipeline's context, a step cache) was judged
only by its distance to `exact`. toy-wan has learned the toy world, so a video can be read back:
does it show the prompt's shape, colour and direction (prompt accuracy), does the shape move
smoothly (track smoothness), and are clip boundaries seen (seam jump ratio: the jump of the
track and of the pixels at a boundary over the jump inside clips; 1.0 = a seam is like any frame).

Every row runs through the real system: a coordinator and 3 local worker processes (1 thread
each), jobs submitted over gRPC, MP4s fetched and decoded. Rows, per length and worker count:

  exact                every frame attends to every frame (at 1 worker: the reference)
  clip_parallel        Video-Infinity with the model's defaults (P=2, G=16)
  clip_parallel G=0    no global frames: only the local window
  naive split          ceil(F / 17) independent 17-frame exact jobs, spread over the workers and
                       concatenated: what Video-Infinity improves on
  block_pipeline       DualParal with the model's defaults (blocks of 3, context 1)
  block_pipeline ctx=0 no context shared between blocks (no feature cache to hand over)
  clip_parallel + taylorseer:3 (at 17 frames: exact + taylorseer:3), and fbc:0.05 likewise

Seams are the first frames of clips (clip_parallel, naive) or of blocks (block_pipeline); exact
is measured at clip_parallel's seams as the control.

    python -m bench.quality                                  # 17/129/257 frames, 2 and 3 workers
    python -m bench.quality --frames 17 --workers 2 --prompts 1 --output /tmp/q.md   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import report
from bench.common import DOCS

MODEL = "toy-wan"
NATIVE = 17  # frames toy-wan was trained on
PROMPTS = [("a red circle moving right", 1), ("a blue square moving down", 2), ("a yellow triangle moving left", 3),
           ("a green circle moving up", 4)]


@dataclass
class Row:
    method: str
    workers: int
    frames: int
    request: dict = field(default_factory=dict)  # SubmitJobRequest fields beyond the common ones
    scores: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    error: str = ""


def rows_for(frames: int, workers: list[int]) -> list[Row]:
    rows = [Row("exact", 1, frames, dict(strategy="exact"))]
    cp = "clip_parallel" if frames > NATIVE else "exact"
    for w in workers:
        rows += [Row("exact", w, frames, dict(strategy="exact")),
                 Row("clip_parallel", w, frames, dict(strategy="clip_parallel")),
                 Row("clip_parallel G=0", w, frames, dict(strategy="clip_parallel", clip_parallel=dict(global_frames=0))),
                 Row("naive split", w, frames),
                 Row("block_pipeline", w, frames, dict(strategy="block_pipeline")),
                 Row("block_pipeline ctx=0", w, frames, dict(strategy="block_pipeline", block_pipeline=dict(context_frames=0))),
                 Row(f"{cp} + taylorseer:3", w, frames, dict(strategy=cp, savers=dict(step_cache="taylorseer:3"))),
                 Row(f"{cp} + fbc:0.05", w, frames, dict(strategy=cp, savers=dict(step_cache="fbc:0.05")))]
    return rows


def seams(row: Row, model_info) -> list[int]:
    """First frames of every clip / block after the first."""
    from clipmesh import specs
    from clipmesh.coordinator.planner import make_plan
    from clipmesh.plan import block_ranges, num_latent_frames
    from clipmesh.v1 import clipmesh_pb2 as pb

    stride = model_info.temporal_stride
    if row.method == "naive split":
        return list(range(NATIVE, row.frames, NATIVE))
    latent = num_latent_frames(row.frames, stride)
    strategy = row.request.get("strategy", "exact")
    req = pb.SubmitJobRequest(num_frames=row.frames, model=MODEL, num_workers=max(row.workers, 2),
                              strategy="block_pipeline" if strategy == "block_pipeline" else "clip_parallel")
    if strategy == "block_pipeline":
        opts = specs.resolve_options(specs.STRATEGY_SPECS["block_pipeline"], req, model_info)
        starts = [s for s, _ in block_ranges(latent, opts.block_frames)][1:]
    else:  # clip_parallel's clips; exact (one clip) is measured at them as the control
        members = [pb.WorkerInfo(id=f"w{i}", speed=1.0) for i in range(req.num_workers)]
        plan = make_plan(pb.Job(id="seams", request=req), members, model_info, 60)
        starts = [c.start for c in plan.clips][1:]
    return [stride * s - (stride - 1) for s in starts]  # latent frame s >= 1 begins at video frame 4s - 3


def run_row(row: Row, client, prompts, steps: int, out: Path, model_info) -> None:
    import imageio.v3 as iio

    from clipmesh import toyworld
    from clipmesh.v1 import clipmesh_pb2 as pb

    boundaries = seams(row, model_info)
    for prompt, seed in prompts:
        scene = toyworld.scene_of(prompt)
        common = dict(height=64, width=64, num_inference_steps=steps, model=MODEL)
        if row.method == "naive split":
            jobs = [client.submit(prompt, **common, num_frames=NATIVE, strategy="exact", num_workers=1,
                                  seed=seed * 1000 + i) for i in range(math.ceil(row.frames / NATIVE))]
        else:
            jobs = [client.submit(prompt, **common, seed=seed, num_frames=row.frames, num_workers=row.workers,
                                  **row.request)]
        done = [wait(client, job.id) for job in jobs]
        failed = [j for j in done if j.state != pb.SUCCEEDED]
        if failed:
            row.error = f"{pb.JobState.Name(failed[0].state)}: {failed[0].error[:200]}"
            return
        parts = []
        for job in done:
            path = out / f"{job.id}.mp4"
            client.fetch(job.id, path)
            parts.append(iio.imread(path, index=None))
        video = np.concatenate(parts)[:row.frames]
        detections = toyworld.track(video)
        score = toyworld.prompt_accuracy(detections, scene)
        score["identity"] = toyworld.identity_kept(detections)
        score["smoothness"] = toyworld.smoothness(detections)
        seam = toyworld.seam_jump_ratio(video, detections, boundaries)
        score["seam_track"], score["seam_pixels"] = seam["track"], seam["pixels"]
        row.scores.append(score)
        began = min(j.started_at.ToDatetime() for j in done)
        row.seconds.append((max(j.finished_at.ToDatetime() for j in done) - began).total_seconds())


def wait(client, job_id: str, timeout: float = 3600):
    from clipmesh.v1 import clipmesh_pb2 as pb

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
            return job
        time.sleep(0.2)
    client.cancel(job_id)
    return client.get(job_id)


def mean(row: Row, key: str) -> float:
    values = [s[key] for s in row.scores if math.isfinite(s[key])]
    return float(np.mean(values)) if values else math.nan


def table(rows: list[Row]) -> str:
    head = ("| frames | method | workers | present | colour | shape | direction | identity kept | smoothness (px/f²) "
            "| seam jump, track | seam jump, pixels | seconds |")
    lines = [head, "|---" * 12 + "|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.frames} | {r.method} | {r.workers} | {r.error} |" + " |" * 9)
            continue
        cells = [f"{mean(r, k):.2f}" for k in ("present", "colour", "shape", "direction", "identity", "smoothness",
                                                  "seam_track", "seam_pixels")]
        lines.append(f"| {r.frames} | {r.method} | {r.workers} | " + " | ".join(cells) + f" | {np.mean(r.seconds):.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--frames", default="17,129,257")
    ap.add_argument("--workers", default="2,3")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", default="", help="only rows whose method starts with one of these (comma-separated)")
    ap.add_argument("--output", type=Path, default=DOCS / "quality.md")
    args = ap.parse_args()

    from clipmesh import presets
    from clipmesh.local import LocalCluster
    from clipmesh.v1 import clipmesh_pb2 as pb

    frames = [int(f) for f in args.frames.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    rows = [r for f in frames for r in rows_for(f, workers)
            if not args.methods or any(r.method.startswith(m) for m in args.methods.split(","))]
    model_info = pb.ModelInfo(**presets.model_limits(MODEL))
    prompts = PROMPTS[:args.prompts]
    began, load = time.monotonic(), report.load()
    with tempfile.TemporaryDirectory(prefix="clipmesh-quality-") as tmp, \
            LocalCluster(MODEL, max(workers), Path(tmp)) as cluster:
        cluster.start_workers()
        for i, row in enumerate(rows):
            run_row(row, cluster.client, prompts, args.steps, Path(tmp), model_info)
            print(f"[{i + 1}/{len(rows)}] {row.frames} frames {row.method} x{row.workers}: "
                  + (row.error or ", ".join(f"{k} {mean(row, k):.2f}" for k in row.scores[0]) +
                     f", {np.mean(row.seconds):.1f} s"), flush=True)
    body = table(rows)
    header = [
        "# Quality by strategy: toy-wan, read back by the toy world's detector",
        "",
        f"- Machine: {report.machine()}",
        f"- Software: {report.software()}",
        f"- Settings: {MODEL} (trained on 17 frames at 64x64), {args.steps} steps, guidance 5, prompts "
        + "; ".join(f"\"{p}\" (seed {s})" for p, s in prompts)
        + "; 3 local workers of 1 thread each, through the real coordinator; values are means over the prompts",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; the run took "
        f"{(time.monotonic() - began) / 60:.1f} min; load average {load:.2f} at the start",
        f"- Command: `python -m bench.quality {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Columns: present / colour / shape: share of frames where the detector finds the shape, of the "
        "prompt's colour, of its kind; direction: share of videos whose track moves the named way; identity kept: "
        "share of frames showing the video's most common colour and kind (one object throughout: 1.0); "
        "smoothness: mean |second difference| of the centroid track (0 = uniform motion); seam jump: "
        "mean deviation from the median step at clip (block) boundaries over inside clips, for the track "
        "and for the mean |pixel difference| of consecutive frames (1.0 = a seam looks like any frame); "
        "seconds: first job start to last job end.",
        "",
    ]
    text = "\n".join(header) + "\n" + body + "\n"
    print("\n" + body)
    report.write(args.output, text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
