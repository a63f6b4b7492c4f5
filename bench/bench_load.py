"""What the coordinator holds: simulated workers that speak the real WorkerGateway protocol
without torch (register, heartbeat, report steps, upload small frames), thousands of queued
jobs, a hundred WatchJob streams, all on loopback against a real coordinator daemon.

    python -m bench.bench_load                                  # 200 workers, 2000 jobs, 100 watchers
    python -m bench.bench_load --workers 20 --jobs 100 --watchers 10 --output /tmp/load.md   # a smoke run

Measures placement latency per job (from a worker's result to its next assignment), events per second fanned
out to the watchers, the coordinator's CPU seconds and peak RSS (/proc), and checks that every
job SUCCEEDED and that a watcher's events are the store's (a replay gives the same ones).
Writes the table to docs/bench-load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench import plots
from clipmesh import presets
from clipmesh.auth import SESSION_HEADER, metadata
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc

DOCS = Path(__file__).resolve().parent.parent / "docs"
SIDE, FRAMES, STEPS = 32, 5, 2  # each job: 5 frames of 32x32 (2 latent frames), 2 steps
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one connection per simulated worker, as real ones


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM:")) * 1024
    return cpu, peak


async def sim_worker(address: str, name: str, token: str, stop: asyncio.Event, done: list, gaps: list) -> None:
    """One worker: registers, heartbeats, and runs every assignment as 2 progress reports and one
    upload. `gaps`: seconds from its result to its next assignment (the placement latency)."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        gateway = pb_grpc.WorkerGatewayStub(channel)
        outbox: asyncio.Queue = asyncio.Queue()
        await outbox.put(pb.WorkerMessage(register=pb.Register(
            worker_id=name, host="127.0.0.1", device="cpu", threads=1, speed=1.0, incarnation=1,
            model=pb.ModelInfo(**presets.model_limits("tiny-wan")))))

        async def outbound():
            while (message := await outbox.get()) is not None:
                yield message

        call = gateway.Attach(outbound(), metadata=metadata(token))
        frames = np.full((FRAMES, SIDE, SIDE, 3), 128, np.uint8).tobytes()
        key, heartbeat, freed = "", None, None

        async def beat(every: float):
            while True:
                await asyncio.sleep(every)
                await outbox.put(pb.WorkerMessage(heartbeat=pb.Heartbeat()))

        async def run(a: pb.Assignment):
            for step in range(STEPS):
                await outbox.put(pb.WorkerMessage(progress=pb.StepProgress(
                    worker_id=name, step=step + 1, total_steps=STEPS, latent_end=2, seconds=0.001, attempt=a.attempt)))
            header = pb.FrameHeader(job_id=a.job_id, worker_id=name, first_frame=0, num_frames=FRAMES, height=SIDE,
                                    width=SIDE, attempt=a.attempt)
            await gateway.UploadFrames(iter([pb.FrameChunk(header=header), pb.FrameChunk(data=frames)]),
                                       metadata=(*metadata(token), (SESSION_HEADER, key)), timeout=120)
            nonlocal freed
            freed = time.perf_counter()
            await outbox.put(pb.WorkerMessage(result=pb.JobResult(job_id=a.job_id, outcome=pb.JOB_OUTCOME_DONE,
                                                                  attempt=a.attempt)))
            done.append(a.job_id)

        tasks = set()

        async def stop_when_told():  # (a read of the stream must not be timed out: that cancels the call)
            await stop.wait()
            call.cancel()
        stopper = asyncio.create_task(stop_when_told())
        try:
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "registered":
                    key = message.registered.session_key
                    heartbeat = asyncio.create_task(beat(message.registered.heartbeat_seconds))
                elif kind == "assignment":
                    if freed is not None:
                        gaps.append(time.perf_counter() - freed)
                    task = asyncio.create_task(run(message.assignment))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            stopper.cancel()
            if heartbeat:
                heartbeat.cancel()
            await outbox.put(None)
            call.cancel()


async def watcher(stub, job_id: str, token: str, received: list) -> None:
    async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=metadata(token)):
        received.append((job_id, event.seq))


async def load(address: str, pid: int, args, client_token: str, worker_token: str) -> dict:
    creds = metadata(client_token)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        request = dict(num_frames=FRAMES, height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=1.0,
                       fps=8.0, model="tiny-wan", strategy="exact", num_workers=1)
        cpu0, _ = proc_stats(pid)
        began = time.perf_counter()
        ids = []
        for start in range(0, args.jobs, 100):  # submitted in concurrent batches of 100
            batch = [stub.SubmitJob(pb.SubmitJobRequest(prompt=f"load {i}", seed=i, **request), metadata=creds)
                     for i in range(start, min(start + 100, args.jobs))]
            ids += [job.id for job in await asyncio.gather(*batch)]
        submit_s = time.perf_counter() - began
        received: list = []
        watchers = [asyncio.create_task(watcher(stub, job_id, client_token, received))
                    for job_id in ids[-args.watchers:]]  # the last jobs: their streams stay open longest
        stop, done, gaps = asyncio.Event(), [], []
        workers = [asyncio.create_task(sim_worker(address, f"sim-{i:03d}", worker_token, stop, done, gaps))
                   for i in range(args.workers)]
        began = time.perf_counter()
        while len(done) < args.jobs and time.perf_counter() - began < args.timeout:
            await asyncio.sleep(0.5)
        await asyncio.wait(watchers, timeout=60)
        run_s = time.perf_counter() - began
        cpu1, peak = proc_stats(pid)
        jobs = [await stub.GetJob(pb.GetJobRequest(job_id=j), metadata=creds) for j in ids]
        replayed: list = []
        for job_id in ids[-args.watchers:]:
            await watcher(stub, job_id, client_token, replayed)
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    states = {pb.JobState.Name(s): sum(j.state == s for j in jobs) for s in {j.state for j in jobs}}
    return dict(submit_s=submit_s, run_s=run_s, cpu_s=cpu1 - cpu0, peak_rss=peak, states=states,
                latency=gaps, events=len(received), events_match=sorted(received) == sorted(replayed),
                jobs_per_s=len(done) / run_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for every job to end")
    parser.add_argument("--output", type=Path, default=DOCS / "bench-load.md")
    args = parser.parse_args(argv)
    client_token, worker_token = secrets.token_hex(8), secrets.token_hex(8)
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        env = {**os.environ, "CLIPMESH_CLIENT_TOKEN": client_token, "CLIPMESH_WORKER_TOKEN": worker_token}
        log = open(Path(tmp) / "coordinator.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "clipmesh.cli", "coordinator", "--listen", "127.0.0.1:0",
                                 "--data", tmp, "--port-file", str(port_file), "--heartbeat-timeout", "30",
                                 "--max-queued-jobs", str(max(args.jobs, 10_000))], env=env, stdout=log, stderr=log)
        try:
            while not port_file.exists():
                time.sleep(0.1)
            address = f"127.0.0.1:{port_file.read_text()}"
            r = asyncio.run(load(address, proc.pid, args, client_token, worker_token))
        finally:
            proc.terminate()
            proc.wait(30)
    lat = sorted(r["latency"])
    table = "\n".join([
        "| workers | jobs | watchers | submit s | run s | jobs/s | placement p50 s | p99 s | max s | events to watchers | "
        "events/s | coordinator CPU s | CPU ms/job | peak RSS MiB | jobs SUCCEEDED | watched events = store replay |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.workers} | {args.jobs} | {args.watchers} | {r['submit_s']:.1f} | {r['run_s']:.1f} | {r['jobs_per_s']:.1f} "
        f"| {statistics.median(lat):.2f} | {lat[int(0.99 * (len(lat) - 1))]:.2f} | {lat[-1]:.2f} | {r['events']} "
        f"| {r['events'] / r['run_s']:.0f} | {r['cpu_s']:.1f} | {1000 * r['cpu_s'] / args.jobs:.1f} "
        f"| {r['peak_rss'] / 2 ** 20:.0f} | {r['states'].get('SUCCEEDED', 0)} of {args.jobs} | {r['events_match']} |",
    ])
    print(table)
    args.output.write_text(f"""# Load the coordinator holds

`python -m bench.bench_load --workers {args.workers} --jobs {args.jobs} --watchers {args.watchers}`: a real coordinator
daemon on loopback; simulated workers speak the real WorkerGateway protocol without torch (register,
heartbeat, 2 progress reports, one upload of {FRAMES} frames of {SIDE}x{SIDE}, result); all jobs are queued before
the workers attach; the watchers follow the last {args.watchers} jobs. Placement latency: from a worker's result
to its next assignment (the scheduling pass, with the queue full). CPU and peak RSS
are the coordinator process's (/proc). Every job ends with its video encoded by ffmpeg.

{table}
""")
    plots.draw(args.output, "bench-load.md")
    ok = r["states"].get("SUCCEEDED", 0) == args.jobs and r["events_match"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
