"""Reporting: the machine line, number formats, the strategies table and its footnotes, and
markdown files written whole or one marked section at a time (so a script that measures one
section never touches the others' numbers)."""

from __future__ import annotations

import os
import pathlib
import platform
import re

from bench.common import THREADS
from bench.rows import CLIPMESH_KINDS, Row


def secs(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def sig(x: float) -> str:
    return f"{x:.3g}"


def load() -> float:
    """The 1-minute load average (nan where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def busy_warning(load_at_start: float) -> str:
    """A warning when more than the machine's cores were busy before the bench started ("" if not)."""
    cores = os.cpu_count() or 1
    if not load_at_start > 0.5 * cores:
        return ""
    return (f"load average {load_at_start:.2f} on {cores} cores at the start: other processes may be loading "
            "the machine, so these timings may be contended")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(next(l for l in pathlib.Path("/proc/meminfo").read_text().splitlines()
                       if l.startswith("MemTotal")).split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def software() -> str:
    import diffusers
    import torch

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}"


def table(rows: list[Row]) -> str:
    lines = ["| row | workers | frames | latent frames | tokens | wall s | s/frame | comm s/step | comm MB/step "
             "| comm % of step | peak RSS MB/worker: +over load (abs) | max \\|diff\\| vs vanilla |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r.kind} | {r.workers} | {r.frames} | {r.latent} | {r.tokens} |"
        if r.status != "ok":
            lines.append(head + f" {r.note} | | | | | | |")
            continue
        comm = (f"{r.comm_s:.3f} | {r.comm_mb:.2f} | {100 * r.comm_frac:.1f}" if r.comm_s is not None
                else "n/a | n/a | n/a")
        diff = "" if r.diff is None else f"{r.diff:.2e}"
        lines.append(head + f" {secs(r.wall)} | {sig(r.wall / r.frames)} | {comm} | "
                            f"{r.rss_delta:.0f} ({r.rss_abs:.0f}) | {diff} |")
    return "\n".join(lines)


def footnotes(rows: list[Row], defaults: bool) -> list[str]:
    ok = [r for r in rows if r.status == "ok"]
    encode = max((r.extra.get("encode_s", 0.0) for r in ok if r.kind in CLIPMESH_KINDS), default=None)
    uly = [r for r in ok if r.kind == "diffusers_ulysses"]
    seq = ", ".join(f"{r.frames} frames: {r.extra.get('seq_per_rank')} of {r.tokens} tokens" for r in uly)
    notes = [
        "How to read it:",
        "",
        "- **wall s**: denoising only, model load excluded, from a barrier after every rank has loaded; the slowest "
        "rank. clipmesh rows time `clipmesh.worker.render.denoise` (the production loop: prompt encoding, every "
        "step, the final all-gather of the latents; plans come from the coordinator's `make_plan` with the "
        "planner's clip_parallel defaults); prompt encoding with the preset's small UMT5 took "
        + (f"{encode:.3f} s" if encode is not None else "(not measured)") + ". vanilla and diffusers_ulysses time "
        "`WanPipeline.__call__(prompt_embeds=..., negative_prompt_embeds=..., latents=..., output_type=\"latent\")`: "
        "text encoding and VAE decode are outside the clock. All rows start from the same initial noise.",
        "- **tokens**: latent frames x (side / spatial multiple)^2: the transformer's patches for Wan (8x VAE, "
        "2x2 patches); latent pixels for UNet3D. **s/frame**: wall seconds per output frame.",
        "- **comm**: per denoising step, the busiest rank's data-plane traffic (bytes sent + received) and time "
        "spent in collectives: clipmesh rows from the StepReport fields (`Mesh.take_stats()`); diffusers_ulysses "
        "rows counted and timed by wrapping diffusers' own collectives (the all-to-alls of "
        "`attention_dispatch._all_to_all_single` and the output all-gather of `EquipartitionSharder.unshard`); "
        "`n/a` for vanilla (no communication). comm % = comm seconds / step seconds, a step being the interval "
        "between step ends (it includes clipmesh's cancel-vote collective at the step's start, which the counters "
        "leave out). Collective time includes waiting for the slower rank to arrive, so imbalance shows up here too.",
        "- **peak RSS**: `resource.getrusage(RUSAGE_SELF).ru_maxrss` in each rank process (a fresh process per "
        "row): growth of the peak over its value right after the model was loaded (the denoising working set), "
        "and in parentheses the absolute peak; the largest over the ranks.",
        "- **max |diff| vs vanilla**: largest absolute difference of the final latents (rank 0) from the vanilla "
        "row's of the same length: ~1e-5 for exact, ulysses and diffusers_ulysses (the same computation, split), "
        "larger for clip_parallel, which is an approximation by design.",
        f"- Every process runs with {THREADS} thread (`torch.set_num_threads`); multi-process rows run their "
        "ranks side by side on this machine's cores, joined over gloo on loopback (127.0.0.1).",
        "- **diffusers_ulysses**: diffusers' context parallelism, `transformer.enable_parallelism(config="
        "ContextParallelConfig(ulysses_degree=W))` on W processes (gloo), native SDPA backend. On CPU-only torch "
        "`torch.accelerator.device_count()` is 0 and diffusers' `ModelMixin._resolve_parallel_config` picks the "
        "device as `rank % device_count()` (ZeroDivisionError), so the Ulysses processes patch it to return 1; "
        "the DeviceMesh is then a CPU mesh and the all-to-alls run over gloo. "
        + (f"Proof the sequence is split, tokens seen by `blocks[0]` on rank 0: {seq}. " if seq else "")
        + "Ring mode is not benchmarked: ring attention needs each chunk's log-sum-exp, which diffusers' native "
        "(CPU) backend refuses (`return_lse=True` raises); only CUDA flash/sage backends provide it.",
        "- **skipped (est. N s)**: with --budget-minutes, a row whose estimated denoising time (from the rows "
        "measured before it: t = a*N + b*N^2 in tokens N through the two largest measured lengths of the same kind; "
        "from one length, N^2 for full attention and N for clip_parallel) would not fit in what is left of the "
        "budget. Checks that use an estimate say (est.).",
        "- Targets: with other --frames than 129,257,513, the smallest / middle / largest length stand in for "
        "129 / 257 / 513.",
    ]
    if not defaults:
        notes += ["", "**These are not the default settings** (see Settings above): regenerate the real table with "
                  "`python -m bench.bench_strategies`."]
    return notes


# --------------------------------------------------------------------------------------------
# markdown files
# --------------------------------------------------------------------------------------------

_SECTION = re.compile(r"<!-- begin (\S+) -->\n.*?<!-- end \1 -->\n?", re.S)


def section(name: str, text: str) -> str:
    """`text` marked as section `name` of a file (the markers are HTML comments: invisible)."""
    return f"<!-- begin {name} -->\n{text.rstrip()}\n<!-- end {name} -->\n"


def write(path, text: str) -> pathlib.Path:
    """Write `text` as the file's main part; the marked sections the file had that `text` lacks stay, after it."""
    path = pathlib.Path(path)
    old = path.read_text() if path.is_file() else ""
    mine = {m.group(1) for m in _SECTION.finditer(text)}
    kept = [m.group(0) for m in _SECTION.finditer(old) if m.group(1) not in mine]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([text.rstrip() + "\n", *kept]))
    return path


def write_section(path, name: str, text: str) -> pathlib.Path:
    """Replace section `name` of the file (appended when it has none); the rest stays as it is."""
    path = pathlib.Path(path)
    old = path.read_text() if path.is_file() else ""
    new, found = section(name, text), False

    def swap(m):
        nonlocal found
        if m.group(1) != name:
            return m.group(0)
        found = True
        return new
    out = _SECTION.sub(swap, old)
    if not found:
        out = (out.rstrip() + "\n\n" if out.strip() else "") + new
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(out)
    return path
