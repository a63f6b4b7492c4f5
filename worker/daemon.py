"""`clipmesh worker`: a long-running daemon, one per GPU (or per CPU process).

Lifecycle (vLLM-style): load the model once, attach to the coordinator over one
bidirectional stream, then serve assignments one after another. Per job: open a
process group from the brokered rendezvous, run this rank's part of the plan,
report every step, upload step checkpoints and decoded frames, tear the group down.
A failed job is reported and the daemon lives on.

This module is the executor: it runs jobs and knows no transport. Its link to the coordinator
(link.py: the stream, the outbox, re-dialling, uploads with their retries) carries what it sends.
A lost coordinator does not stop a job: the daemon keeps rendering while the link re-dials; it
registers again with the job it is running, so the restarted coordinator adopts it. Told a
member is lost (Cancel.abort), it leaves its collectives at once (Mesh.abort) instead of
waiting out their timeout.
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

from clipmesh import specs
from clipmesh.auth import TLS
from clipmesh.worker import metrics
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.link import CoordinatorLink
from clipmesh.worker.memory import release_free_memory

log = logging.getLogger("clipmesh.worker")


def outcome_of(exc: Exception, cancelled: bool) -> int:
    """How a rank's error ends its part: after a cancel, a consequence of it; a ValueError or
    NotImplementedError (a plan or model the code refuses: the specs' checks, a variant it cannot
    split) would repeat on any retry, so the job is refused; anything else (a broken collective,
    memory, I/O) fails the attempt, which may succeed again."""
    if cancelled:
        return pb.JOB_OUTCOME_FAILED_AFTER_CANCEL
    if isinstance(exc, (ValueError, NotImplementedError)):
        return pb.JOB_OUTCOME_REFUSED
    return pb.JOB_OUTCOME_FAILED


@dataclass
class JobContext:
    assignment: pb.Assignment
    cancel: threading.Event = field(default_factory=threading.Event)  # read by the render thread
    rendezvous: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    mesh: object = None        # the job's Mesh once open (the render thread sets it)
    aborted: bool = False

    def stop(self, abort: bool = False) -> None:
        """Ask the job to stop: the render thread at its next step boundary (`abort`: out of its
        collectives now), or the wait for rendezvous now."""
        self.cancel.set()
        if abort:
            self.aborted = True
            if self.mesh is not None:
                self.mesh.abort()
        if not self.rendezvous.done():
            self.rendezvous.cancel()


class WorkerDaemon:
    def __init__(self, coordinator: str, model: str, device: str, advertise_host: str, name: str = "",
                 threads: int = 0, token: str = "", speed: float = 0.0, tls: TLS | None = None,
                 denoiser_on: str = "device", lora_dir=None):
        self.denoiser_on, self.lora_dir = denoiser_on, lora_dir
        self.model_name = model
        self.device = device
        self.advertise_host = advertise_host
        self.worker_id = name or f"{socket.gethostname()}-{device.replace(':', '')}-{os.getpid()}"
        self.threads = threads
        self.speed = speed  # 0: measured at load
        self.incarnation = time.time_ns()  # a newer process under this name fences this one off
        self.jobs: dict[str, JobContext] = {}
        self._tasks: set[asyncio.Task] = set()
        self.link = CoordinatorLink(coordinator, self.worker_id, token, tls)

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
        self.model = load_adapter(folder, self.device, torch.float32, self.denoiser_on, self.lora_dir)
        self.model_info = self.model.model_info(self.model_name)
        self.denoiser_bytes = self.model.denoiser_bytes  # whole: a sharded job swaps in its copy for a while
        # a denoiser held on the host is not measured on the device (it may not fit there whole)
        self.speed = self.speed or (self.model.measure_speed() if self.denoiser_on == "device" else 1.0)
        log.info("%s loaded %s on %s in %.1fs (%.0f latent px/s)", self.worker_id, self.model_name, self.device,
                 time.perf_counter() - t0, self.speed)

    def _register(self) -> pb.WorkerMessage:
        import torch

        if self.device.startswith("cuda"):
            memory = torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        else:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        running = next((pb.RunningJob(job_id=c.assignment.job_id, attempt=c.assignment.attempt, rank=c.assignment.rank)
                        for c in self.jobs.values()), None)
        return pb.WorkerMessage(register=pb.Register(
            worker_id=self.worker_id, host=self.advertise_host, device=self.device, memory_bytes=memory,
            denoiser_bytes=self.denoiser_bytes, loras=self.model.loras.names,
            threads=torch.get_num_threads(), model=self.model_info, speed=self.speed, running=running,
            incarnation=self.incarnation))

    async def run(self) -> None:
        await asyncio.to_thread(self.load_model)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.link.stopping.set)
        await self.link.serve(self._register, self._handle, busy=lambda: list(self.jobs))
        self._cancel_all("stopping")
        pending = [t for t in self._tasks if not t.done()]
        if pending:  # let running jobs notice the cancel and report before the daemon exits
            await asyncio.wait(pending, timeout=10)
        log.info("%s stopped", self.worker_id)

    def _cancel_all(self, why: str) -> None:
        for ctx in self.jobs.values():
            log.info("cancelling job %s: %s", ctx.assignment.job_id, why)
            ctx.stop()

    def _handle(self, msg: pb.CoordinatorMessage) -> None:
        """What the coordinator says of jobs: run one, its rendezvous, cancel one."""
        kind = msg.WhichOneof("kind")
        if kind == "assignment":
            self._start_job(msg.assignment)
        elif kind == "rendezvous":
            ctx = self.jobs.get(msg.rendezvous.job_id)
            if ctx and not ctx.rendezvous.done():
                ctx.rendezvous.set_result(msg.rendezvous)
        elif kind == "cancel":
            ctx = self.jobs.get(msg.cancel.job_id)
            if ctx and msg.cancel.attempt in (0, ctx.assignment.attempt):
                ctx.stop(abort=msg.cancel.abort)

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
        mine = specs.split_rank(plan, a.rank)
        part = (f"layers [{plan.layers[mine].start}, {plan.layers[mine].end})"
                if specs.spec_named(plan.strategy).partition == specs.LAYERS else
                f"latent frames [{plan.clips[mine].start}, {plan.clips[mine].end})")
        if specs.branches(plan) > 1:
            part += f", guidance branch {specs.branch_of(plan, a.rank)}"
        self._note(pb.LogMessage.INFO, f"job {a.job_id} attempt {a.attempt}: rank {a.rank}/{plan.world_size}, "
                                       f"{part}, {plan.strategy}" + (f", from step {plan.start_step}" if plan.start_step else ""))
        store = None
        result = pb.JobResult(job_id=a.job_id, attempt=a.attempt)
        metrics.BUSY.set(1)
        try:
            resume = await self._fetch_checkpoint(a) if plan.HasField("resume") else None
            if a.rank == 0:
                # Rank 0 hosts the job's store on its advertised host and reports the port.
                store, port = await asyncio.to_thread(mesh.host_store, self.advertise_host, plan.timeout_seconds)
                self.link.send(store_ready=pb.StoreReady(job_id=a.job_id, port=port, attempt=a.attempt))
            rdv = await asyncio.wait_for(ctx.rendezvous, plan.timeout_seconds)
            uploads: list[asyncio.Future] = []
            try:
                await asyncio.to_thread(self._render, ctx, rdv, store, uploads, resume)
            finally:  # the uploads begun are awaited, also when the job stops early
                for upload in uploads:
                    try:
                        await asyncio.wrap_future(upload)
                    except (grpc.aio.AioRpcError, ConnectionError):
                        if not ctx.cancel.is_set():
                            raise  # stopped: the coordinator refuses the attempt's late frames, or is gone
            result.outcome = pb.JOB_OUTCOME_DONE
        except mesh.MeshAborted:
            result.outcome, result.error = pb.JOB_OUTCOME_ABORTED, "aborted: a member of the job was lost"
        except (Cancelled, asyncio.CancelledError):
            result.outcome = pb.JOB_OUTCOME_CANCELLED
            result.error = "cancelled"
        except Exception as exc:
            log.exception("job %s failed on %s", a.job_id, self.worker_id)
            result.error = f"{type(exc).__name__}: {exc}"
            result.outcome = outcome_of(exc, ctx.cancel.is_set())
        finally:
            del store
            self.jobs.pop(a.job_id, None)
            release_free_memory()  # a daemon lives for many jobs: it idles at the model's footprint
        log.info("job %s: rank %d %s", a.job_id, a.rank,
                 "done" if result.outcome == pb.JOB_OUTCOME_DONE else result.error)
        metrics.BUSY.set(0)
        metrics.JOBS.labels(pb.JobOutcome.Name(result.outcome)).inc()
        self.link.send(result=result)

    def _render(self, ctx: JobContext, rdv: pb.Rendezvous, store, uploads: list, resume) -> None:
        """Blocking: runs in a thread so the stream keeps flowing (progress, heartbeats, cancels).
        Each decoded piece is uploaded at once, in order, while rendering goes on; so is each
        checkpoint part."""
        from clipmesh.worker.mesh import Mesh
        from clipmesh.worker.render import render

        a, plan, link = ctx.assignment, ctx.assignment.plan, self.link
        role = specs.role(plan, a.rank)

        def on_step(report) -> None:
            metrics.step(report, plan.strategy)
            link.send_threadsafe(progress=pb.StepProgress(
                worker_id=self.worker_id, rank=a.rank, step=report.step, total_steps=report.total,
                latent_start=report.latent_start, latent_end=report.latent_end, seconds=report.seconds,
                bytes_sent=report.bytes_sent, bytes_received=report.bytes_received,
                comm_seconds=report.comm_seconds, block=report.block, peak_memory_bytes=report.peak_memory_bytes,
                full_pass=report.full_pass, attempt=a.attempt, role=role))

        def on_frames(rendered) -> None:
            skip = plan.frames_in_video - rendered.first_frame  # already in the video from an earlier attempt
            if skip >= len(rendered.frames):
                return
            if skip > 0:
                rendered = type(rendered)(first_frame=plan.frames_in_video, frames=rendered.frames[skip:])
            previous = uploads[-1] if uploads else None
            uploads.append(link.run_threadsafe(link.upload_frames(a, rendered, previous)))

        checkpoint_uploads: list = []

        def on_checkpoint(part) -> None:
            # not awaited by the render thread; one in flight at most, so parts never pile up in memory
            if checkpoint_uploads and not checkpoint_uploads[-1].done():
                self._note(pb.LogMessage.WARNING, f"job {a.job_id}: checkpoint at step {part.step} skipped: the one "
                                                  "before is still uploading")
                return
            checkpoint_uploads.append(link.run_threadsafe(link.upload_checkpoint(a, part)))

        group = Mesh.open(rdv.host, rdv.port, a.rank, plan.world_size, plan.group_name, timeout_s=plan.timeout_seconds, store=store, device=self.device,
                          local_host=self.advertise_host, secret=rdv.secret)
        ctx.mesh = group
        if ctx.aborted:  # told while the group was opening
            group.abort()
        try:
            render(self.model, plan, a.rank, group, on_step=on_step, should_stop=ctx.cancel.is_set,
                   on_frames=on_frames, resume=resume, on_checkpoint=on_checkpoint)
        finally:
            ctx.mesh = None
            group.close()

    def _note(self, level: int, text: str) -> None:
        """A line of this worker's log that belongs to its job: also sent to the coordinator, where it
        joins the job's events (WatchJob, the CLI's output), credited to this worker."""
        log.log(logging.WARNING if level == pb.LogMessage.WARNING else logging.ERROR if level == pb.LogMessage.ERROR
                else logging.INFO, "%s", text)
        self.link.send_threadsafe(log=pb.LogMessage(level=level, text=text))

    async def _fetch_checkpoint(self, a: pb.Assignment) -> list[bytes]:
        """The parts of the plan's checkpoint that hold this rank's latent frames (block_pipeline:
        rank 0's queue, the one part)."""
        plan = a.plan
        if specs.work_of(plan) == specs.QUEUE:
            parts = plan.resume.parts if specs.split_rank(plan, a.rank) == 0 else []  # each branch's first stage
        else:
            clip = plan.clips[specs.split_rank(plan, a.rank)]  # both guidance branches resume the same latents
            parts = [p for p in plan.resume.parts if p.latent_start < clip.end and clip.start < p.latent_end]
        return await self.link.fetch_checkpoint(a.job_id, plan.resume.step, parts)


def main(args) -> None:
    import faulthandler

    import uvloop

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack: a stuck daemon explains itself

    if args.metrics_port:
        metrics.serve(args.metrics_port)
    daemon = WorkerDaemon(args.coordinator, args.model, args.device, args.advertise_host, args.name,
                          args.threads, args.token, args.speed, TLS(args.tls_ca, args.tls_cert, args.tls_key),
                          args.denoiser_on, args.lora_dir)

    uvloop.run(daemon.run())
