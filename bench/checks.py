"""The strategies benchmark's targets, checked against its rows (measured, or estimated where a
budget skipped a row: those verdicts say "(est.)")."""

from __future__ import annotations

from bench.rows import Row, find, seconds


def checks(rows: list[Row], frames: list[int], workers: list[int]) -> list[str]:
    """The targets. With other --frames than 129,257,513 the smallest / middle / largest
    frame count stand in for 129 / 257 / 513."""
    small, mid, large = frames[0], frames[len(frames) // 2], frames[-1]
    one, many = min(workers), max(workers)
    out = []

    def verdict(name: str, value: float | None, target: str, ok: bool | None, est: bool = False, why: str = ""):
        if value is None:
            out.append(f"- n/a {name}: {why or 'a row it needs did not run'} (target {target})")
        else:
            tag = "PASS" if ok else "MISS"
            out.append(f"- {tag}{' (est.)' if est else ''} {name}: {value:.2f}x (target {target})")

    def ratio(a: tuple[float | None, bool], b: tuple[float | None, bool]):
        if a[0] is None or b[0] is None or not b[0]:
            return None, False
        return a[0] / b[0], a[1] or b[1]

    def workers_(w: int) -> str:
        return f"{w} worker{'s' * (w > 1)}"

    for w in sorted(set(workers)):
        lo, hi = seconds(find(rows, "clip_parallel", w, small)), seconds(find(rows, "clip_parallel", w, large))
        v, est = ratio((hi[0] / large if hi[0] else None, hi[1]), (lo[0] / small if lo[0] else None, lo[1]))
        verdict(f"clip_parallel seconds per frame at {large} / at {small} frames ({workers_(w)})",
                v, "<= 1.15x", v is not None and v <= 1.15, est)
    for w in sorted(set(workers)):
        v, est = ratio(seconds(find(rows, "exact", w, large)), seconds(find(rows, "clip_parallel", w, large)))
        verdict(f"clip_parallel speedup over exact (exact seconds / clip_parallel seconds) at {large} frames "
                f"({workers_(w)})", v, ">= 3x", v is not None and v >= 3.0, est)
    if many > one:
        v, est = ratio(seconds(find(rows, "clip_parallel", one, mid)), seconds(find(rows, "clip_parallel", many, mid)))
        verdict(f"clip_parallel speedup, {many} workers over {one}, at {mid} frames", v, ">= 1.8x",
                v is not None and v >= 1.8, est)
    cp = find(rows, "clip_parallel", many, mid)
    if cp is not None and cp.status == "ok" and cp.comm_frac is not None:
        out.append(f"- {'PASS' if cp.comm_frac <= 0.05 else 'MISS'} clip_parallel communication share of step time "
                   f"at {mid} frames ({many} workers): {100 * cp.comm_frac:.1f}% ({cp.comm_s:.3f} s of "
                   f"{cp.step_s:.2f} s per step, {cp.comm_mb:.2f} MB) (target <= 5%)")
    else:
        out.append(f"- n/a clip_parallel communication share of step time at {mid} frames ({many} workers): "
                   "row did not run (target <= 5%)")
    if many > one:
        a, b = find(rows, "clip_parallel", many, large), find(rows, "clip_parallel", one, large)
        if a is not None and b is not None and a.status == b.status == "ok" and b.rss_delta:
            v = a.rss_delta / b.rss_delta
            out.append(f"- {'PASS' if v <= 0.6 else 'MISS'} clip_parallel peak RSS growth over the loaded model per "
                       f"worker, {many} workers / {one}, at {large} frames: {v:.2f}x ({a.rss_delta:.0f} MB vs "
                       f"{b.rss_delta:.0f} MB; absolute peaks {a.rss_abs:.0f} vs {b.rss_abs:.0f} MB = "
                       f"{a.rss_abs / b.rss_abs:.2f}x) (target <= 0.6x)")
        else:
            verdict(f"clip_parallel peak RSS per worker, {many} workers / {one}, at {large} frames", None, "<= 0.6x",
                    None, why="a row it needs did not run (memory is not estimated)")
    for f in sorted({small, mid}):
        if many < 2:
            break
        v, est = ratio(seconds(find(rows, "exact", many, f)), seconds(find(rows, "diffusers_ulysses", many, f)))
        verdict(f"exact / Ulysses seconds at {f} frames ({many} processes each)", v, "<= 1.0x",
                v is not None and v <= 1.0, est)
    return out
