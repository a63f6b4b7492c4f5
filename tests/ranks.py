"""Ranks for the equivalence tests: each rank a real process, all joined in one gloo Mesh over
loopback (rank 0 hosts the store on a free port and hands the port to the others).

The processes are a pool kept for the session: a fresh spawn imports torch and diffusers again
(about 4 CPU-seconds a rank, over 70 calls in the suite), while a pooled process only opens a new
process group per call, as a worker daemon does per job. A call that fails or times out kills the
pool, so the next call starts from fresh processes and no state of a broken call survives."""

from __future__ import annotations

import itertools
import queue
import traceback

import pytest
import torch
import torch.multiprocessing as mp


def _entry(target, rank, world_size, group, args, port_q):
    """One rank of one call: its return value, or raises."""
    from clipmesh.worker.mesh import Mesh, host_store

    store = None
    if rank == 0:
        store, port = host_store("127.0.0.1", timeout_s=60)
        for _ in range(world_size - 1):
            port_q.put(port)
    else:
        port = port_q.get(timeout=60)
    with Mesh.open("127.0.0.1", port, rank, world_size, group, timeout_s=60, store=store) as mesh:
        return target(mesh, *args)


def _serve(tasks, port_q, result_q):
    torch.set_num_threads(1)  # the same reduction order in every rank, and it spares the 2 cores
    while (task := tasks.get()) is not None:
        call, target, rank, world_size, group, args = task
        try:
            result_q.put((call, rank, None, _entry(target, rank, world_size, group, args, port_q)))
        except BaseException:
            result_q.put((call, rank, traceback.format_exc(), None))


class _Pool:
    def __init__(self):
        self.ctx, self.procs, self.calls = mp.get_context("spawn"), [], itertools.count()
        self.port_q, self.result_q = self.ctx.Queue(), self.ctx.Queue()

    def run(self, target, world_size: int, args, group: str, timeout: float) -> dict[int, object]:
        while len(self.procs) < world_size:
            tasks = self.ctx.Queue()
            proc = self.ctx.Process(target=_serve, args=(tasks, self.port_q, self.result_q), daemon=True)
            proc.start()
            self.procs.append((proc, tasks))
        call = next(self.calls)
        for rank in range(world_size):
            self.procs[rank][1].put((call, target, rank, world_size, group, args))
        results, errors = {}, {}
        try:
            for _ in range(world_size):
                got, rank, error, result = self.result_q.get(timeout=timeout)
                assert got == call, f"a result of call {got} during call {call}"
                results[rank] = result
                if error:
                    errors[rank] = error
        except queue.Empty:
            self.kill()
            pytest.fail(f"ranks {sorted(set(range(world_size)) - set(results))} never reported" + "".join(
                f"\nrank {rank} failed:\n{error}" for rank, error in sorted(errors.items())))
        if errors:
            self.kill()
            pytest.fail("\n".join(f"rank {rank} failed:\n{error}" for rank, error in sorted(errors.items())))
        return results

    def kill(self) -> None:
        for proc, _ in self.procs:
            proc.kill()
            proc.join(10)
        self.__init__()


_POOL: _Pool | None = None


def run_ranks(target, world_size: int, *args, group: str = "test", timeout: float = 150,
              fresh: bool = False) -> dict[int, object]:
    """Runs `target(mesh, *args)` on `world_size` ranks (the session's pooled processes; `fresh`:
    new ones, for what a process's past would hide, such as its peak memory); returns rank -> its
    return value. A rank that raises fails the test with its traceback. `target` must be a
    module-level function (it is pickled by name) and return something picklable."""
    global _POOL
    if fresh:
        pool = _Pool()
        try:
            return pool.run(target, world_size, args, group, timeout)
        finally:
            pool.kill()
    _POOL = _POOL or _Pool()
    return _POOL.run(target, world_size, args, group, timeout)


def single_thread_model(folder):
    """Fixture body: the model loaded in this process with 1 thread while the test module runs,
    like the ranks (the same reduction order, so in-process references compare bit for bit)."""
    from clipmesh.worker.adapters import load_adapter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_adapter(folder, "cpu", torch.float32)
    finally:
        torch.set_num_threads(threads)


def solo_mesh(group: str):
    """A one-rank Mesh in this process (a context manager): the runner's path with world size 1."""
    from clipmesh.worker.mesh import Mesh, host_store

    store, port = host_store("127.0.0.1", timeout_s=30)
    return Mesh.open("127.0.0.1", port, 0, 1, group, timeout_s=30, store=store)
