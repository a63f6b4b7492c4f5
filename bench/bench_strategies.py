"""Benchmark clipmesh's strategies against diffusers on long videos: denoising time, traffic, memory.

Why: clip_parallel (Video-Infinity) promises time linear in the video length, workers that
add speed, little traffic and a per-worker memory share; `exact` promises the single-device
result no slower than diffusers' own sequence parallelism. This script measures all of it on
one machine and checks those promises. Rows, per frame count:

  exact, clip_parallel    clipmesh `denoise` (the production loop, plans from the planner's
  (ulysses, on request)   make_plan) at each --workers count, every rank a real spawned
                          process with 1 thread, ranks joined over gloo on loopback
  vanilla                 diffusers' WanPipeline in one process (1 thread)
  diffusers_ulysses       diffusers' context parallelism, ContextParallelConfig(ulysses_degree=W)
                          via transformer.enable_parallelism, W processes on gloo

Every row runs in fresh processes (so peak RSS is the row's own) and starts from the same
initial noise, so rows can be compared with vanilla's result (max |diff| column). Then the
section "ulysses vs exact vs diffusers Ulysses" (bench.bench_ulysses: a 6-head variant of the
model, 2 and 3 workers) runs at the smallest length.

    python -m bench.bench_strategies                      # bench-wan, 129/257/513 frames, 256x256, 2 steps
    python -m bench.bench_strategies --budget-minutes 30  # skip rows whose estimate would not fit
    python -m bench.bench_strategies --ulysses-only       # only the ulysses section (replaces it in the file)
    python -m bench.bench_strategies --model tiny-wan --frames 17,33 --size 64 --steps 1 --output /tmp/s.md  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

from bench import bench_ulysses, plots, report
from bench.checks import checks
from bench.common import DOCS, GUIDANCE, THREADS
from bench.procs import stop_all, stop_ranks_on_exit
from bench.rows import CLIPMESH_KINDS, ROW_KINDS, Row, diff_against, run_all, unavailable

DEFAULT_KINDS = ("exact", "clip_parallel", "vanilla", "diffusers_ulysses")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--model", default="bench-wan")
    ap.add_argument("--frames", default="129,257,513")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="height = width")
    ap.add_argument("--rows", default=",".join(DEFAULT_KINDS), help=f"any of {','.join(ROW_KINDS)}")
    ap.add_argument("--workers", default="1,2",
                    help="worker counts of the clipmesh rows; diffusers_ulysses uses those > 1")
    ap.add_argument("--budget-minutes", type=float, default=0.0, help="0: no budget, run every row")
    ap.add_argument("--ulysses-workers", default="2,3", help="worker counts of the ulysses section")
    ap.add_argument("--ulysses-only", action="store_true", help="run only the ulysses section (at the smallest "
                    "--frames) and replace it in --output, leaving the rest of the file as it is")
    ap.add_argument("--no-ulysses", action="store_true", help="skip the ulysses section (the file keeps the old one)")
    ap.add_argument("--out", "--output", dest="out", default=str(DOCS / "bench-strategies.md"), metavar="PATH")
    args = ap.parse_args()

    from clipmesh.plan import num_latent_frames
    from clipmesh.presets import model_folder, model_limits

    frames = sorted({int(f) for f in args.frames.split(",")})
    workers = sorted({int(w) for w in args.workers.split(",")})
    kinds = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ROW_KINDS]
    if unknown or not frames or not workers or min(workers) < 1:
        ap.error(f"bad --rows/--frames/--workers ({', '.join(unknown) or 'empty'}); rows: {', '.join(ROW_KINDS)}")
    limits = model_limits(args.model)
    if args.size % limits["spatial_multiple"]:
        ap.error(f"--size must be a multiple of {limits['spatial_multiple']} for {args.model}")
    uly_workers = sorted({int(w) for w in args.ulysses_workers.split(",")})
    section = dict(model=args.model, frames=frames[:1], size=args.size, steps=args.steps, workers=uly_workers,
                   out=args.out, command="python -m bench.bench_strategies " + " ".join(sys.argv[1:]))
    stop_ranks_on_exit()
    if args.ulysses_only:
        return bench_ulysses.run(**section)
    folder = model_folder(args.model)  # builds a preset once, here, not in racing children
    denoiser = "transformer" if (folder / "transformer" / "config.json").is_file() else "unet"
    heads = json.loads((folder / denoiser / "config.json").read_text()).get("num_attention_heads", 0)

    rows: list[Row] = []
    for f in frames:
        latent = num_latent_frames(f, limits["temporal_stride"])
        tokens = latent * (args.size // limits["spatial_multiple"]) ** 2
        specs = ([("vanilla", 1)] if "vanilla" in kinds else []) \
            + [("diffusers_ulysses", w) for w in workers if w > 1 and "diffusers_ulysses" in kinds] \
            + [(k, w) for k in CLIPMESH_KINDS if k in kinds for w in workers]
        for kind, w in specs:
            row = Row(kind, w, f, latent, tokens)
            why = unavailable(kind, w, latent, tokens, heads, limits["family"])
            if why:
                row.status, row.note = "n/a", why
            rows.append(row)

    settings = dict(model=args.model, folder=str(folder), size=args.size, steps=args.steps, threads=THREADS,
                    keep_latents="vanilla" in kinds)
    # run order: shortest videos first (they feed the estimates); within a length the rows the
    # targets lean on first, so a budget cuts vanilla before clip_parallel
    priority = {"clip_parallel": 0, "exact": 1, "ulysses": 2, "diffusers_ulysses": 3, "vanilla": 4}
    todo = sorted((r for r in rows if r.status == "pending"), key=lambda r: (r.frames, priority[r.kind], r.workers))
    budget_s = args.budget_minutes * 60 or None
    load = report.load()
    began = time.monotonic()
    print(f"{args.model}: {len(todo)} rows to run ({', '.join(r.label for r in todo)})", flush=True)
    if report.busy_warning(load):
        print(f"note: {report.busy_warning(load)}", flush=True)
    try:
        run_all(todo, rows, settings, budget_s)
    except KeyboardInterrupt:
        stop_all()
        print("\ninterrupted: every rank stopped; partial table (not written):\n", file=sys.stderr)
        print(report.table(rows), file=sys.stderr)
        return 130
    finally:
        stop_all()
    diff_against(rows, "vanilla")

    defaults = (args.model, frames, args.steps, args.size, kinds, workers) == \
        ("bench-wan", [129, 257, 513], 2, 256, list(DEFAULT_KINDS), [1, 2])
    header = [
        "# Strategy benchmark: clipmesh exact / clip_parallel vs diffusers (vanilla, Ulysses)",
        "",
        f"- Machine: {report.machine()}",
        f"- Software: {report.software()}",
        f"- Settings: model {args.model}, frames {','.join(map(str, frames))}, {args.size}x{args.size}, "
        f"{args.steps} step{'s' * (args.steps != 1)}, guidance {GUIDANCE} (CFG: 2 transformer calls per step), fp32 "
        f"on CPU, {THREADS} thread per process, workers {','.join(map(str, workers))}, rows {','.join(kinds)}, "
        f"budget {f'{args.budget_minutes:g} min' if budget_s else 'none'}",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; the whole run took "
        f"{(time.monotonic() - began) / 60:.1f} min; load average (1 min) {load:.2f} at the start, "
        f"{report.load():.2f} at the end: more than the bench's own processes means the timings were contended",
        f"- Command: `python -m bench.bench_strategies {' '.join(sys.argv[1:])}`".rstrip(),
        "",
    ]
    body = report.table(rows)
    derived = ["## Targets", ""] + checks(rows, frames, workers)
    print("\n" + body + "\n\n" + "\n".join(derived))
    text = "\n".join(header) + "\n" + body + "\n\n" + "\n".join(derived) + "\n\n" + "\n".join(
        report.footnotes(rows, defaults)) + "\n"
    out = report.write(args.out, text)  # keeps the file's ulysses section until the next one is measured
    plots.draw(out, "bench-strategies.md")
    print(f"\nwritten to {out}")
    ok = all(r.status in ("ok", "n/a", "skipped") for r in rows)
    if not args.no_ulysses and limits["family"] == "wan":
        ok = bench_ulysses.run(**section) == 0 and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
