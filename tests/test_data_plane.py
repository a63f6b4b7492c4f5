"""The data plane's protection (worker/mesh.py): rank 0's store listens on the advertised
address only, a group is met in the store only with the rendezvous secret, and every rank must
prove it holds the secret on joining. Real spawned ranks over gloo."""

from __future__ import annotations

import datetime

import torch.distributed as dist
import torch.multiprocessing as mp

from ranks import run_ranks


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        found += [f[1].rsplit(":", 1)[0] for f in map(str.split, lines) if f[1].endswith(f":{port:04X}") and f[3] == "0A"]
    return found


def test_the_store_listens_on_the_advertised_address_only():
    from clipmesh.worker.mesh import host_store

    store, port = host_store("127.0.0.1", timeout_s=10)
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only
    # a stock TCPStore master, for contrast, listens on every interface
    stock = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    assert set(listening_addresses(stock.port)) <= {"00000000", "0" * 32} and listening_addresses(stock.port)
    del store, stock


def _prove(mesh, secrets: list[str]) -> str:
    try:
        mesh._prove_membership("job-group", secrets[mesh.rank])
    except RuntimeError as exc:
        return str(exc)
    return "ok"


def test_every_rank_must_prove_it_holds_the_secret():
    assert run_ranks(_prove, 2, ["s", "s"]) == {0: "ok", 1: "ok"}
    refused = run_ranks(_prove, 2, ["s", "not-s"])  # rank 1 did not get the rendezvous's secret
    assert refused[0] == "ranks [1] of group job-group do not hold its secret"
    assert refused[1] == "ranks [0] of group job-group do not hold its secret"


def _join(rank: int, port_q, result_q, secret: str) -> None:
    from clipmesh.worker.mesh import Mesh, host_store

    store = None
    try:
        if rank == 0:
            store, port = host_store("127.0.0.1", timeout_s=5)
            port_q.put(port)
        else:
            port = port_q.get(timeout=60)
        with Mesh.open("127.0.0.1", port, rank, 2, "job-group", timeout_s=4, store=store, secret=secret):
            result_q.put((rank, "joined"))
    except Exception as exc:
        result_q.put((rank, type(exc).__name__))


def test_a_peer_without_the_secret_never_meets_the_group():
    """It knows the store's address and the group's name, not the secret: nobody joins."""
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_join, args=(rank, port_q, result_q, secret), daemon=True)
             for rank, secret in ((0, "the-jobs-secret"), (1, ""))]
    for p in procs:
        p.start()
    results = dict(result_q.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
    assert "joined" not in results.values(), results
    assert set(results) == {0, 1}
