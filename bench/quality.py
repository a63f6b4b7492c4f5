"""Long-video quality on the trained toy-wan preset, read back by the toy world's detector.

Why: clipmesh exists to make videos longer than a model was trained for, and an approximation
(dual-scope attention and its options, block_pipeline's context, the naive split) can only be
judged by what the video shows. In the toy world a shape wraps around a torus at one constant
speed forever, so every frame and every window of the model's native length has a truth at
any length: the prompt's colour and shape, its direction and speed (clipmesh.toyworld).

Every video is made by the real system: a coordinator and local worker processes (1 thread
each), jobs submitted over gRPC, MP4s fetched and decoded. Lengths are multiples of toy-wan's
native 5 latent frames (17 frames): 1x 17, 4x 77, 8x 157, 15x 297 frames. Methods (METHODS):

  exact                     every frame attends to every frame (the reference at 1x)
  clip_parallel (old)       Video-Infinity as it was configured before issue 20 (P=2, G=16, the
                            switch at t=800: 4 of 8 steps global, no entropy scaling), on today's
                            never-shrinking window
  clip_parallel             the defaults (docs/quality.md says how they were chosen)
  clip_parallel + X         one consistency method on top of the defaults: FreeNoise's noise
                            rescheduling, FreeLong's spectral blend, a global RoPE policy, G=0 ...
  block_pipeline            DualParal with the model's defaults (blocks of 3, context 1), and variants
  naive split               ceil(F / 17) independent 17-frame exact jobs, concatenated
  VAE ceiling               no diffusion: the world's true video of the prompt, encoded and decoded
                            whole by toy-wan's own VAE: the most any method can show at that length
                            (the retrained VAE keeps every frame's colour at 15x: docs/quality.md)

At 1x clip_parallel is exact (tests/test_clip_parallel_native.py), so only exact, block_pipeline
and the naive split run there. Seams are the first frames of clips (clip_parallel, naive) or
blocks (block_pipeline); exact is measured at clip_parallel's seams as the control.

    python -m bench.quality                                   # the table of docs/quality.md
    python -m bench.quality --lengths 8 --prompts 2 --seeds 1 --methods exact,clip_parallel --output /tmp/q.md
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

from bench import plots, report
from bench.common import DOCS

MODEL = "toy-wan"
NATIVE_LATENT, STRIDE = 5, 4
NATIVE = STRIDE * (NATIVE_LATENT - 1) + 1  # 17 frames
# 16 prompts: every colour with every direction, the shapes in turn; in Latin-square order, so
# any first 4k of them hold every colour and every direction k times (--prompts takes the first)
PROMPTS = [f"a {('red', 'green', 'blue', 'yellow')[i % 4]} {('circle', 'square', 'triangle')[i % 3]} moving "
           f"{('right', 'down', 'left', 'up')[(i + i // 4) % 4]}" for i in range(16)]
SEEDS = (1, 2)
STRIP = "strip"  # marker for the strip of frames written beside the table

# name -> (request fields beyond the common ones, runs at 1x too)
CP = "clip_parallel"
OLD = dict(local_halo=2, global_frames=16, global_phase=0.5, global_rope="native", entropy_scaling=False)
METHODS: dict[str, tuple[dict, bool]] = {
    "exact": (dict(strategy="exact"), True),
    "clip_parallel (old)": (dict(strategy=CP, clip_parallel=OLD), False),
    "clip_parallel": (dict(strategy=CP), False),
    "clip_parallel + noise_reschedule": (dict(strategy=CP, clip_parallel=dict(noise_reschedule=True)), False),
    "clip_parallel + spectral_blend": (dict(strategy=CP, clip_parallel=dict(spectral_blend=True)), False),
    "clip_parallel global_rope=true": (dict(strategy=CP, clip_parallel=dict(global_rope="true")), False),
    "clip_parallel G=0": (dict(strategy=CP, clip_parallel=dict(global_frames=0)), False),
    "clip_parallel entropy_scaling=false": (dict(strategy=CP, clip_parallel=dict(entropy_scaling=False)), False),
    "block_pipeline": (dict(strategy="block_pipeline"), True),
    "block_pipeline ctx=0": (dict(strategy="block_pipeline", block_pipeline=dict(context_frames=0)), False),
    "block_pipeline 5/2": (dict(strategy="block_pipeline", block_pipeline=dict(block_frames=5, context_frames=2)),
                           True),
    # a block of the native 5 latent frames: a video within the native length is one block
    "block_pipeline 5/1": (dict(strategy="block_pipeline", block_pipeline=dict(block_frames=5, context_frames=1)),
                           True),
    "naive split": ({}, True),
    "VAE ceiling": ({}, True),
}


def frames_at(multiple: int) -> int:
    return STRIDE * (multiple * NATIVE_LATENT - 1) + 1


@dataclass
class Row:
    method: str
    workers: int
    frames: int
    request: dict = field(default_factory=dict)
    scores: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    strip_video: np.ndarray | None = None  # the first prompt's video, for the strip
    error: str = ""


def supported(request: dict) -> bool:
    """Whether this build's options message has every field a method sets (a method added by a
    later change is skipped, not failed, by an older build)."""
    from clipmesh.v1 import clipmesh_pb2 as pb
    for name, options in request.items():
        if isinstance(options, dict):
            fields = pb.SubmitJobRequest.DESCRIPTOR.fields_by_name[name].message_type.fields_by_name
            if any(key not in fields for key in options):
                return False
    return True


def rows_for(multiples: list[int], workers: int, methods: list[str]) -> list[Row]:
    rows = []
    for multiple in multiples:
        for name in methods:
            request, at_native = METHODS[name]
            if (multiple > 1 or at_native) and supported(request):
                rows.append(Row(name, workers, frames_at(multiple), request))
    return rows


def seams(row: Row, model_info) -> list[int]:
    """First frames of every clip / block after the first."""
    from clipmesh import specs
    from clipmesh.coordinator.planner import make_plan
    from clipmesh.plan import block_ranges, num_latent_frames
    from clipmesh.v1 import clipmesh_pb2 as pb

    if row.method == "naive split":
        return list(range(NATIVE, row.frames, NATIVE))
    latent = num_latent_frames(row.frames, STRIDE)
    strategy = row.request.get("strategy", "exact")
    req = pb.SubmitJobRequest(num_frames=row.frames, model=MODEL, num_workers=max(row.workers, 2),
                              strategy="block_pipeline" if strategy == "block_pipeline" else CP)
    if strategy == "block_pipeline":
        req.block_pipeline.CopyFrom(pb.BlockPipelineOptions(**row.request.get("block_pipeline", {})))
        opts = specs.resolve_options(specs.STRATEGY_SPECS["block_pipeline"], req, model_info)
        starts = [s for s, _ in block_ranges(latent, opts.block_frames)][1:]
    else:  # clip_parallel's clips; exact (one clip) is measured at them as the control
        members = [pb.WorkerInfo(id=f"w{i}", speed=1.0) for i in range(req.num_workers)]
        plan = make_plan(pb.Job(id="seams", request=req), members, model_info, 60)
        starts = [c.start for c in plan.clips][1:]
    return [STRIDE * s - (STRIDE - 1) for s in starts]  # latent frame s >= 1 begins at video frame 4s - 3


def score(video: np.ndarray, prompt: str, boundaries: list[int]) -> dict:
    from clipmesh import toyworld

    scene = toyworld.scene_of(prompt)
    detections = toyworld.track(video)
    result = toyworld.prompt_accuracy(detections, scene)
    motion = toyworld.window_motion(detections, NATIVE, scene)
    result["window_direction"], result["speed_error"] = motion["direction"], motion["speed_error"]
    result["identity"] = toyworld.identity_kept(detections)
    result["smoothness"] = toyworld.smoothness(detections)
    seam = toyworld.seam_jump_ratio(video, detections, boundaries)
    result["seam_track"], result["seam_pixels"] = seam["track"], seam["pixels"]
    return result


def run_row(row: Row, client, cases, steps: int, out: Path, model_info) -> None:
    """Every (prompt, seed) of `cases` as jobs submitted at once (the queue runs them in turn)."""
    import imageio.v3 as iio

    from clipmesh.v1 import clipmesh_pb2 as pb

    if row.method == "VAE ceiling":
        return ceiling_row(row, cases)
    boundaries = seams(row, model_info)
    common = dict(height=64, width=64, num_inference_steps=steps, model=MODEL)
    submitted = []
    for prompt, seed in cases:
        if row.method == "naive split":
            jobs = [client.submit(prompt, **common, num_frames=NATIVE, strategy="exact", num_workers=1,
                                  seed=seed * 1000 + i) for i in range(math.ceil(row.frames / NATIVE))]
        else:
            jobs = [client.submit(prompt, **common, seed=seed, num_frames=row.frames, num_workers=row.workers,
                                  **row.request)]
        submitted.append((prompt, jobs))
    for prompt, jobs in submitted:
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
            path.unlink()
        video = np.concatenate(parts)[:row.frames]
        if row.strip_video is None:
            row.strip_video = video
        row.scores.append(score(video, prompt, boundaries))
        row.seconds.append(sum((j.finished_at.ToDatetime() - j.started_at.ToDatetime()).total_seconds() for j in done))


def ceiling_row(row: Row, cases) -> None:
    """The true video of each (prompt, seed) (start and size drawn from the seed), through
    toy-wan's VAE: one encode and one decode of the whole video, as a job's latents are decoded."""
    import torch
    from diffusers import AutoencoderKLWan

    from clipmesh import presets, toytrain, toyworld

    vae = AutoencoderKLWan.from_pretrained(presets.model_folder(MODEL), subfolder="vae").eval()
    for prompt, seed in cases:
        began, rng = time.monotonic(), np.random.default_rng(seed)
        named = toyworld.scene_of(prompt)
        scene = toyworld.Scene(named.shape, named.colour, named.direction, toyworld.expected_speed(64),
                               (float(rng.uniform(0, 64)), float(rng.uniform(0, 64))), float(rng.uniform(0.12, 0.18) * 64))
        x = torch.from_numpy(toyworld.render(scene, row.frames, 64)).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
        with torch.no_grad():
            video = vae.decode(vae.encode(x).latent_dist.mode()).sample
        video = toytrain.to_uint8(video)[0]
        if row.strip_video is None:
            row.strip_video = video
        row.scores.append(score(video, prompt, []))
        row.seconds.append(time.monotonic() - began)


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


COLUMNS = [("present", "present"), ("colour", "colour"), ("shape", "shape"), ("direction", "direction"),
           ("window_direction", "direction, per window"), ("speed_error", "speed error"),
           ("identity", "identity kept"), ("smoothness", "smoothness (px/f²)"),
           ("seam_track", "seam jump, track"), ("seam_pixels", "seam jump, pixels")]


def table(rows: list[Row]) -> str:
    head = "| length | method | " + " | ".join(title for _, title in COLUMNS) + " | seconds / video |"
    lines = [head, "|---" * (len(COLUMNS) + 3) + "|"]
    for r in rows:
        length = f"{round(((r.frames - 1) / STRIDE + 1) / NATIVE_LATENT)}x ({r.frames})"
        if r.error:
            lines.append(f"| {length} | {r.method} | {r.error} |" + " |" * len(COLUMNS))
            continue
        cells = [f"{mean(r, key):.2f}" for key, _ in COLUMNS]
        lines.append(f"| {length} | {r.method} | " + " | ".join(cells) + f" | {np.mean(r.seconds):.1f} |")
    return "\n".join(lines)


def strip(rows: list[Row], path: Path, per_part: int = 3) -> None:
    """A PNG: one row per method of the longest length: `per_part` frames from the start, the
    middle and the end of its first prompt's video, labelled."""
    import imageio.v3 as iio
    from PIL import Image, ImageDraw

    longest = max(r.frames for r in rows)
    picked = [r for r in rows if r.frames == longest and r.strip_video is not None]
    if not picked:
        return
    scale, gap, label = 2, 4, 230
    tiles = []
    for r in picked:
        video, n = r.strip_video, len(r.strip_video)
        frames = [f for part in (0, n // 2 - per_part // 2, n - per_part) for f in range(part, part + per_part)]
        row = Image.new("RGB", (label + len(frames) * (64 * scale + gap) + gap, 64 * scale + 2 * gap), "white")
        ImageDraw.Draw(row).text((6, 64 * scale // 2), r.method, fill="black")
        for i, f in enumerate(frames):
            tile = Image.fromarray(video[f]).resize((64 * scale, 64 * scale), Image.NEAREST)
            row.paste(tile, (label + gap + i * (64 * scale + gap) + (gap * 2 if i >= per_part else 0)
                             + (gap * 2 if i >= 2 * per_part else 0), gap))
        tiles.append(np.asarray(row))
    iio.imwrite(path, np.concatenate(tiles, axis=0))


def main() -> int:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--lengths", default="1,4,8,15", help="multiples of the native length (17 frames)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help=f"how many of the seeds {SEEDS}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of METHODS")
    ap.add_argument("--output", type=Path, default=DOCS / "quality.md")
    ap.add_argument("--strip", default=str(DOCS / "quality-strip.png"),
                    help="the strip of frames of the longest videos ('' for none)")
    ap.add_argument("--model", default=MODEL, help="toy-wan, or a folder of retrained toy-wan weights to judge")
    args = ap.parse_args()
    MODEL = args.model  # every row's jobs and the VAE ceiling read it

    from clipmesh import presets
    from clipmesh.local import LocalCluster
    from clipmesh.v1 import clipmesh_pb2 as pb

    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    rows = rows_for([int(k) for k in args.lengths.split(",")], args.workers, methods)
    cases = [(p, s) for s in SEEDS[:args.seeds] for p in PROMPTS[:args.prompts]]
    model_info = pb.ModelInfo(**presets.model_limits(MODEL))
    began, load = time.monotonic(), report.load()
    with tempfile.TemporaryDirectory(prefix="clipmesh-quality-") as tmp, \
            LocalCluster(MODEL, args.workers, Path(tmp)) as cluster:
        cluster.start_workers()
        for i, row in enumerate(rows):
            run_row(row, cluster.client, cases, args.steps, Path(tmp), model_info)
            print(f"[{i + 1}/{len(rows)}] {row.frames} frames {row.method}: "
                  + (row.error or ", ".join(f"{k} {mean(row, k):.2f}" for k, _ in COLUMNS) +
                     f", {np.mean(row.seconds):.1f} s"), flush=True)
    body = table(rows)
    if args.strip:
        strip(rows, Path(args.strip))
    header = [
        "# Long-video quality: toy-wan, read back by the toy world's detector",
        "",
        f"- Machine: {report.machine()}",
        f"- Software: {report.software()}",
        f"- Settings: {MODEL} (trained on {NATIVE} frames at 64x64), {args.steps} steps, guidance 5, "
        f"{len(cases)} videos per row ({min(args.prompts, len(PROMPTS))} prompts x {min(args.seeds, len(SEEDS))} "
        f"seeds), {args.workers} local workers of 1 thread each, through the real coordinator; values are means "
        "over the videos",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; the run took "
        f"{(time.monotonic() - began) / 60:.1f} min; load average {load:.2f} at the start",
        f"- Command: `python -m bench.quality {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Columns: present / colour / shape: share of frames where the detector finds the shape, of the "
        "prompt's colour, of its kind; direction: share of videos whose whole track moves the named way; "
        "direction, per window: share of the windows of 17 frames (stride 8) that move the named way; speed "
        "error: mean |speed along the named way - the world's 1.5 px/frame| / 1.5 over those windows (a stopped "
        "object errs by 1, a reversed one by 2); identity kept: share of frames showing the video's most common "
        "colour and kind; smoothness: mean |second difference| of the centroid track (0 = uniform motion); seam "
        "jump: mean deviation from the median step at clip (block) boundaries over inside clips, for the track "
        "and for the mean |pixel difference| of consecutive frames (1.0 = a seam looks like any frame); "
        "seconds: the job's run time per video (the naive split: its jobs' sum).",
        "",
    ]
    text = "\n".join(header) + "\n" + body + "\n"
    print("\n" + body)
    report.write(args.output, text)
    plots.draw(args.output, "quality.md")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
