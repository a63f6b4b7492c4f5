"""Per-worker progress bars (step i/T) and an overall bar, fed by JobEvents.

Rich bars on a terminal; one plain line per event otherwise (logs, CI, pipes). Under
block_pipeline every rank steps through a queue of blocks: its bar counts the block-steps
done and names the current one, and the overall bar counts frames received.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from clipmesh.v1 import clipmesh_pb2 as pb

STATE_NAMES = {v: k for k, v in pb.JobState.items()}


def describe(event: pb.JobEvent) -> str:
    kind = event.WhichOneof("kind")
    if kind == "state":
        detail = f" ({event.state.detail})" if event.state.detail else ""
        return f"job {event.job_id}: {STATE_NAMES[event.state.state]}{detail}"
    if kind == "step":
        s = event.step
        comm = (f", comm {s.comm_seconds:.2f}s {(s.bytes_sent + s.bytes_received) / 1e6:.1f} MB"
                if s.bytes_sent or s.bytes_received else "")
        block = f"block {s.block} " if s.HasField("block") else ""
        role = f", {s.role}" if s.role else ""
        return (f"[rank {s.rank} {s.worker_id}] {block}step {s.step}/{s.total_steps} "
                f"latent [{s.latent_start},{s.latent_end}){role} {s.seconds:.2f}s{comm}{_memory(s)}")
    if kind == "frames":
        f = event.frames
        return f"frames {f.first_frame}..{f.first_frame + f.num_frames - 1} received from {f.worker_id}"
    level = pb.LogMessage.Level.Name(event.log.level)
    return f"{level} {event.log.worker_id}: {event.log.text}"


def _memory(s: pb.StepProgress) -> str:
    """", peak 812 MB" (and ", cached" when a step cache skipped the full denoiser)."""
    peak = f", peak {s.peak_memory_bytes / 2**20:.0f} MB" if s.peak_memory_bytes else ""
    return peak + (", cached" if s.HasField("full_pass") and not s.full_pass else "")


def follow(events: Iterable[pb.JobEvent], world_size: int = 0, stream=None, num_frames: int = 0) -> pb.JobState:
    """Consumes a WatchJob stream, shows progress, returns the last state seen.
    `num_frames`: the job's frames, 0 when unknown or unbounded."""
    stream = stream or sys.stderr
    if stream.isatty():
        return _follow_rich(events, world_size, num_frames, stream)
    state = pb.QUEUED
    for event in events:
        print(describe(event), file=stream, flush=True)
        if event.WhichOneof("kind") == "state":
            state = event.state.state
    return state


QUEUE_SHADES = " ▁▂▃▄▅▆▇█"


def queue_picture(steps: dict[int, int], total_steps: int, width: int = 12) -> str:
    """The block queue's diagonal at a glance: the newest `width` blocks, oldest first, each
    drawn by how far it is denoised (block -> steps done), e.g. 'b7 █▆▄▂ b10'."""
    if not steps:
        return ""
    shown = sorted(steps)[-width:]
    shade = "".join(QUEUE_SHADES[round(steps[b] / total_steps * (len(QUEUE_SHADES) - 1))] for b in shown)
    return f"b{shown[0]} {shade} b{shown[-1]}"


def _follow_rich(events: Iterable[pb.JobEvent], world_size: int, num_frames: int, stream) -> pb.JobState:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=stream)
    bars: dict[int, int] = {}
    state = pb.QUEUED
    frames, blocks = 0, False
    queue: dict[int, int] = {}  # block -> steps its last stage finished
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        overall = progress.add_task("overall", total=None)
        for event in events:
            kind = event.WhichOneof("kind")
            if kind == "step" and event.step.HasField("block"):
                s = event.step
                if not blocks:
                    blocks = True
                    progress.update(overall, description="frames", total=num_frames or None, completed=frames)
                if s.rank not in bars:
                    bars[s.rank] = progress.add_task("", total=None)  # blocks keep coming until the end
                progress.update(bars[s.rank], advance=1, description=f"rank {s.rank} {s.worker_id} block {s.block} "
                                f"step {s.step}/{s.total_steps}{_memory(s)}")
                if s.rank == max(bars):  # the last stage seen so far finishes a block's step
                    queue[s.block] = max(queue.get(s.block, 0), s.step)
                    queue.pop(s.block - 64, None)  # an endless stream: keep the recent blocks only
                    progress.update(overall, description=f"frames  {queue_picture(queue, s.total_steps)}")
            elif kind == "step":
                s = event.step
                if s.rank not in bars:
                    bars[s.rank] = progress.add_task("", total=s.total_steps)
                role = f" {s.role}" if s.role else ""
                progress.update(bars[s.rank], completed=s.step, description=f"rank {s.rank} {s.worker_id} "
                                f"[{s.latent_start},{s.latent_end}){role}{_memory(s)}")
                world = max(world_size, len(bars))
                progress.update(overall, total=world * s.total_steps,
                                completed=sum(progress.tasks[t].completed for t in bars.values()))
            else:
                progress.console.print(describe(event))
                if kind == "state":
                    state = event.state.state
                elif kind == "frames":
                    frames += event.frames.num_frames
                    if blocks:
                        progress.update(overall, completed=frames)
    return state
