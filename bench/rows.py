"""A benchmark row (one kind, worker count and length), run in fresh processes and filled in
from its ranks' results; estimates of a row's seconds from the rows measured before it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench.procs import run_ranks
from bench.runners import DIFFUSERS_KINDS, run_rank
from clipmesh.specs import FRAMES, STRATEGY_SPECS

# clipmesh strategies that run through `denoise` (ranks split the frames), and diffusers' rows
CLIPMESH_KINDS = tuple(name for name, spec in STRATEGY_SPECS.items() if spec.partition == FRAMES)
ROW_KINDS = CLIPMESH_KINDS + DIFFUSERS_KINDS
LINEAR_KINDS = ("clip_parallel",)  # attention window bounded by design; every other kind attends to all frames


@dataclass
class Row:
    kind: str
    workers: int
    frames: int
    latent: int
    tokens: int
    status: str = "pending"   # ok | skipped | n/a | error | killed
    note: str = "not run"     # what the table shows instead of numbers
    estimate: float | None = None  # seconds of denoising, when estimated
    wall: float | None = None
    step_s: float | None = None
    comm_s: float | None = None    # per step, the busiest rank: seconds in collectives
    comm_mb: float | None = None   # ... and MB sent + received
    sent_mb: float | None = None   # ... and MB sent
    comm_frac: float | None = None
    rss_delta: float | None = None
    rss_abs: float | None = None
    overhead: float | None = None  # process start + model load + teardown
    diff: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.workers

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.workers}w-{self.frames}f"


def unavailable(kind: str, workers: int, latent: int, tokens: int, heads: int, family: str) -> str:
    """Why a row cannot run on this model ("" if it can): shown in the table instead of numbers."""
    spec = STRATEGY_SPECS.get(kind)
    if kind in DIFFUSERS_KINDS and family != "wan":
        return "not available (WanPipeline models only)"
    if spec is not None and family not in spec.families:
        return f"not available ({kind} does not run {family} models)"
    if kind == "diffusers_ulysses" and tokens % workers:  # its equipartition sharder needs equal shares
        return f"not available ({tokens} tokens not divisible by {workers})"
    if kind == "diffusers_ulysses" and heads % workers:
        return f"not available ({heads} heads not divisible by {workers})"
    if spec is not None and spec.splits_heads and heads % workers:
        return f"not available ({heads} heads not divisible by {workers})"
    if workers > latent:
        return f"not available ({latent} latent frames < {workers} workers)"
    return ""


def run_row(row: Row, settings: dict, deadline: float | None) -> None:
    """Run one row in fresh processes; fill it in. deadline: time.monotonic() after which it is killed."""
    cfg = dict(settings, kind=row.kind, frames=row.frames, latent=row.latent)
    out = run_ranks(run_rank, cfg, row.workers, row.label, deadline)
    if out.killed:
        row.status, row.note = "killed", out.error
    elif out.error:
        row.status, row.note = "error", "error: " + out.error[:160]
    else:
        fill(row, out.ranks, out.seconds)


def run_all(todo: list[Row], rows: list[Row], settings: dict, budget_s: float | None = None) -> None:
    """Run `todo` (rows of `rows`) one after the other, printing as they go. With a budget, a row
    whose estimate (from the rows measured before it, plus start-up) would not fit in what is left
    is skipped, and a row still running at 1.1x the budget is killed."""
    began = time.monotonic()
    for row in todo:
        row.estimate = estimate(row, rows)
        overhead = max((r.overhead for r in rows if r.overhead is not None), default=0.0)
        if budget_s is not None and row.estimate is not None:
            left = budget_s - (time.monotonic() - began)
            if row.estimate + overhead > left:
                row.status, row.note = "skipped", f"skipped (est. {row.estimate:.0f} s)"
                print(f"  {row.label}: skipped, estimated {row.estimate:.0f} s + {overhead:.0f} s start-up, "
                      f"{max(0, left):.0f} s of the budget left", flush=True)
                continue
        deadline = began + 1.1 * budget_s if budget_s is not None else None
        guess = f" (est. {row.estimate:.0f} s)" if row.estimate is not None else ""
        print(f"  {row.label}: running{guess} ...", flush=True)
        run_row(row, settings, deadline)
        print(f"  {row.label}: " + (f"{row.wall:.1f} s" if row.status == "ok" else row.note), flush=True)


def fill(row: Row, ranks: list[dict], total: float) -> None:
    row.status = "ok"
    row.wall = max(r["wall"] for r in ranks)  # the job is done when the slowest rank is
    row.overhead = max(0.0, total - row.wall)

    def per_step(r: dict, key: str) -> float:
        return sum(s[key] for s in r["steps"]) / max(1, len(r["steps"]))

    row.step_s = max(per_step(r, "seconds") for r in ranks)
    if ranks[0]["comm"]:
        row.comm_s = max(per_step(r, "comm_seconds") for r in ranks)
        row.comm_mb = max((per_step(r, "sent") + per_step(r, "received")) / 1e6 for r in ranks)
        row.sent_mb = max(per_step(r, "sent") / 1e6 for r in ranks)
        row.comm_frac = max(per_step(r, "comm_seconds") / per_step(r, "seconds") if per_step(r, "seconds") else 0.0
                            for r in ranks)
    row.rss_abs = max(r["rss_peak"] for r in ranks)
    row.rss_delta = max(r["rss_peak"] - r["rss_loaded"] for r in ranks)
    row.extra = dict(encode_s=max(r["encode_s"] for r in ranks), latents=ranks[0].get("latents"),
                     seq_per_rank=ranks[0].get("seq_per_rank"), clips=ranks[0].get("clips"))


def diff_against(rows: list[Row], reference: str = "vanilla") -> None:
    """Each row's max |diff| of its final latents from the `reference` row's of the same length."""
    for ref in rows:
        if ref.key != (reference, 1) or ref.status != "ok" or ref.extra.get("latents") is None:
            continue
        for r in rows:
            if r.frames == ref.frames and r.status == "ok" and r.extra.get("latents") is not None:
                r.diff = float(abs(r.extra["latents"] - ref.extra["latents"]).max())


def find(rows: list[Row], kind: str, workers: int, frames: int) -> Row | None:
    return next((r for r in rows if (r.kind, r.workers, r.frames) == (kind, workers, frames)), None)


def seconds(row: Row | None) -> tuple[float | None, bool]:
    """Wall seconds of a row: measured, else its estimate (flagged), else None."""
    if row is None:
        return None, False
    if row.status == "ok":
        return row.wall, False
    if row.status == "skipped" and row.estimate is not None:  # not a row that failed or was killed
        return row.estimate, True
    return None, False


# --------------------------------------------------------------------------------------------
# budget: estimates from the rows measured so far
# --------------------------------------------------------------------------------------------

def _fit(points: list[tuple[int, float]], tokens: int, quadratic: bool) -> float:
    """Seconds at `tokens` from measured (tokens, seconds): t = a*N + b*N^2 (a, b >= 0) through the
    two largest points; from one point, N^2 scaling for full-attention rows (attention dominates
    at these lengths, so this errs high) and linear scaling for clip_parallel (its attention
    window is bounded by design)."""
    pts = sorted(points)
    n0, t0 = pts[-1]
    if len(pts) >= 2 and pts[-2][0] != n0:
        n1, t1 = pts[-2]
        b = (t0 / n0 - t1 / n1) / (n0 - n1)
        a = t0 / n0 - b * n0
        if b < 0:
            a, b = t0 / n0, 0.0
        elif a < 0:
            a, b = 0.0, t0 / n0 ** 2
        return a * tokens + b * tokens ** 2
    return t0 * (tokens / n0) ** (2 if quadratic else 1)


def estimate(row: Row, rows: list[Row]) -> float | None:
    """Denoising seconds of `row`, from measured rows of the same kind and worker count, else
    (ideal split) of the same kind at another worker count, else of any full-attention row."""
    done = [r for r in rows if r.status == "ok" and r.wall is not None]
    quadratic = row.kind not in LINEAR_KINDS
    same = [(r.tokens, r.wall) for r in done if r.key == row.key]
    if same:
        return _fit(same, row.tokens, quadratic)
    kin = [r for r in done if r.kind == row.kind]
    if kin:
        w = max(kin, key=lambda r: r.tokens).workers
        pts = [(r.tokens, r.wall * r.workers / row.workers) for r in kin if r.workers == w]
        return _fit(pts, row.tokens, quadratic)
    full = [r for r in done if r.kind not in LINEAR_KINDS]
    if full:
        ref = max(full, key=lambda r: r.tokens)
        return _fit([(ref.tokens, ref.wall * ref.workers / row.workers)], row.tokens, True)
    return None
