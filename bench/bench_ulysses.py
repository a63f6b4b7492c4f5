"""Benchmark clipmesh's `ulysses` against `exact` and diffusers' own Ulysses, all exact.

Why: `ulysses` (worker/strategies/ulysses.py) gives every rank all frames for H/N heads by one
all-to-all around each self-attention, where `exact` all-gathers every rank's K and V; both
must equal the one-process result, like diffusers' ContextParallelConfig(ulysses_degree=W).
Heads must divide by the workers, and bench-wan has 4, so the rows run a 6-head variant of the
model (same head dim, seeded, built once into the clipmesh cache): 1-process vanilla (the
reference), then exact, ulysses and diffusers_ulysses at each worker count. It writes its own
section of docs/bench-strategies.md and leaves the rest of the file as it is.

    python -m bench.bench_ulysses                    # bench-wan x 6 heads, 129 frames, 256x256, 2 steps, 2,3 workers
    python -m bench.bench_strategies --ulysses-only  # the same
    python -m bench.bench_ulysses --model tiny-wan --frames 21 --size 64 --steps 1 --output /tmp/u.md   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

from bench import report
from bench.common import DOCS, GUIDANCE, THREADS
from bench.procs import stop_all, stop_ranks_on_exit
from bench.rows import Row, diff_against, run_all, unavailable

SECTION = "ulysses"  # the marked section of the file this script owns
HEADS = 6  # 1, 2 and 3 workers divide it
VARIANT_SEED = 6
KINDS = ("exact", "ulysses", "diffusers_ulysses")


def heads_variant(base: str, heads: int = HEADS) -> pathlib.Path:
    """The preset `base` with a `heads`-head transformer (same head dim, seeded): a diffusers
    folder under clipmesh's cache, built once (the way tests/test_ulysses.py builds its model)."""
    from clipmesh import presets

    source = presets.model_folder(base)
    target = presets.cache_root() / f"{source.name}-{heads}-heads"
    if (target / "model_index.json").is_file():
        return target
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:  # built beside the target and renamed into place: no reader sees half a folder
        pipe = WanPipeline.from_pretrained(source)
        torch.manual_seed(VARIANT_SEED)
        config = dict(presets.PRESETS[base]["transformer"], num_attention_heads=heads)
        pipe.register_modules(transformer=WanTransformer3DModel(**config).eval())
        pipe.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def diffusers_sent_bytes(transformer: dict, tokens: int, workers: int) -> tuple[int, int]:
    """Bytes diffusers' Ulysses sends per denoising step per rank (fp32), analytically: (all-to-alls,
    output all-gather). Per self-attention, q, k, v [1, S/N, H, D] and the output each go through one
    all_to_all_single that keeps 1/N of the tensor; proj_out's output [1, S/N, C*p] is all-gathered
    (sent to N-1 ranks); CFG makes 2 transformer calls per step."""
    n, heads, dim = workers, transformer["num_attention_heads"], transformer["attention_head_dim"]
    calls, local = (2 if GUIDANCE > 1 else 1), tokens // workers
    a2a = transformer["num_layers"] * 4 * local * heads * dim * 4 * (n - 1) // n
    gather = (n - 1) * local * transformer["out_channels"] * math.prod(transformer["patch_size"]) * 4
    return calls * a2a, calls * gather


def table(rows: list[Row], analytic: dict) -> str:
    lines = ["| row | workers | frames | denoising s | sent MB/step/rank | comm % of step "
             "| peak RSS MB/rank: +over load (abs) | max \\|diff\\| vs vanilla |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r.kind} | {r.workers} | {r.frames} |"
        if r.status != "ok":
            lines.append(head + f" {r.note} | | | | |")
            continue
        if r.kind == "diffusers_ulysses":
            sent = f"{sum(analytic[r.key]) / 1e6:.2f} ¹"
        else:
            sent = "n/a" if r.sent_mb is None else f"{r.sent_mb:.2f}"
        frac = "n/a" if r.comm_frac is None else f"{100 * r.comm_frac:.1f}"
        diff = "" if r.diff is None else f"{r.diff:.2e}"
        lines.append(head + f" {report.secs(r.wall)} | {sent} | {frac} | {r.rss_delta:.0f} ({r.rss_abs:.0f}) "
                            f"| {diff} |")
    return "\n".join(lines)


def notes(rows: list[Row], analytic: dict, transformer: dict) -> list[str]:
    counted = [f"{r.workers} workers: {sum(analytic[r.key]) / 1e6:.2f} MB analytic ({analytic[r.key][0] / 1e6:.2f} "
               f"all-to-all + {analytic[r.key][1] / 1e6:.2f} output gather), {r.sent_mb:.2f} MB counted"
               for r in rows if r.kind == "diffusers_ulysses" and r.status == "ok" and r.sent_mb is not None]
    over = max((r.workers for r in rows), default=1) > (os.cpu_count() or 1)
    h, d, layers = transformer["num_attention_heads"], transformer["attention_head_dim"], transformer["num_layers"]
    return [
        f"- All rows are exact and start from the same noise: max |diff| is against the 1-process vanilla row "
        f"(diffusers' WanPipeline) of the same {h}-head model. 0 means bit-identical (with 1 thread each rank runs "
        "the same kernels on its rows or heads); ~1e-6 would be float rounding of a different reduction order.",
        "- **denoising s**: as in the table above (clipmesh: all of `render.denoise`, prompt encoding and the final "
        "latent gather included; diffusers: `WanPipeline.__call__` from embeddings and latents), the slowest rank.",
        "- **sent MB/step/rank**: the busiest rank's bytes sent per denoising step. clipmesh: `StepReport.bytes_sent` "
        "(its `Mesh` counts every collective of the step). `exact` sends its K and V to every other rank; `ulysses` "
        "sends (N-1)/N of its q|k|v and of the output, in one all-to-all each way per self-attention.",
        f"- ¹ diffusers_ulysses: **analytic**, not from clipmesh's counters: per step, 2 transformer calls (CFG) x "
        f"{layers} self-attentions x 4 all_to_all_single (q, k, v [1, S/N, {h}, {d}] fp32, then the output), each "
        "sending (N-1)/N of its tensor, plus the all-gather of proj_out's output [1, S/N, out_channels x patch] to "
        "the N-1 other ranks (diffusers' `_cp_plan` for Wan; cross-attention is not split). As a check, the run also "
        "counted and timed diffusers' own collectives by wrapping `attention_dispatch._all_to_all_single` and "
        "`EquipartitionSharder.unshard`; that timing gives its comm %. "
        + ("; ".join(counted) + "." if counted else ""),
        "- **comm %**: seconds inside collectives / step seconds, the busiest rank (includes waiting for a slower "
        "rank). **peak RSS**: as in the table above.",
        f"- {THREADS} thread per process. " + (
            f"The {max(r.workers for r in rows)}-worker rows run more processes than this machine has cores "
            f"({os.cpu_count()}), so their seconds show the cost of the split on shared cores, not a speedup."
            if over else "Ranks run side by side on this machine's cores."),
    ]


def run(model: str, frames: list[int], size: int, steps: int, workers: list[int], out: str, command: str) -> int:
    from clipmesh.plan import num_latent_frames
    from clipmesh.presets import model_limits

    limits = model_limits(model)
    folder = heads_variant(model)
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    rows: list[Row] = []
    for f in frames:
        latent = num_latent_frames(f, limits["temporal_stride"])
        tokens = latent * (size // limits["spatial_multiple"]) ** 2
        for kind, w in [("vanilla", 1)] + [(k, w) for w in workers for k in KINDS]:
            row = Row(kind, w, f, latent, tokens)
            why = unavailable(kind, w, latent, tokens, transformer["num_attention_heads"], limits["family"])
            if why:
                row.status, row.note = "n/a", why
            rows.append(row)
    analytic = {r.key: diffusers_sent_bytes(transformer, r.tokens, r.workers) for r in rows
                if r.kind == "diffusers_ulysses"}
    settings = dict(model=str(folder), folder=str(folder), size=size, steps=steps, threads=THREADS, keep_latents=True)
    todo = [r for r in rows if r.status == "pending"]
    load, began = report.load(), time.monotonic()
    busy = report.busy_warning(load)
    print(f"ulysses section, {folder.name}: {len(todo)} rows to run ({', '.join(r.label for r in todo)})", flush=True)
    if busy:
        print(f"note: {busy}", flush=True)
    try:
        run_all(todo, rows, settings)
    except KeyboardInterrupt:
        stop_all()
        print("\ninterrupted: every rank stopped; partial table (not written):\n", file=sys.stderr)
        print(table(rows, analytic), file=sys.stderr)
        return 130
    finally:
        stop_all()
    diff_against(rows, "vanilla")
    lat = rows[0].latent
    text = "\n".join([
        f"## ulysses vs exact vs diffusers Ulysses ({folder.name})", "",
        f"- Machine: {report.machine()}; {report.software()}",
        f"- Settings: `{folder.name}` ({model} with {transformer['num_attention_heads']} heads of "
        f"{transformer['attention_head_dim']}, seeded), frames {','.join(map(str, frames))} ({lat} latent frames, "
        f"{rows[0].tokens} tokens at the first), {size}x{size}, {steps} step{'s' * (steps != 1)}, guidance {GUIDANCE} "
        f"(CFG), fp32 on CPU, {THREADS} thread per process, workers {','.join(map(str, workers))}; plans from "
        "`make_plan`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; took "
        f"{(time.monotonic() - began) / 60:.1f} min; load average (1 min) {load:.2f} at the start, {report.load():.2f} "
        "at the end" + (f". **Note: {busy}**" if busy else ""),
        f"- Command: `{command.strip()}`", "",
        table(rows, analytic), "", *notes(rows, analytic, transformer)])
    print("\n" + text)
    print(f"\nwritten to {report.write_section(out, SECTION, text)}")
    return 0 if all(r.status in ("ok", "n/a") for r in rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--model", default="bench-wan", help="a Wan preset; the rows run its 6-head variant")
    ap.add_argument("--frames", default="129")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", default="2,3")
    ap.add_argument("--out", "--output", dest="out", default=str(DOCS / "bench-strategies.md"), metavar="PATH")
    args = ap.parse_args()
    stop_ranks_on_exit()
    return run(args.model, sorted({int(f) for f in args.frames.split(",")}), args.size, args.steps,
               sorted({int(w) for w in args.workers.split(",")}), args.out,
               "python -m bench.bench_ulysses " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
