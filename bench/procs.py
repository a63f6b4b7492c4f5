"""Rank processes: one fresh spawned process per rank (so a row's peak RSS is its own), their
results collected by the parent, and every one of them stopped on any exit of the parent
(an error on one rank, the budget, Ctrl-C, SIGTERM, or the parent dying by SIGKILL)."""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from bench.common import THREADS

LIVE: list = []  # child processes of the ranks now running


# --------------------------------------------------------------------------------------------
# in the child
# --------------------------------------------------------------------------------------------

def maxrss_mb() -> float:
    """This process's peak resident set size so far, in MB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def watch_parent(parent_pid: int) -> None:
    """Exit if the bench process dies without stopping us (e.g. SIGKILL): no rank is left behind."""
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def quiet() -> None:
    """No warnings or progress bars from diffusers / transformers in the ranks' output."""
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


def _child(run, cfg: dict, rank: int, port_q, result_q) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops every rank itself
    watch_parent(cfg["parent_pid"])
    try:
        import torch

        torch.set_num_threads(cfg["threads"])
        quiet()
        result = run(cfg, rank, port_q)
        result["rank"] = rank
        result_q.put(result)
    except BaseException:
        result_q.put({"rank": rank, "error": traceback.format_exc(limit=8)})


# --------------------------------------------------------------------------------------------
# in the parent
# --------------------------------------------------------------------------------------------

def stop(procs, grace_s: float = 0.0) -> None:
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
        if p in LIVE:
            LIVE.remove(p)


def stop_all() -> None:
    stop(list(LIVE))


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # same cleanup path as Ctrl-C


def stop_ranks_on_exit() -> None:
    """In the parent, once: SIGTERM acts as Ctrl-C, and any exit stops the ranks still running."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(stop_all)


@dataclass
class Outcome:
    ranks: list[dict] | None  # every rank's result, by rank; None unless all of them finished
    error: str = ""           # "rank 1: ValueError: ...", "bench-x-rank0 exited with code -9"
    killed: bool = False      # stopped at the deadline
    seconds: float = 0.0      # from the first start until every rank had exited


def run_ranks(run, cfg: dict, workers: int, name: str, deadline: float | None = None) -> Outcome:
    """`run(cfg, rank, port_q) -> dict` on `workers` fresh spawned processes (module-level `run`,
    picklable cfg; cfg["threads"] torch threads each, default THREADS); their results by rank.
    deadline: time.monotonic() after which the ranks are killed."""
    threads = cfg.get("threads", THREADS)
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    cfg = dict(cfg, workers=workers, threads=threads, parent_pid=os.getpid())
    procs = [ctx.Process(target=_child, args=(run, cfg, r, port_q, result_q), name=f"bench-{name}-rank{r}",
                         daemon=True) for r in range(workers)]
    started, results, out = time.monotonic(), {}, Outcome(None)
    try:
        for p in procs:
            LIVE.append(p)
            p.start()
        while len(results) < len(procs) and not out.error:
            try:
                msg = result_q.get(timeout=1.0)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    out.killed, out.error = True, f"killed at the budget after {time.monotonic() - started:.0f} s"
                    break
                dead = [p for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if not dead:
                    continue
                try:  # a rank that finished may have exited just before its result arrived
                    msg = result_q.get(timeout=5.0)
                except queue.Empty:
                    out.error = f"{dead[0].name} exited with code {dead[0].exitcode}"
                    continue
            if "error" in msg:
                out.error = f"rank {msg['rank']}: " + msg["error"].strip().splitlines()[-1]
                print(msg["error"], file=sys.stderr)
            else:
                results[msg["rank"]] = msg
    finally:
        stop(procs, grace_s=60.0 if not out.error and len(results) == len(procs) else 0.0)
        for q in (port_q, result_q):
            q.close()
            q.join_thread()
    out.seconds = time.monotonic() - started  # with start-up and teardown
    if not out.error:
        out.ranks = [results[r] for r in range(workers)]
    return out
