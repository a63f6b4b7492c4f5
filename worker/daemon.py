"""`clipmesh worker`: a long-running daemon, one per GPU (or per CPU process).

Lifecycle (vLLM-style): load the model once, attach to the coordinator over one
bidirectional stream, then serve assignments one after another. Per job: open a
process group from the brokered rendezvous, run this rank's part of the plan,
report every step, upload decoded frames, tear the group down. A failed job is
reported and the daemon lives on; a lost coordinator is re-dialled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc

from clipmesh.auth import metadata
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc
from clipmesh.worker.memory import release_free_memory

log = logging.getLogger("clipmesh.worker")

UPLOAD_CHUNK = 1 << 20      # bytes per FrameChunk: well under the 4 MiB message limit
RECONNECT_SECONDS = 1.0


@dataclass
class JobContext:
    assignment: pb.Assignment
    cancel: threading.Event = field(default_factory=threading.Event)  # read by the render thread
    rendezvous: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def stop(self) -> None:
        """Ask the job to stop: the render thread at its next step boundary, or the wait for rendezvous now."""
        self.cancel.set()
        if not self.rendezvous.done():
            self.rendezvous.cancel()


class WorkerDaemon:
    def __init__(self, coordinator: str, model: str, device: str, advertise_host: str, name: str = "",
                 threads: int = 0, token: str = "", speed: float = 0.0):
        self.coordinator = coordinator
        self.model_name = model
        self.device = device
        self.advertise_host = advertise_host
        self.worker_id = name or f"{socket.gethostname()}-{device.replace(':', '')}-{os.getpid()}"
        self.threads = threads
        self.token = token
        self.speed = speed  # 0: measured at load
        self.jobs: dict[str, JobContext] = {}
        self._tasks: set[asyncio.Task] = set()
        self.outbox: asyncio.Queue | None = None
        self.stopping = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------
    def load_model(self) -> None:
        """Loads the pipeline once; every job reuses it."""
        import torch

        from clipmesh import presets
        from clipmesh.worker.adapters import load_adapter

        if self.threads:
            torch.set_num_threads(self.threads)
        folder = presets.model_folder(self.model_name)
        t0 = time.perf_counter()
        self.model = load_adapter(folder, self.device, torch.float32)
        self.model_info = self.model.model_info(self.model_name)
        self.speed = self.speed or self.model.measure_speed()
        log.info("%s loaded %s on %s in %.1fs (%.0f latent px/s)", self.worker_id, self.model_name, self.device,
                 time.perf_counter() - t0, self.speed)

    def _register(self) -> pb.WorkerMessage:
        import torch

        if self.device.startswith("cuda"):
            memory = torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        else:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return pb.WorkerMessage(register=pb.Register(
            worker_id=self.worker_id, host=self.advertise_host, device=self.device, memory_bytes=memory,
            threads=torch.get_num_threads(), model=self.model_info, speed=self.speed))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.load_model)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        while not self.stopping.is_set():
            try:
                await self._attached()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS):
                    raise SystemExit(f"clipmesh worker: {exc.details()}") from None
                log.warning("coordinator %s: %s; re-dialling", self.coordinator, exc.details())
            self._cancel_all("lost the coordinator")
            try:
                await asyncio.wait_for(self.stopping.wait(), RECONNECT_SECONDS)
            except TimeoutError:
                pass
        log.info("%s stopped", self.worker_id)

    def _cancel_all(self, why: str) -> None:
        for ctx in self.jobs.values():
            log.info("cancelling job %s: %s", ctx.assignment.job_id, why)
            ctx.stop()

    async def _attached(self) -> None:
        """One Attach stream: register, heartbeat, serve assignments until it ends."""
        outbox: asyncio.Queue = asyncio.Queue()
        self.outbox = outbox
        outbox.put_nowait(self._register())

        async def outbound():
            while (msg := await outbox.get()) is not None:
                yield msg

        async with grpc.aio.insecure_channel(self.coordinator) as channel:
            self.channel = channel
            call = pb_grpc.WorkerGatewayStub(channel).Attach(outbound(), metadata=metadata(self.token))
            stop_waiter = asyncio.create_task(self.stopping.wait())
            heartbeats = None
            try:
                async for msg in _until(call, stop_waiter):
                    kind = msg.WhichOneof("kind")
                    if kind == "registered":
                        log.info("%s attached to %s", self.worker_id, self.coordinator)
                        heartbeats = asyncio.create_task(self._heartbeat(outbox, msg.registered.heartbeat_seconds))
                    elif kind == "assignment":
                        self._start_job(msg.assignment)
                    elif kind == "rendezvous":
                        ctx = self.jobs.get(msg.rendezvous.job_id)
                        if ctx and not ctx.rendezvous.done():
                            ctx.rendezvous.set_result(msg.rendezvous)
                    elif kind == "cancel":
                        if ctx := self.jobs.get(msg.cancel.job_id):
                            ctx.stop()
            finally:
                stop_waiter.cancel()
                if heartbeats:
                    heartbeats.cancel()
                self._cancel_all("stream ended")
                # Let running jobs notice the cancel and report before the channel closes.
                pending = [t for t in self._tasks if not t.done()]
                if pending:
                    await asyncio.wait(pending, timeout=10)
                outbox.put_nowait(None)
                call.cancel()

    async def _heartbeat(self, outbox: asyncio.Queue, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            outbox.put_nowait(pb.WorkerMessage(heartbeat=pb.Heartbeat()))

    def _send(self, **kind) -> None:
        if self.outbox is not None:
            self.outbox.put_nowait(pb.WorkerMessage(**kind))

    # -- one job ------------------------------------------------------------
    def _start_job(self, assignment: pb.Assignment) -> None:
        ctx = JobContext(assignment=assignment)
        self.jobs[assignment.job_id] = ctx
        task = asyncio.create_task(self._run_job(ctx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, ctx: JobContext) -> None:
        from clipmesh.worker import mesh
        from clipmesh.worker.job import Cancelled

        a, plan = ctx.assignment, ctx.assignment.plan
        part = (f"layers [{plan.layers[a.rank].start}, {plan.layers[a.rank].end})" if plan.layers else
                f"latent frames [{plan.clips[a.rank].start}, {plan.clips[a.rank].end})")
        log.info("job %s: rank %d/%d, %s, %s", a.job_id, a.rank, plan.world_size, part, plan.strategy)
        store = None
        result = pb.JobResult(job_id=a.job_id)
        try:
            if a.rank == 0:
                # Rank 0 hosts the job's store on its advertised host and reports the port.
                store, port = await asyncio.to_thread(mesh.host_store, self.advertise_host, plan.timeout_seconds)
                self._send(store_ready=pb.StoreReady(job_id=a.job_id, port=port))
            rdv = await asyncio.wait_for(ctx.rendezvous, plan.timeout_seconds)
            uploads: list[asyncio.Future] = []
            try:
                await asyncio.to_thread(self._render, ctx, rdv, store, uploads)
            finally:  # what was rendered is delivered, also when the job stops early
                for upload in uploads:
                    await asyncio.wrap_future(upload)
            result.outcome = pb.JOB_OUTCOME_DONE
        except (Cancelled, asyncio.CancelledError):
            result.outcome = pb.JOB_OUTCOME_CANCELLED
            result.error = "cancelled"
        except Exception as exc:
            log.exception("job %s failed on %s", a.job_id, self.worker_id)
            result.error = f"{type(exc).__name__}: {exc}"
            result.outcome = pb.JOB_OUTCOME_FAILED_AFTER_CANCEL if ctx.cancel.is_set() else pb.JOB_OUTCOME_FAILED
        finally:
            del store
            self.jobs.pop(a.job_id, None)
            release_free_memory()  # a daemon lives for many jobs: it idles at the model's footprint
        log.info("job %s: rank %d %s", a.job_id, a.rank,
                 "done" if result.outcome == pb.JOB_OUTCOME_DONE else result.error)
        self._send(result=result)

    def _render(self, ctx: JobContext, rdv: pb.Rendezvous, store, uploads: list) -> None:
        """Blocking: runs in a thread so the stream keeps flowing (progress, heartbeats, cancels).
        Each decoded piece is uploaded at once, in order, while rendering goes on."""
        from clipmesh.worker.mesh import Mesh
        from clipmesh.worker.render import render

        a, plan = ctx.assignment, ctx.assignment.plan
        loop_send = self._threadsafe_sender()

        def on_step(report) -> None:
            loop_send(progress=pb.StepProgress(
                worker_id=self.worker_id, rank=a.rank, step=report.step, total_steps=report.total,
                latent_start=report.latent_start, latent_end=report.latent_end, seconds=report.seconds,
                bytes_sent=report.bytes_sent, bytes_received=report.bytes_received,
                comm_seconds=report.comm_seconds, block=report.block, peak_memory_bytes=report.peak_memory_bytes,
                full_pass=report.full_pass))

        def on_frames(rendered) -> None:
            previous = uploads[-1] if uploads else None
            uploads.append(asyncio.run_coroutine_threadsafe(self._upload(a.job_id, rendered, previous), self._loop))

        group = Mesh.open(rdv.host, rdv.port, a.rank, plan.world_size, plan.group_name, backend=plan.backend,
                          timeout_s=plan.timeout_seconds, store=store, device=self.device,
                          local_host=self.advertise_host)
        try:
            render(self.model, plan, a.rank, group, on_step=on_step, should_stop=ctx.cancel.is_set,
                   on_frames=on_frames)
        finally:
            group.close()

    def _threadsafe_sender(self):
        loop = self._loop
        return lambda **kind: loop.call_soon_threadsafe(lambda: self._send(**kind))

    async def _upload(self, job_id: str, rendered, after=None) -> None:
        """Streams decoded RGB24 frames [N, H, W, 3] to the coordinator, once the upload `after`
        (a concurrent future, or None) is done: pieces arrive in order."""
        if after is not None:
            await asyncio.wrap_future(after)
        n, h, w, _ = rendered.frames.shape
        data = rendered.frames.tobytes()

        async def chunks():
            yield pb.FrameChunk(header=pb.FrameHeader(job_id=job_id, worker_id=self.worker_id,
                                                      first_frame=rendered.first_frame, num_frames=n,
                                                      height=h, width=w))
            for offset in range(0, len(data), UPLOAD_CHUNK):
                yield pb.FrameChunk(data=data[offset:offset + UPLOAD_CHUNK])

        stub = pb_grpc.WorkerGatewayStub(self.channel)
        await stub.UploadFrames(chunks(), metadata=metadata(self.token), timeout=300)


async def _until(call, stop_waiter: asyncio.Task):
    """Yields stream messages until the stream ends or `stop_waiter` finishes."""
    stream = call.__aiter__()
    while True:
        nxt = asyncio.ensure_future(stream.__anext__())
        done, _ = await asyncio.wait({nxt, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


def main(args) -> None:
    import uvloop

    daemon = WorkerDaemon(args.coordinator, args.model, args.device, args.advertise_host, args.name,
                          args.threads, args.token, args.speed)

    uvloop.run(daemon.run())
