"""Spawned ranks for the equivalence tests: each rank a real process, all joined in one gloo
Mesh over loopback (rank 0 hosts the store on a free port and hands the port to the others)."""

from __future__ import annotations

import queue
import traceback

import pytest
import torch
import torch.multiprocessing as mp


def _entry(target, rank, world_size, group, args, port_q, result_q):
    torch.set_num_threads(1)  # the same reduction order in every rank, and it spares the 2 cores
    try:
        from clipmesh.worker.mesh import Mesh, host_store

        store = None
        if rank == 0:
            store, port = host_store("127.0.0.1", timeout_s=60)
            for _ in range(world_size - 1):
                port_q.put(port)
        else:
            port = port_q.get(timeout=60)
        with Mesh.open("127.0.0.1", port, rank, world_size, group, timeout_s=60, store=store) as mesh:
            result = target(mesh, *args)
        result_q.put((rank, None, result))
    except BaseException:
        result_q.put((rank, traceback.format_exc(), None))


def run_ranks(target, world_size: int, *args, group: str = "test", timeout: float = 150) -> dict[int, object]:
    """Runs `target(mesh, *args)` on `world_size` spawned ranks; returns rank -> its return value.
    A rank that raises fails the test with its traceback. `target` must be a module-level
    function (spawn pickles it) and return something picklable."""
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(target, r, world_size, group, args, port_q, result_q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in procs:
            rank, error, result = result_q.get(timeout=timeout)
            results[rank] = result
            if error:
                errors[rank] = error
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(world_size)) - set(results))} never reported")
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    if errors:
        pytest.fail("\n".join(f"rank {rank} failed:\n{error}" for rank, error in sorted(errors.items())))
    return results


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
