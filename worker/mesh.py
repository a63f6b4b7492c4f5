"""The one module that owns torch.distributed process groups for a job (the data plane).

Why one owner: collectives hang if ranks disagree on the group or on the order of calls,
so every collective of a job goes through a `Mesh` that holds its group and passes
`group=` explicitly. World size 1 takes the same path (a gloo group of one), so the
single-worker case is not a special case that could drift.

Every collective can be left early: `abort()` (from another thread: the daemon, told a member
is lost) makes the rank's current and next waits raise MeshAborted, so the survivors of a
hung peer (SIGSTOP, a partition) are free in seconds, not after the collective timeout. Gloo
cannot cancel a posted operation, so with gloo every operation is posted async and waited on
through its future; NCCL's waits do not block the host, and its group is aborted instead.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 300
ABORT_POLL_S = 0.1  # how often a wait looks at the abort flag (an operation done wakes it at once)


# Gloo groups left with operations posted to a hung peer. Gloo cannot cancel them, and a group's
# destructor joins its threads, which wait out the collective timeout while the destructor holds
# the GIL: the whole daemon (its heartbeats included) would freeze. So an aborted group is never
# destroyed; it idles here once its operations time out.
_ABANDONED: list = []


class MeshAborted(RuntimeError):
    """The rank left a collective: its job was aborted, or a peer is gone (its connection broke)."""


def host_store(advertise_host: str, timeout_s: float = 300) -> tuple[dist.TCPStore, int]:
    """Rank 0: start the job's TCPStore on an OS-chosen port of `advertise_host` only (TCPStore
    alone listens on every interface); peers dial advertise_host:port. The master's own client
    dials it too, which proves the advertised address is reachable from here."""
    family = socket.AF_INET6 if ":" in advertise_host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((advertise_host, 0))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    store = dist.TCPStore(advertise_host, listener.getsockname()[1], world_size=None, is_master=True,
                          timeout=_timeout(timeout_s), wait_for_workers=False, master_listen_fd=listener.detach())
    return store, store.port


def _timeout(seconds: float) -> datetime.timedelta:
    # a plan's unset timeout_seconds is 0: fall back rather than time out at once
    return datetime.timedelta(seconds=seconds if seconds and seconds > 0 else DEFAULT_TIMEOUT_S)


def _interface_for(ip: str) -> str | None:
    """Linux: the network interface holding IPv4 `ip` (gloo must bind where peers can reach it)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                req = struct.pack("256s", name.encode()[:15])
                try:
                    addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
                except OSError:
                    continue
                if addr == ip:
                    return name
    except OSError:
        pass
    return None


@dataclass
class CommStats:
    """Data-plane traffic of one rank. Bytes are *logical*: the payload this rank delivered to
    (or got from) its peers, without the padding all_gather_uneven adds and without transport
    overhead; an all-gather counts its own share once per peer as sent and the other ranks'
    shares as received. Seconds are host wall time inside Mesh calls (on CUDA, where NCCL
    calls return once enqueued, that is the time to enqueue and wait, not the transfer)."""
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Mesh:
    """A job's process group: rank, world size, device, and the few collectives clipmesh needs."""

    def __init__(self, group, rank: int, world_size: int, device: torch.device, store, parent: "Mesh | None" = None):
        self.group, self.rank, self.world_size, self.device = group, rank, world_size, device
        self._store = store  # rank 0's master store must outlive the group
        self._open = parent is None  # a sub-mesh's group goes with its parent's
        self._root = parent._root if parent is not None else self  # one abort flag and one count per job
        self._aborted = self._root._aborted if parent is not None else threading.Event()
        self._groups = [group]  # the root's: its group and every sub-mesh's (NCCL aborts each)
        self.stats = CommStats()

    def split(self, groups: list[list[int]]) -> "Mesh":
        """This rank's sub-mesh among `groups` (lists of this mesh's ranks that partition it): a
        dimension of the job's mesh (specs.branches). Every rank passes the same groups in the
        same order (dist.new_group is collective). It shares this mesh's abort flag and traffic
        count, and goes when this mesh closes."""
        mine = None
        for ranks in groups:
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = Mesh(group, ranks.index(self.rank), len(ranks), self.device, None, parent=self)
                self._root._groups.append(group)
        if mine is None:
            raise ValueError(f"rank {self.rank} is in none of {groups}")
        return mine

    # -- leaving early ----------------------------------------------------------
    def abort(self) -> None:
        """Thread-safe: the rank's waits raise MeshAborted from now on (NCCL: the group is aborted)."""
        self._aborted.set()
        if self.device.type == "cuda":
            for group in self._root._groups:
                try:
                    group.abort()
                except Exception as exc:
                    log.warning("mesh abort (rank %d): %s", self.rank, exc)

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def _wait(self, work) -> None:
        """Waits for a posted operation unless the mesh is aborted first; raises its error."""
        if self._aborted.is_set():
            raise MeshAborted(f"rank {self.rank}: the job was aborted")
        if self.device.type == "cuda":
            return work.wait()
        done, error, threads = threading.Event(), [], []
        try:
            work.get_future().add_done_callback(lambda _: done.set())
        except RuntimeError:  # gloo's send/recv have no future (nor a working is_completed): a waiter thread
            def wait_in_thread():
                try:
                    work.wait()
                except BaseException as exc:
                    error.append(exc)
                done.set()
            threads.append(threading.Thread(target=wait_in_thread, name="clipmesh-p2p-wait", daemon=True))
            threads[0].start()
        while not done.wait(ABORT_POLL_S):
            if self._aborted.is_set():
                raise MeshAborted(f"rank {self.rank}: the job was aborted while waiting for a peer")
        try:
            if error:
                raise error[0]
            if not threads:
                work.wait()  # done: raises the operation's error, if any
        except RuntimeError as exc:  # gloo: the connection to a peer broke (it died, or aborted)
            raise MeshAborted(f"rank {self.rank}: a peer is gone: {exc}") from exc

    def take_stats(self) -> tuple[int, int, float]:
        """(bytes_sent, bytes_received, seconds) of every Mesh call since the last take_stats; resets."""
        root = self._root
        s, root.stats = root.stats, CommStats()
        return s.bytes_sent, s.bytes_received, s.seconds

    def _count(self, sent: int, received: int, began: float) -> None:
        stats = self._root.stats
        stats.bytes_sent += sent
        stats.bytes_received += received
        stats.seconds += time.perf_counter() - began

    @classmethod
    def open(cls, host: str, port: int, rank: int, world_size: int, group_name: str, backend: str = "",
             timeout_s: float = 300, store=None, device: torch.device | str = "cpu",
             local_host: str | None = None, secret: str = "") -> "Mesh":
        """Join the job's group. `store`: rank 0 passes the one from host_store; others dial host:port.

        `secret` (the rendezvous's): the group's keys live under it, so a peer without it cannot
        meet the group in the store; and every rank proves it holds it once the group is up.
        What it cannot do: gloo and NCCL sockets are unauthenticated and unencrypted, so whoever
        is on the network path can read and forge the traffic. Workers belong on a private network.

        `local_host`: this worker's advertised IPv4; with gloo it pins the interface gloo
        listens on (GLOO_SOCKET_IFNAME), otherwise gloo guesses from the hostname, which on
        many hosts resolves to loopback and makes multi-host groups hang.
        """
        device = torch.device(device)
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if dist.is_initialized():
            raise RuntimeError("a Mesh is already open in this process; close() it first")
        timeout = _timeout(timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        if backend == "gloo" and local_host and "GLOO_SOCKET_IFNAME" not in os.environ:
            ifname = _interface_for(local_host)
            if ifname:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        kwargs = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device  # eager NCCL init bound to this GPU
        # the prefix keeps this job's keys apart from any other job sharing the store
        prefix = f"{group_name}/{secret}" if secret else group_name
        dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank,
                                world_size=world_size, timeout=timeout, **kwargs)
        mesh = cls(dist.group.WORLD, rank, world_size, device, store)
        if secret:
            mesh._prove_membership(group_name, secret)
        return mesh

    def _prove_membership(self, group_name: str, secret: str) -> None:
        """Every rank shows an HMAC of its rank under the secret; a rank that cannot is not ours."""
        def proof(rank: int) -> torch.Tensor:
            digest = hmac.new(secret.encode(), f"{group_name}/{rank}".encode(), hashlib.sha256).digest()
            return torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(torch.int32)

        proofs = [torch.empty(32, dtype=torch.int32, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(proofs, proof(self.rank).to(self.device), group=self.group)
        strangers = [r for r, p in enumerate(proofs) if not torch.equal(p.cpu(), proof(r))]
        if strangers:
            self.close()
            raise RuntimeError(f"ranks {strangers} of group {group_name} do not hold its secret")

    def all_gather_uneven(self, tensor: torch.Tensor, sizes: list[int], dim: int) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, rank i contributing sizes[i] entries.

        Collectives need equal shapes, so each rank pads to max(sizes) and the pads are cut off.
        """
        if tensor.shape[dim] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}: size {tensor.shape[dim]} along dim {dim}, plan says {sizes[self.rank]}")
        began = time.perf_counter()
        # bytes of one entry along dim (from the shape: right even where this rank has none)
        per_entry = tensor.element_size() * torch.Size(n for i, n in enumerate(tensor.shape) if i != dim % tensor.dim()).numel()
        longest = max(sizes)
        if tensor.shape[dim] < longest:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = longest - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._wait(dist.all_gather(parts, tensor, group=self.group, async_op=True))
        out = torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)
        mine = sizes[self.rank]
        self._count(mine * per_entry * (self.world_size - 1), (sum(sizes) - mine) * per_entry, began)
        return out

    def all_to_all(self, tensor: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        """Rank r gets the send_sizes[r] entries along dim 0 that follow those for ranks before it;
        returns what every rank sent here, concatenated in rank order (recv_sizes[r] from rank r).
        One all_to_all_single (gloo and NCCL both take uneven splits)."""
        if len(send_sizes) != self.world_size or sum(send_sizes) != tensor.shape[0]:
            raise ValueError(f"rank {self.rank}: {tensor.shape[0]} entries, send sizes {send_sizes}")
        began = time.perf_counter()
        tensor = tensor.contiguous()
        out = tensor.new_empty((sum(recv_sizes), *tensor.shape[1:]))
        self._wait(dist.all_to_all_single(out, tensor, recv_sizes, send_sizes, group=self.group, async_op=True))
        per_entry = _nbytes(tensor[:1]) if tensor.shape[0] else 0
        self._count((sum(send_sizes) - send_sizes[self.rank]) * per_entry,
                    (sum(recv_sizes) - recv_sizes[self.rank]) * per_entry, began)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank says True: all ranks stop at the same step boundary,
        so no rank is left waiting in a collective its peers will never enter."""
        began = time.perf_counter()
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        self._wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        out = bool(t.item())
        self._count(4 * (self.world_size - 1), 4 * (self.world_size - 1), began)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        """Every rank's `values` summed elementwise (float64), the same on every rank: how ranks
        agree on a data-dependent decision (a step cache's measure over the whole video)."""
        began = time.perf_counter()
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._wait(dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        self._count(_nbytes(t) * (self.world_size - 1), _nbytes(t) * (self.world_size - 1), began)
        return t.tolist()

    def exchange_halos(self, tensor: torch.Tensor, dim: int, left: int | list[int], right: int | list[int],
                       sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(from_left, from_right): the `left` entries along `dim` just before this rank's part
        of the whole (concatenated in rank order) and the `right` entries just after it.

        Fewer come back where the whole ends: rank 0 gets an empty from_left (0 entries along
        `dim`), the last rank an empty from_right. A neighbour holding fewer entries than asked
        is not an error: the rest comes from the ranks beyond it (every rank knows every
        rank's size, so each computes what each peer needs from it). All ranks must pass the
        same `left`, `right` and `sizes`; `sizes` (every rank's size along `dim`) saves one
        small all-gather that learns them. `left` / `right` may be a list, one per rank: what
        each rank asks for (dual-scope windows reach further inward at the video's ends).

        One batch of non-blocking P2P sends/receives, at most one message per ordered pair of
        ranks: nothing waits on a peer's order of calls, so it cannot deadlock (gloo or NCCL).
        """
        lefts = list(left) if isinstance(left, (list, tuple)) else [left] * self.world_size
        rights = list(right) if isinstance(right, (list, tuple)) else [right] * self.world_size
        if min(lefts + rights) < 0 or len(lefts) != self.world_size or len(rights) != self.world_size:
            raise ValueError(f"halo sizes must be >= 0, one per rank; got left={left} right={right}")
        if sizes is None:
            sizes = self._gather_sizes(tensor.shape[dim])
        if len(sizes) != self.world_size or tensor.shape[dim] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}: size {tensor.shape[dim]} along dim {dim}, sizes {sizes}")
        began = time.perf_counter()
        starts = [sum(sizes[:r]) for r in range(self.world_size)]
        total = sum(sizes)

        def wanted(r: int) -> tuple[tuple[int, int], tuple[int, int]]:
            # the global ranges rank r asks for: before its part, after its part
            lo, hi = starts[r], starts[r] + sizes[r]
            return (max(0, lo - lefts[r]), lo), (hi, min(total, hi + rights[r]))

        def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
            return max(a[0], b[0]), min(a[1], b[1])

        mine = (starts[self.rank], starts[self.rank] + sizes[self.rank])
        before, after = wanted(self.rank)
        ops, sent, incoming = [], 0, {"left": [], "right": []}
        # peers nearest first; the order within a batch does not matter for correctness
        for peer in sorted((p for p in range(self.world_size) if p != self.rank), key=lambda p: abs(p - self.rank)):
            theirs = (starts[peer], starts[peer] + sizes[peer])
            for want in wanted(peer):  # what `peer` needs from me
                lo, hi = overlap(want, mine)
                if hi > lo:
                    part = tensor.narrow(dim, lo - mine[0], hi - lo).contiguous()
                    ops.append(dist.P2POp(dist.isend, part, group=self.group, group_peer=peer))
                    sent += _nbytes(part)
            for side, want in (("left", before), ("right", after)):  # what I need from `peer`
                lo, hi = overlap(want, theirs)
                if hi > lo:
                    shape = list(tensor.shape)
                    shape[dim] = hi - lo
                    buf = tensor.new_empty(shape)
                    ops.append(dist.P2POp(dist.irecv, buf, group=self.group, group_peer=peer))
                    incoming[side].append((lo, buf))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                self._wait(work)
        halos = []
        for side in ("left", "right"):
            parts = [buf for _, buf in sorted(incoming[side], key=lambda item: item[0])]
            halos.append(torch.cat(parts, dim=dim) if parts else tensor.narrow(dim, 0, 0))
        self._count(sent, sum(_nbytes(h) for h in halos), began)
        return halos[0], halos[1]

    def isend(self, tensor: torch.Tensor, dst: int) -> "Sending":
        """Start sending `tensor` (contiguous) to rank `dst`; returns what to wait() on. The
        tensor must stay untouched until then. Messages between a pair arrive in send order."""
        began = time.perf_counter()
        work = dist.isend(tensor, group=self.group, group_dst=dst)
        self._count(_nbytes(tensor), 0, began)
        return Sending(self, work)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive the next message from rank `src` into `tensor` (its exact size); returns it."""
        began = time.perf_counter()
        self._wait(dist.irecv(tensor, group=self.group, group_src=src))
        self._count(0, _nbytes(tensor), began)
        return tensor

    def _gather_sizes(self, size: int) -> list[int]:
        began = time.perf_counter()
        mine = torch.tensor([size], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._wait(dist.all_gather(parts, mine, group=self.group, async_op=True))
        self._count(8 * (self.world_size - 1), 8 * (self.world_size - 1), began)
        return [int(p.item()) for p in parts]

    def close(self) -> None:
        """Tear the group down; safe to call twice or after a peer died. Never raises."""
        if not self._open:
            return
        self._open = False
        if self._aborted.is_set():
            _ABANDONED.append(self.group)
        try:
            if dist.is_initialized():
                dist.destroy_process_group(self.group)
        except Exception as exc:  # a dead peer must not turn cleanup into a second failure
            log.warning("mesh close (rank %d): %s", self.rank, exc)
        self._store = None

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Sending:
    """A posted send; wait() is the mesh's abortable wait."""

    mesh: Mesh
    work: object

    def wait(self) -> None:
        self.mesh._wait(self.work)
