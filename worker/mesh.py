"""The one module that owns torch.distributed process groups for a job (the data plane).

Why one owner: collectives hang if ranks disagree on the group or on the order of calls,
so every collective of a job goes through a `Mesh` that holds its group and passes
`group=` explicitly. World size 1 takes the same path (a gloo group of one), so the
single-worker case is not a special case that could drift.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
import struct

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 300


def host_store(advertise_host: str, timeout_s: float = 300) -> tuple[dist.TCPStore, int]:
    """Rank 0: start the job's TCPStore on an OS-chosen port; peers dial advertise_host:port.

    The server listens on all interfaces; `advertise_host` is only what the master's own
    client dials, which also proves the advertised address is reachable from here.
    """
    store = dist.TCPStore(advertise_host, 0, world_size=None, is_master=True,
                          timeout=_timeout(timeout_s), wait_for_workers=False)
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


class Mesh:
    """A job's process group: rank, world size, device, and the few collectives clipmesh needs."""

    def __init__(self, group, rank: int, world_size: int, device: torch.device, store):
        self.group, self.rank, self.world_size, self.device = group, rank, world_size, device
        self._store = store  # rank 0's master store must outlive the group
        self._open = True

    @classmethod
    def open(cls, host: str, port: int, rank: int, world_size: int, group_name: str, backend: str = "",
             timeout_s: float = 300, store=None, device: torch.device | str = "cpu",
             local_host: str | None = None) -> "Mesh":
        """Join the job's group. `store`: rank 0 passes the one from host_store; others dial host:port.

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
        dist.init_process_group(backend, store=dist.PrefixStore(group_name, store), rank=rank,
                                world_size=world_size, timeout=timeout, **kwargs)
        return cls(dist.group.WORLD, rank, world_size, device, store)

    def all_gather_uneven(self, tensor: torch.Tensor, sizes: list[int], dim: int) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, rank i contributing sizes[i] entries.

        Collectives need equal shapes, so each rank pads to max(sizes) and the pads are cut off.
        """
        if tensor.shape[dim] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}: size {tensor.shape[dim]} along dim {dim}, plan says {sizes[self.rank]}")
        longest = max(sizes)
        if tensor.shape[dim] < longest:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = longest - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank says True: all ranks stop at the same step boundary,
        so no rank is left waiting in a collective its peers will never enter."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def close(self) -> None:
        """Tear the group down; safe to call twice or after a peer died. Never raises."""
        if not self._open:
            return
        self._open = False
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
