"""Benchmark clipmesh's strategies against diffusers on long videos: denoising time, traffic, memory.

Why: clip_parallel (Video-Infinity) promises time linear in the video length, workers that
add speed, little traffic and a per-worker memory share; `exact` promises the single-device
result no slower than diffusers' own sequence parallelism. This script measures all of it on
one machine and checks those promises. Rows, per frame count:

  exact, clip_parallel    clipmesh `denoise` (the production loop, plans from the planner's
                          make_plan) at each --workers count, every rank a real spawned
                          process with 1 thread, ranks joined over gloo on loopback
  vanilla                 diffusers' WanPipeline in one process (1 thread)
  ulysses                 diffusers' context parallelism, ContextParallelConfig(ulysses_degree=W)
                          via transformer.enable_parallelism, W processes on gloo

Every row runs in fresh processes (so peak RSS is the row's own) and starts from the same
initial noise, so rows can be compared with vanilla's result (max |diff| column).

    python bench/bench_strategies.py                      # bench-wan, 129/257/513 frames, 256x256, 2 steps
    python bench/bench_strategies.py --budget-minutes 30  # skip rows whose estimate would not fit
    python bench/bench_strategies.py --model tiny-wan --frames 17,33 --size 64 --steps 1   # smoke test
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import multiprocessing as mp
import os
import pathlib
import platform
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW_KINDS = ("exact", "clip_parallel", "vanilla", "ulysses")
CLIPMESH_KINDS = ("exact", "clip_parallel")
QUADRATIC_KINDS = ("exact", "vanilla", "ulysses")  # full self-attention over the whole video
PROMPT = "a lighthouse on a cliff at dusk, waves rolling in"
GUIDANCE = 5.0  # > 1: classifier-free guidance, two transformer calls per step (as in Wan)
SEED = 0
THREADS = 1  # per process, every row: rows differ by strategy and process count only
GROUP_TIMEOUT_S = 3600  # collectives' timeout; a dead peer is noticed by the parent long before
_LIVE: list = []  # child processes of the row now running (stopped on any exit of the parent)


# --------------------------------------------------------------------------------------------
# child processes (one per rank; fresh for every row)
# --------------------------------------------------------------------------------------------

def _maxrss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _watch_parent(parent_pid: int) -> None:
    """Exit if the bench process dies without stopping us (e.g. SIGKILL): no rank is left behind."""
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:
        pass


def _rendezvous(rank: int, world: int, port_q):
    """Rank 0 hosts the TCPStore on a free port and hands the port to the others."""
    from clipmesh.worker.mesh import host_store

    if rank == 0:
        store, port = host_store("127.0.0.1", timeout_s=GROUP_TIMEOUT_S)
        for _ in range(world - 1):
            port_q.put(port)
        return store, port
    return None, port_q.get(timeout=900)


def _plan(cfg: dict, info):
    """The RenderPlan production would make: the coordinator's own make_plan (resolved
    clip_parallel options, clip split, halo floor) over equal-speed workers."""
    from clipmesh.coordinator.planner import make_plan
    from clipmesh.v1 import clipmesh_pb2 as pb

    req = pb.SubmitJobRequest(prompt=PROMPT, num_frames=cfg["frames"], height=cfg["size"], width=cfg["size"],
                              num_inference_steps=cfg["steps"], guidance_scale=GUIDANCE, seed=SEED,
                              model=cfg["model"], strategy=cfg["kind"], num_workers=cfg["workers"])
    job = pb.Job(id=f"bench-{cfg['kind']}-{cfg['workers']}w-{cfg['frames']}f", request=req)
    members = [pb.WorkerInfo(id=f"bench-{r}", host="127.0.0.1", device="cpu", threads=THREADS, model=info, speed=1.0)
               for r in range(cfg["workers"])]
    return make_plan(job, members, info, GROUP_TIMEOUT_S)


def _run_clipmesh(cfg: dict, rank: int, port_q) -> dict:
    import torch
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.mesh import Mesh
    from clipmesh.worker.render import denoise

    model = load_adapter(cfg["folder"], "cpu", torch.float32)
    plan = _plan(cfg, model.model_info(cfg["model"]))
    began = time.perf_counter()
    model.encode_prompt(PROMPT, "", GUIDANCE)  # timed for the footnote (denoise encodes again, inside the clock)
    encode_s = time.perf_counter() - began
    rss_loaded = _maxrss_mb()
    store, port = _rendezvous(rank, cfg["workers"], port_q)
    with Mesh.open("127.0.0.1", port, rank, cfg["workers"], plan.group_name, timeout_s=GROUP_TIMEOUT_S,
                   store=store) as mesh:
        take_stats = mesh.take_stats if hasattr(mesh, "take_stats") else None
        steps: list[dict] = []
        stamps: list[float] = []

        def on_step(report) -> None:
            # A step's time is the interval between step ends: it includes the cancel check
            # (a collective) at the step's start, which the counters count too, so comm <= step.
            stamps.append(time.perf_counter())
            # render.py may fill the report from take_stats itself, or not: the sum counts each byte once
            sent = getattr(report, "bytes_sent", 0)
            received = getattr(report, "bytes_received", 0)
            seconds = getattr(report, "comm_seconds", 0.0)
            if take_stats is not None:
                s, r, c = take_stats()
                sent, received, seconds = sent + s, received + r, seconds + c
            steps.append(dict(seconds=stamps[-1] - (stamps[-2] if len(stamps) > 1 else began),
                              bytes=sent + received, comm_seconds=seconds))

        mesh.any(False)  # everyone loaded: start the clock together
        if take_stats is not None:
            take_stats()  # drop the rendezvous' own traffic
        began = time.perf_counter()
        latents = denoise(model, plan, rank, mesh, on_step=on_step)
        wall = time.perf_counter() - began
    comm = take_stats is not None or any(s["bytes"] or s["comm_seconds"] for s in steps)
    return dict(wall=wall, steps=steps, comm=comm, rss_loaded=rss_loaded, rss_peak=_maxrss_mb(), encode_s=encode_s,
                clips=[(c.start, c.end) for c in plan.clips],
                latents=latents.float().numpy() if rank == 0 and cfg["keep_latents"] else None)


def _run_diffusers(cfg: dict, rank: int, port_q) -> dict:
    """vanilla (1 process) or ulysses (W processes): WanPipeline.__call__ with prompt embeddings
    and initial latents given and output_type="latent", so only the denoising loop is timed."""
    import torch

    ulysses = cfg["kind"] == "ulysses"
    if ulysses and torch.accelerator.device_count() == 0:
        # CPU-only torch: ModelMixin._resolve_parallel_config picks its device as
        # `rank % torch.accelerator.device_count()`, a division by zero without an accelerator.
        # With 1 it picks torch.device("cpu", rank % 1), and the DeviceMesh is a CPU (gloo) mesh.
        torch.accelerator.device_count = lambda: 1
    from clipmesh.worker.adapters.wan import MAX_SEQUENCE_LENGTH, load_wan
    from clipmesh.worker.mesh import Mesh
    from clipmesh.worker.noise import initial_noise

    pipe = load_wan(cfg["folder"], "cpu", torch.float32)
    began = time.perf_counter()
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt=PROMPT, negative_prompt=None,
                                          do_classifier_free_guidance=GUIDANCE > 1.0,
                                          max_sequence_length=MAX_SEQUENCE_LENGTH, device="cpu")
    encode_s = time.perf_counter() - began
    side = cfg["size"] // pipe.vae_scale_factor_spatial
    # the very noise clipmesh starts from (per-frame seeds), so the results are comparable
    latents = initial_noise(SEED, 0, cfg["latent"], pipe.transformer.config.in_channels, side, side) \
        * pipe.scheduler.init_noise_sigma
    rss_loaded = _maxrss_mb()

    mesh, seq_per_rank = None, []
    try:
        if ulysses:
            from diffusers import ContextParallelConfig

            store, port = _rendezvous(rank, cfg["workers"], port_q)
            mesh = Mesh.open("127.0.0.1", port, rank, cfg["workers"], f"bench-ulysses-{cfg['frames']}",
                             timeout_s=GROUP_TIMEOUT_S, store=store)
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cfg["workers"]))
            # proof that the sequence really is split: the first block's output length on this rank
            pipe.transformer.blocks[0].register_forward_hook(lambda m, a, out: seq_per_rank.append(out.shape[1]))
            mesh.any(False)  # everyone loaded and parallelised: start the clock together
        stamps: list[float] = []

        def on_step_end(pipeline, i, t, kwargs):
            stamps.append(time.perf_counter())
            return {}

        began = time.perf_counter()
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, num_frames=cfg["frames"],
                   height=cfg["size"], width=cfg["size"], num_inference_steps=cfg["steps"], guidance_scale=GUIDANCE,
                   output_type="latent", callback_on_step_end=on_step_end).frames
        wall = time.perf_counter() - began
    finally:
        if mesh is not None:
            mesh.close()
    edges = [began] + stamps
    steps = [dict(seconds=b - a, bytes=0, comm_seconds=0.0) for a, b in zip(edges, edges[1:])]
    return dict(wall=wall, steps=steps, comm=False, rss_loaded=rss_loaded, rss_peak=_maxrss_mb(), encode_s=encode_s,
                seq_per_rank=seq_per_rank[0] if seq_per_rank else None,
                latents=out.float().numpy() if rank == 0 and cfg["keep_latents"] else None)


def _child(cfg: dict, rank: int, port_q, result_q) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops every rank itself
    _watch_parent(cfg["parent_pid"])
    try:
        import torch

        torch.set_num_threads(cfg["threads"])
        _quiet()
        run = _run_clipmesh if cfg["kind"] in CLIPMESH_KINDS else _run_diffusers
        result = run(cfg, rank, port_q)
        result["rank"] = rank
        result_q.put(result)
    except BaseException:
        result_q.put({"rank": rank, "error": traceback.format_exc(limit=8)})


# --------------------------------------------------------------------------------------------
# the parent: one row at a time, everything cleaned up
# --------------------------------------------------------------------------------------------

def _stop(procs, grace_s: float = 0.0) -> None:
    """Let procs exit within grace_s, then SIGTERM, then SIGKILL; always reaps them."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is not None:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    for p in procs:
        if p in _LIVE:
            _LIVE.remove(p)


def _stop_all() -> None:
    _stop(list(_LIVE))


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # same cleanup path as Ctrl-C


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
    comm_s: float | None = None
    comm_mb: float | None = None
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


def run_row(row: Row, settings: dict, deadline: float | None) -> None:
    """Run one row in fresh processes; fill it in. deadline: time.monotonic() after which it is killed."""
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    cfg = dict(settings, kind=row.kind, workers=row.workers, frames=row.frames, latent=row.latent,
               threads=THREADS, parent_pid=os.getpid())
    procs = [ctx.Process(target=_child, args=(cfg, r, port_q, result_q), name=f"bench-{row.label}-rank{r}",
                         daemon=True) for r in range(row.workers)]
    started, results, error = time.monotonic(), {}, None
    try:
        for p in procs:
            _LIVE.append(p)
            p.start()
        while len(results) < len(procs) and error is None:
            try:
                msg = result_q.get(timeout=1.0)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    row.status, row.note = "killed", f"killed at the budget after {time.monotonic() - started:.0f} s"
                    return
                dead = [p for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead:
                    try:  # a rank that finished may have exited just before its result arrived
                        msg = result_q.get(timeout=5.0)
                    except queue.Empty:
                        error = f"{dead[0].name} exited with code {dead[0].exitcode}"
                        continue
                else:
                    continue
            if "error" in msg:
                error = f"rank {msg['rank']}: " + msg["error"].strip().splitlines()[-1]
                print(msg["error"], file=sys.stderr)
            else:
                results[msg["rank"]] = msg
    finally:
        _stop(procs, grace_s=60.0 if error is None and len(results) == len(procs) else 0.0)
        for q in (port_q, result_q):
            q.close()
            q.join_thread()
    if error:
        row.status, row.note = "error", "error: " + error[:160]
        return
    _fill(row, [results[r] for r in range(len(procs))], time.monotonic() - started)


def _fill(row: Row, ranks: list[dict], total: float) -> None:
    row.status = "ok"
    row.wall = max(r["wall"] for r in ranks)  # the job is done when the slowest rank is
    row.overhead = max(0.0, total - row.wall)
    row.step_s = max(sum(s["seconds"] for s in r["steps"]) / max(1, len(r["steps"])) for r in ranks)
    if ranks[0]["comm"]:
        per_rank = []
        for r in ranks:
            n = max(1, len(r["steps"]))
            comm_s = sum(s["comm_seconds"] for s in r["steps"]) / n
            step_s = sum(s["seconds"] for s in r["steps"]) / n
            per_rank.append((comm_s, sum(s["bytes"] for s in r["steps"]) / n / 1e6, comm_s / step_s if step_s else 0))
        row.comm_s, row.comm_mb, row.comm_frac = (max(v[i] for v in per_rank) for i in range(3))
    row.rss_abs = max(r["rss_peak"] for r in ranks)
    row.rss_delta = max(r["rss_peak"] - r["rss_loaded"] for r in ranks)
    row.extra = dict(encode_s=max(r["encode_s"] for r in ranks), latents=ranks[0].get("latents"),
                     seq_per_rank=ranks[0].get("seq_per_rank"), clips=ranks[0].get("clips"))


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
    same = [(r.tokens, r.wall) for r in done if r.key == row.key]
    if same:
        return _fit(same, row.tokens, row.kind in QUADRATIC_KINDS)
    kin = [r for r in done if r.kind == row.kind]
    if kin:
        w = max(kin, key=lambda r: r.tokens).workers
        pts = [(r.tokens, r.wall * r.workers / row.workers) for r in kin if r.workers == w]
        return _fit(pts, row.tokens, row.kind in QUADRATIC_KINDS)
    full = [r for r in done if r.kind in QUADRATIC_KINDS]
    if full:
        ref = max(full, key=lambda r: r.tokens)
        return _fit([(ref.tokens, ref.wall * ref.workers / row.workers)], row.tokens, True)
    return None


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def _secs(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _sig(x: float) -> str:
    return f"{x:.3g}"


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
        lines.append(head + f" {_secs(r.wall)} | {_sig(r.wall / r.frames)} | {comm} | "
                            f"{r.rss_delta:.0f} ({r.rss_abs:.0f}) | {diff} |")
    return "\n".join(lines)


def _find(rows: list[Row], kind: str, workers: int, frames: int) -> Row | None:
    return next((r for r in rows if (r.kind, r.workers, r.frames) == (kind, workers, frames)), None)


def _seconds(row: Row | None) -> tuple[float | None, bool]:
    """Wall seconds of a row: measured, else its estimate (flagged), else None."""
    if row is None:
        return None, False
    if row.status == "ok":
        return row.wall, False
    if row.status == "skipped" and row.estimate is not None:  # not a row that failed or was killed
        return row.estimate, True
    return None, False


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

    for w in sorted(set(workers)):
        lo, hi = _seconds(_find(rows, "clip_parallel", w, small)), _seconds(_find(rows, "clip_parallel", w, large))
        v, est = ratio((hi[0] / large if hi[0] else None, hi[1]), (lo[0] / small if lo[0] else None, lo[1]))
        verdict(f"clip_parallel seconds per frame at {large} / at {small} frames ({w} worker{'s' * (w > 1)})",
                v, "<= 1.15x", v is not None and v <= 1.15, est)
    for w in sorted(set(workers)):
        v, est = ratio(_seconds(_find(rows, "exact", w, large)), _seconds(_find(rows, "clip_parallel", w, large)))
        verdict(f"clip_parallel speedup over exact (exact seconds / clip_parallel seconds) at {large} frames "
                f"({w} worker{'s' * (w > 1)})", v, ">= 3x", v is not None and v >= 3.0, est)
    if many > one:
        v, est = ratio(_seconds(_find(rows, "clip_parallel", one, mid)), _seconds(_find(rows, "clip_parallel", many, mid)))
        verdict(f"clip_parallel speedup, {many} workers over {one}, at {mid} frames", v, ">= 1.8x",
                v is not None and v >= 1.8, est)
    cp = _find(rows, "clip_parallel", many, mid)
    if cp is not None and cp.status == "ok" and cp.comm_frac is not None:
        out.append(f"- {'PASS' if cp.comm_frac <= 0.05 else 'MISS'} clip_parallel communication share of step time "
                   f"at {mid} frames ({many} workers): {100 * cp.comm_frac:.1f}% ({cp.comm_s:.3f} s of "
                   f"{cp.step_s:.2f} s per step, {cp.comm_mb:.2f} MB) (target <= 5%)")
    else:
        why = ("Mesh.take_stats does not exist yet" if cp is not None and cp.status == "ok" else "row did not run")
        out.append(f"- n/a clip_parallel communication share of step time at {mid} frames ({many} workers): {why} "
                   "(target <= 5%)")
    if many > one:
        a, b = _find(rows, "clip_parallel", many, large), _find(rows, "clip_parallel", one, large)
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
        v, est = ratio(_seconds(_find(rows, "exact", many, f)), _seconds(_find(rows, "ulysses", many, f)))
        verdict(f"exact / Ulysses seconds at {f} frames ({many} processes each)", v, "<= 1.0x",
                v is not None and v <= 1.0, est)
    return out


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _machine() -> str:
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


def footnotes(rows: list[Row], settings: dict, defaults: bool) -> list[str]:
    ok = [r for r in rows if r.status == "ok"]
    encode = max((r.extra.get("encode_s", 0.0) for r in ok if r.kind in CLIPMESH_KINDS), default=None)
    uly = [r for r in ok if r.kind == "ulysses"]
    seq = ", ".join(f"{r.frames} frames: {r.extra.get('seq_per_rank')} of {r.tokens} tokens" for r in uly)
    notes = [
        "How to read it:",
        "",
        "- **wall s**: denoising only, model load excluded, from a barrier after every rank has loaded; the slowest "
        "rank. clipmesh rows time `clipmesh.worker.render.denoise` (the production loop: prompt encoding, every "
        "step, the final all-gather of the latents; plans come from the coordinator's `make_plan` with the "
        "planner's clip_parallel defaults); prompt encoding with the preset's small UMT5 took "
        + (f"{encode:.3f} s" if encode is not None else "(not measured)") + ". vanilla and ulysses time "
        "`WanPipeline.__call__(prompt_embeds=..., negative_prompt_embeds=..., latents=..., output_type=\"latent\")`: "
        "text encoding and VAE decode are outside the clock. All rows start from the same initial noise.",
        "- **tokens**: latent frames x (side / spatial multiple)^2: the transformer's patches for Wan (8x VAE, "
        "2x2 patches); latent pixels for UNet3D. **s/frame**: wall seconds per output frame.",
        "- **comm**: per denoising step, the busiest rank's data-plane traffic (bytes sent + received) and time "
        "spent in collectives, from `Mesh.take_stats()` (and/or the StepReport fields); `n/a` where the mesh has no "
        "counters yet, and always for vanilla (no communication) and ulysses (its all-to-alls are diffusers' own, "
        "not counted by clipmesh's Mesh). comm % = comm seconds / step seconds, a step being the interval between "
        "step ends (it includes the cancel-check collective at the step's start). Collective time includes waiting "
        "for the slower rank to arrive, so imbalance shows up here too.",
        "- **peak RSS**: `resource.getrusage(RUSAGE_SELF).ru_maxrss` in each rank process (a fresh process per "
        "row): growth of the peak over its value right after the model was loaded (the denoising working set), "
        "and in parentheses the absolute peak; the largest over the ranks.",
        "- **max |diff| vs vanilla**: largest absolute difference of the final latents (rank 0) from the vanilla "
        "row's of the same length: ~1e-5 for exact and ulysses (the same computation, split), larger for "
        "clip_parallel, which is an approximation by design.",
        f"- Every process runs with {THREADS} thread (`torch.set_num_threads`); multi-process rows run their "
        "ranks side by side on this machine's cores, joined over gloo on loopback (127.0.0.1).",
        "- **ulysses**: diffusers' context parallelism, `transformer.enable_parallelism(config="
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
                  "`python bench/bench_strategies.py`."]
    return notes


# --------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--model", default="bench-wan")
    ap.add_argument("--frames", default="129,257,513")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="height = width")
    ap.add_argument("--rows", default=",".join(ROW_KINDS), help=f"any of {','.join(ROW_KINDS)}")
    ap.add_argument("--workers", default="1,2", help="worker counts of exact / clip_parallel; ulysses uses those > 1")
    ap.add_argument("--budget-minutes", type=float, default=0.0, help="0: no budget, run every row")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-strategies.md"))
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
    folder = model_folder(args.model)  # builds a preset once, here, not in racing children
    index = json.loads((folder / "model_index.json").read_text())
    denoiser = "transformer" if (folder / "transformer" / "config.json").is_file() else "unet"
    heads = json.loads((folder / denoiser / "config.json").read_text()).get("num_attention_heads", 0)
    if args.size % limits["spatial_multiple"]:
        ap.error(f"--size must be a multiple of {limits['spatial_multiple']} for {args.model}")
    from clipmesh.worker.strategies import STRATEGIES

    rows: list[Row] = []
    for f in frames:
        latent = num_latent_frames(f, limits["temporal_stride"])
        tokens = latent * (args.size // limits["spatial_multiple"]) ** 2
        specs = ([("vanilla", 1)] if "vanilla" in kinds else []) \
            + [("ulysses", w) for w in workers if w > 1 and "ulysses" in kinds] \
            + [(k, w) for k in CLIPMESH_KINDS if k in kinds for w in workers]
        for kind, w in specs:
            row = Row(kind, w, f, latent, tokens)
            if kind in CLIPMESH_KINDS and kind not in STRATEGIES:
                row.status, row.note = "n/a", f"not available (strategy '{kind}' not registered)"
            elif kind in ("vanilla", "ulysses") and index.get("_class_name") != "WanPipeline":
                row.status, row.note = "n/a", "not available (WanPipeline models only)"
            elif kind == "ulysses" and (tokens % w or heads % w):
                row.status, row.note = "n/a", f"not available ({tokens} tokens / {heads} heads not divisible by {w})"
            elif w > latent:
                row.status, row.note = "n/a", f"not available ({latent} latent frames < {w} workers)"
            rows.append(row)

    settings = dict(model=args.model, folder=str(folder), size=args.size, steps=args.steps,
                    keep_latents="vanilla" in kinds)
    # run order: shortest videos first (they feed the estimates); within a length the rows the
    # targets lean on first, so a budget cuts vanilla before clip_parallel
    priority = {"clip_parallel": 0, "exact": 1, "ulysses": 2, "vanilla": 3}
    todo = sorted((r for r in rows if r.status == "pending"), key=lambda r: (r.frames, priority[r.kind], r.workers))
    budget_s = args.budget_minutes * 60 or None
    load = (_load(),)
    began = time.monotonic()
    os.environ.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(_stop_all)
    print(f"{args.model}: {len(todo)} rows to run ({', '.join(r.label for r in todo)})", flush=True)
    try:
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
            shown = f"{row.wall:.1f} s" if row.status == "ok" else row.note
            print(f"  {row.label}: {shown}", flush=True)
    except KeyboardInterrupt:
        _stop_all()
        print("\ninterrupted: every rank stopped; partial table (not written):\n", file=sys.stderr)
        print(table(rows), file=sys.stderr)
        return 130
    finally:
        _stop_all()

    for f in frames:  # the reference: vanilla's result at the same length
        ref = _find(rows, "vanilla", 1, f)
        ref = ref.extra.get("latents") if ref is not None and ref.status == "ok" else None
        for r in rows:
            if r.frames == f and r.status == "ok" and r.extra.get("latents") is not None and ref is not None:
                r.diff = float(abs(r.extra["latents"] - ref).max())

    import diffusers
    import torch

    defaults = (args.model, frames, args.steps, args.size, kinds, workers) == \
        ("bench-wan", [129, 257, 513], 2, 256, list(ROW_KINDS), [1, 2])
    header = [
        "# Strategy benchmark: clipmesh exact / clip_parallel vs diffusers (vanilla, Ulysses)",
        "",
        f"- Machine: {_machine()}",
        f"- Software: torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}",
        f"- Settings: model {args.model}, frames {','.join(map(str, frames))}, {args.size}x{args.size}, "
        f"{args.steps} step{'s' * (args.steps != 1)}, guidance {GUIDANCE} (CFG: 2 transformer calls per step), fp32 "
        f"on CPU, {THREADS} thread per process, workers {','.join(map(str, workers))}, rows {','.join(kinds)}, "
        f"budget {f'{args.budget_minutes:g} min' if budget_s else 'none'}",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; the whole run took "
        f"{(time.monotonic() - began) / 60:.1f} min; load average (1 min) {load[0]:.2f} at the start, "
        f"{_load():.2f} at the end: more than the bench's own processes means the timings were contended",
        f"- Command: `python bench/bench_strategies.py {' '.join(sys.argv[1:])}`".rstrip() ,
        "",
    ]
    body = table(rows)
    derived = ["## Targets", ""] + checks(rows, frames, workers)
    print("\n" + body + "\n\n" + "\n".join(derived))
    text = "\n".join(header) + "\n" + body + "\n\n" + "\n".join(derived) + "\n\n" + "\n".join(
        footnotes(rows, settings, defaults)) + "\n"
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwritten to {out}")
    return 0 if all(r.status in ("ok", "n/a", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
