"""The benches' figures, drawn from the tables they wrote: what a reader looks for at a glance.

Each bench that writes a table calls `draw(doc)` after writing it, so a figure is always the
table beside it; `python -m bench.plots` redraws every figure from the docs as they are. A
figure is a PNG beside its doc, linked from the doc's `figures` section (report.write_section).
The data behind each figure is `series(doc)`: {figure: {panel: {line: [(x, y), ...]}}}.
"""

from __future__ import annotations

import argparse
import pathlib
import re

from bench.report import write_section

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def tables(path: pathlib.Path) -> list[list[dict[str, str]]]:
    """Every markdown table of the file, as rows of {header: cell}."""
    found, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]) and (i == 0 or not lines[i - 1].startswith("|")):
            header = _cells(line)
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append(dict(zip(header, _cells(row))))
            found.append(body)
    return found


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def _number(cell: str) -> float | None:
    """The cell's first number ("565 (984)" -> 565, "8x (157)" -> 8, "n/a" -> None)."""
    match = re.search(r"-?\d+(\.\d+)?(e[-+]?\d+)?", cell)
    return float(match.group(0)) if match else None


def _add(lines: dict, name: str, x, y) -> None:
    if x is not None and y is not None:
        lines.setdefault(name, []).append((x, y))


def _strategies(doc: pathlib.Path) -> dict:
    rows = tables(doc)[0]
    time, memory, speedup = {}, {}, {}
    for r in rows:
        workers, frames = int(r["workers"]), _number(r["frames"])
        name = f"{r['row']}, {workers} worker{'s' * (workers > 1)}"
        _add(time, name, frames, _number(r["wall s"]))
        peak = re.search(r"\((\d+)\)", r["peak RSS MB/worker: +over load (abs)"])
        _add(memory, name, frames, float(peak.group(1)) if peak else None)
    for r in rows:  # speed-up of N workers over 1, per strategy and length
        one = [o for o in rows if o["row"] == r["row"] and o["frames"] == r["frames"] and o["workers"] == "1"]
        if one and _number(r["wall s"]) and _number(one[0]["wall s"]):
            _add(speedup, f"{r['row']}, {r['frames']} frames", int(r["workers"]),
                 _number(one[0]["wall s"]) / _number(r["wall s"]))
    speedup = {k: v for k, v in speedup.items() if len(v) > 1}  # a strategy measured at one count says nothing
    return {"bench-strategies-time.png": {"wall seconds vs frames (log-log: slope 1 linear, 2 quadratic)": time},
            "bench-strategies-speedup.png": {"speed-up over 1 worker vs workers": speedup},
            "bench-strategies-memory.png": {"peak RSS per rank (MB) vs frames": memory}}


def _block_pipeline(doc: pathlib.Path) -> dict:
    time, memory = {}, {}
    for r in tables(doc)[0]:
        name = f"{r['workers']} worker{'s' * (r['workers'] != '1')}, decode {r['decode']}"
        _add(time, name, _number(r["frames"]), _number(r["wall (s)"]))
        _add(memory, name, _number(r["frames"]), _number(r["peak RSS / worker (MiB)"]))
    keep = {k for k, v in time.items() if len(v) > 1}  # lines, not single points
    return {"bench-block-pipeline.png": {"wall seconds vs frames": {k: time[k] for k in keep},
                                        "peak RSS per rank (MiB) vs frames": {k: memory[k] for k in keep}}}


def _quality(doc: pathlib.Path) -> dict:
    colour, windows = {}, {}
    for r in tables(doc)[0]:
        multiple = _number(r["length"])
        _add(colour, r["method"], multiple, _number(r["colour"]))
        _add(windows, r["method"], multiple, _number(r["direction, per window"]))
    return {"quality.png": {"colour kept vs length (x native)": colour,
                            "windows moving the named way vs length (x native)": windows}}


def _load(doc: pathlib.Path) -> dict:
    latency = {}
    for i, r in enumerate(row for table in tables(doc) for row in table):
        name = f"run {i + 1}: {r['workers']} workers, {r['jobs']} jobs"
        for at, column in ((50, "placement p50 s"), (99, "p99 s"), (100, "max s")):
            _add(latency, name, at, _number(r[column]))
    return {"bench-load.png": {"placement latency (s) vs percentile": latency}}


FIGURES = {"bench-strategies.md": _strategies, "bench-block-pipeline.md": _block_pipeline,
           "quality.md": _quality, "bench-load.md": _load}
LOG_LOG = {"bench-strategies-time.png"}


def series(doc: pathlib.Path, kind: str | None = None) -> dict:
    """`kind`: which doc's tables these are (a name in FIGURES), where the file is named otherwise
    (a bench's --output elsewhere); by default the file's own name."""
    return FIGURES[kind or doc.name](doc)


def draw(doc, kind: str | None = None) -> list[pathlib.Path]:
    """Draws the doc's figures beside it from its tables and links them from its `figures` section."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc, written = pathlib.Path(doc), []
    for name, panels in series(doc, kind).items():
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (title, lines) in zip(axes[0], panels.items()):
            for line, points in sorted(lines.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=line)
            if "speed-up" in title:  # the ideal, N workers N times as fast
                top = max((x for points in lines.values() for x, _ in points), default=1)
                ax.plot([1, top], [1, top], "k--", linewidth=0.8, label="ideal")
            if name in LOG_LOG:
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = doc.with_name(name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    links = "\n\n".join(f"![{p.stem}]({p.name})" for p in written)
    write_section(doc, "figures", f"## Figures\n\nDrawn from the tables above by `python -m bench.plots` "
                                  f"(each bench redraws its own after writing them):\n\n{links}")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", nargs="*", type=pathlib.Path, default=[DOCS / name for name in FIGURES])
    for doc in parser.parse_args().docs:
        for path in draw(doc):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
