"""Benchmark the cost of step checkpoints: bytes per checkpoint and the seconds the render thread
spends writing one, as a share of a step, at the default interval.

Why: a checkpoint is what lets a job survive a lost worker (issue: faults), and it must not
slow the job: target <= 3% of step time at the default interval (clipmesh.faults). The upload
to the coordinator runs on the daemon's event loop beside the render thread, so what a step
waits for is the serialisation (worker/checkpoint.save), measured here on the production loop;
the upload's seconds are reported beside it, over a real loopback gRPC stream into a real
coordinator's checkpoint store. One fresh process per worker count, 1 thread each.

    python -m bench.bench_faults                     # bench-wan, 257 frames, 2 workers, 5 steps
    python -m bench.bench_faults --model tiny-wan --frames 17 --size 64 --steps 3 --output /tmp/f.md
"""

from __future__ import annotations

import argparse
import datetime
import time

from bench.common import DOCS
from bench.procs import run_ranks, stop_ranks_on_exit
from bench.report import busy_warning, load, machine, write_section
from bench.runners import open_mesh, plan_for


def _rank(cfg: dict, rank: int, port_q) -> dict:
    import torch

    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render
    from clipmesh.worker.strategies import base

    model = load_adapter(cfg["folder"], "cpu", torch.float32)
    plan = plan_for(cfg, model.model_info(cfg["model"]), "exact", checkpoint_every=1)
    saves, parts, steps = [], [], []
    timed = base.StepSchedule.checkpoint

    def checkpoint(schedule, every):  # the production method, timed
        began = time.perf_counter()
        part = timed(schedule, every)
        if part is not None:
            saves.append(time.perf_counter() - began)
        return part

    base.StepSchedule.checkpoint = checkpoint
    with open_mesh(rank, cfg["workers"], port_q, plan.group_name) as mesh:
        render(model, plan, rank, mesh, on_step=lambda r: steps.append(r.seconds), decode=False,
               on_checkpoint=parts.append)
    return dict(steps=steps, saves=saves, bytes=[len(p.data) for p in parts], last=parts[-1].data if parts else b"")


def _upload_seconds(data: bytes, tmp) -> float:
    """One part into a real CoordinatorCore's checkpoint store over a loopback gRPC stream."""
    import asyncio

    import grpc

    from clipmesh import presets
    from clipmesh.auth import SESSION_HEADER
    from clipmesh.coordinator.core import CoordinatorCore
    from clipmesh.coordinator.service import WorkerGatewayService
    from clipmesh.v1 import clipmesh_pb2 as pb
    from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc

    async def run() -> float:
        core = CoordinatorCore(tmp)
        server = grpc.aio.server()
        pb_grpc.add_WorkerGatewayServicer_to_server(WorkerGatewayService(core), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        # a running attempt the part belongs to, as the scheduler would have placed it
        job = core.store.create_job(pb.SubmitJobRequest(prompt="bench", num_frames=5, model="bench"))
        await core.jobs.start(job, pb.RenderPlan(request=job.request, num_latent_frames=1, attempt=1), ["w"])
        # the member's attach session, whose key its uploads carry
        session, _ = core.workers.attach(pb.Register(worker_id="w", incarnation=1,
                                                     model=pb.ModelInfo(**presets.model_limits("bench-wan"))))
        session.info.current_job_id = job.id

        async def chunks():
            yield pb.CheckpointChunk(header=pb.CheckpointHeader(job_id=job.id, attempt=1, worker_id="w", step=1,
                                                                latent_start=0, latent_end=1, size=len(data)))
            for offset in range(0, len(data), 1 << 20):
                yield pb.CheckpointChunk(data=data[offset:offset + (1 << 20)])

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            began = time.perf_counter()
            await pb_grpc.WorkerGatewayStub(channel).UploadCheckpoint(chunks(), metadata=((SESSION_HEADER, session.key),))
            seconds = time.perf_counter() - began
        await server.stop(None)
        return seconds

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-wan")
    parser.add_argument("--frames", type=int, default=257)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default=str(DOCS / "bench-faults.md"))
    args = parser.parse_args()
    stop_ranks_on_exit()
    import tempfile

    from clipmesh import faults
    from clipmesh.presets import model_folder

    at_start = load()
    cfg = dict(folder=str(model_folder(args.model)), model=args.model, frames=args.frames, size=args.size,
               steps=args.steps, workers=args.workers, threads=1)
    out = run_ranks(_rank, cfg, args.workers, "faults")
    if out.error:
        raise SystemExit(out.error)
    with tempfile.TemporaryDirectory() as tmp:
        upload = _upload_seconds(out.ranks[0]["last"], tmp)
    every = faults.DEFAULT_CHECKPOINT_EVERY
    rows = []
    for rank, r in enumerate(out.ranks):
        step = sum(r["steps"]) / len(r["steps"])
        save = sum(r["saves"]) / max(len(r["saves"]), 1)
        size = sum(r["bytes"]) / max(len(r["bytes"]), 1)
        rows.append(f"| {rank} | {step:.2f} | {size / 2**20:.1f} | {save * 1000:.0f} | "
                    f"{100 * save / step:.2f}% | {100 * save / (every * step):.3f}% |")
    text = "\n".join([
        "## Step checkpoints: cost per step", "",
        f"`python -m bench.bench_faults --model {args.model} --frames {args.frames} --size {args.size} "
        f"--steps {args.steps} --workers {args.workers}` on {machine()}, {datetime.date.today()}; exact, fp32, "
        f"1 thread per rank, a checkpoint after every step (the default is every {every}).",
        busy_warning(at_start), "",
        "| rank | seconds per step | MB per checkpoint part | ms to write it (render thread) | "
        "share of one step | share at the default interval |", "|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Uploading rank 0's part into a coordinator's checkpoint store over loopback gRPC (beside the render "
        f"thread, on the daemon's event loop): {upload * 1000:.0f} ms."])
    write_section(args.output, "faults", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
