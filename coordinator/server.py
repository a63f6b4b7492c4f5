"""`clipmesh coordinator`: the gRPC daemon around CoordinatorCore."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipmesh.auth import TLS
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc

from .access import AccessInterceptor, Credentials
from .core import CoordinatorCore
from .limits import Limits
from .service import CoordinatorService, WorkerGatewayService

log = logging.getLogger("clipmesh.coordinator")


async def serve(listen: str, data_dir: Path, credentials: Credentials | None = None, tls: TLS | None = None,
                heartbeat_timeout: float = 15.0, collective_timeout: int = 120, port_file: Path | None = None,
                checkpoint_dir: Path | None = None, backfill_wait: float = 30.0, limits: Limits = Limits(),
                http_listen: str = "", http_port_file: Path | None = None) -> None:
    """`credentials`: who may call (None: open); `tls`: this daemon's certificate, and with a CA
    the peers' certificates are required and name them (access.py)."""
    credentials = credentials or Credentials()
    server_credentials = tls.server_credentials() if tls else None  # bad files fail before listening
    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server(
        interceptors=[AccessInterceptor(credentials)],
        options=[("grpc.max_receive_message_length", limits.max_message_bytes),
                 ("grpc.max_send_message_length", limits.max_message_bytes)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)

    core = CoordinatorCore(data_dir, heartbeat_timeout=heartbeat_timeout, collective_timeout=collective_timeout,
                           checkpoint_dir=checkpoint_dir, backfill_wait_s=backfill_wait, limits=limits)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(core), server)
    pb_grpc.add_WorkerGatewayServicer_to_server(WorkerGatewayService(core), server)
    reflection.enable_server_reflection([
        pb.DESCRIPTOR.services_by_name["Coordinator"].full_name,
        pb.DESCRIPTOR.services_by_name["WorkerGateway"].full_name,
        health.SERVICE_NAME, reflection.SERVICE_NAME,
    ], server)
    port = server.add_secure_port(listen, server_credentials) if server_credentials else server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"clipmesh coordinator: cannot listen on {listen}")
    await server.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    host = listen.rsplit(":", 1)[0]
    http_runner = None
    if http_listen:
        from . import http

        http_runner, http_port = await http.start(core, credentials, http_listen, tls)
        log.info("HTTP (OpenAI Videos API) on %s:%d", http_listen.rpartition(":")[0], http_port)
        if http_port_file:
            _write_port(http_port_file, http_port)
    log.info("coordinator listening on %s:%d (%s), data in %s", host, port,
             "mTLS" if tls and tls.ca else "TLS" if tls else "plaintext", data_dir)
    if credentials.open:
        log.warning("no credentials configured: anyone who reaches %s may submit jobs and attach as a worker "
                    "(set CLIPMESH_CLIENT_TOKEN and CLIPMESH_WORKER_TOKEN, or --tls-ca)", listen)
    if port_file:
        _write_port(port_file, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def ticks():  # heartbeats, re-adoption deadlines, retry backoffs
        while True:
            await asyncio.sleep(min(1.0, heartbeat_timeout / 4))
            try:
                await core.tick()
            except Exception:  # one bad tick must not stop the next
                log.exception("coordinator tick failed")

    monitor = asyncio.create_task(ticks())
    await stop.wait()
    log.info("coordinator stopping")
    monitor.cancel()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    if http_runner:
        await http_runner.cleanup()
    await server.stop(grace=2.0)
    core.store.close()


def _write_port(path: Path, port: int) -> None:
    """Written after start, renamed into place: a reader of the file can connect at once."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


async def _set_health(servicer, status) -> None:
    for service in ("", "clipmesh.v1.Coordinator", "clipmesh.v1.WorkerGateway"):
        await servicer.set(service, status)
