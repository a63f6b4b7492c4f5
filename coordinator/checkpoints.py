"""Step checkpoints of running jobs: the parts ranks upload, which of them make a complete
checkpoint, and the parts a resumed attempt fetches.

A part is one rank's latent frames [start, end) after `step` steps (worker/checkpoint.py
writes and reads the bytes; here they are opaque). It is written to a temp name and renamed,
then indexed in SQLite; a step's checkpoint is complete once its parts cover every latent
frame, and from then on the parts of earlier steps are deleted: a job holds at most its last
complete checkpoint and the one being written. Where the files live is the embedded default
(the coordinator's data folder) or `--checkpoint-dir` (shared storage on a farm).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import InvalidArgument
from .spool import spool
from .store import Store

# A part is latents plus a few scheduler histories of the same size: far below this for any
# video a worker holds; a header claiming more is refused before a byte is written.
MAX_PART_BYTES = 8 << 30
CHUNK_BYTES = 1 << 20


class Checkpoints:
    def __init__(self, store: Store, folder: Path):
        self.store, self.folder = store, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def latest(self, job_id: str, num_latent_frames: int) -> pb.CheckpointInfo | None:
        """The job's last complete checkpoint, or None."""
        by_step: dict[int, list] = {}
        for step, start, end, size, _ in self.store.checkpoint_parts(job_id):
            by_step.setdefault(step, []).append(pb.CheckpointPart(latent_start=start, latent_end=end, size=size))
        for step in sorted(by_step, reverse=True):
            if _covers(by_step[step], num_latent_frames):
                return pb.CheckpointInfo(step=step, parts=by_step[step])
        return None

    async def receive(self, header: pb.CheckpointHeader, chunks: AsyncIterator[bytes], num_latent_frames: int) -> bool:
        """Stores one part (the job's membership is checked by the caller); True when it completed
        its step's checkpoint, whose earlier steps are then deleted."""
        if not (0 <= header.latent_start < header.latent_end <= num_latent_frames):
            raise InvalidArgument("header.latent_start/latent_end", f"must lie within [0, {num_latent_frames}]")
        if not 0 < header.size <= MAX_PART_BYTES:
            raise InvalidArgument("header.size", f"must be in [1, {MAX_PART_BYTES}], got {header.size}")
        folder = self.folder / header.job_id / str(header.step)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{header.latent_start}-{header.latent_end}.part"
        tmp = path.with_suffix(f".tmp{header.attempt}")
        await spool(chunks, tmp, header.size, "checkpoint")
        os.replace(tmp, path)
        self.store.add_checkpoint_part(header.job_id, header.step, header.latent_start, header.latent_end,
                                       header.size, str(path))
        latest = self.latest(header.job_id, num_latent_frames)
        if latest is None or latest.step != header.step:
            return False
        for step, _, _, _, old in self.store.checkpoint_parts(header.job_id):
            if step < header.step:
                Path(old).unlink(missing_ok=True)
        self.store.drop_checkpoint_parts(header.job_id, below_step=header.step)
        return True

    def read(self, job_id: str, step: int, start: int, end: int) -> Path:
        for s, a, b, _, path in self.store.checkpoint_parts(job_id, step):
            if (s, a, b) == (step, start, end):
                return Path(path)
        raise InvalidArgument("latent_start/latent_end", f"job {job_id} has no checkpoint part [{start}, {end}) "
                                                         f"at step {step}")

    def drop(self, job_id: str) -> None:
        """The job is over: its checkpoints go."""
        self.store.drop_checkpoint_parts(job_id)
        shutil.rmtree(self.folder / job_id, ignore_errors=True)


def _covers(parts: list[pb.CheckpointPart], total: int) -> bool:
    end = 0
    for part in sorted(parts, key=lambda p: p.latent_start):
        if part.latent_start > end:
            return False
        end = max(end, part.latent_end)
    return end >= total


async def stream_part(path: Path, header: pb.CheckpointHeader) -> AsyncIterator[pb.CheckpointChunk]:
    yield pb.CheckpointChunk(header=header)
    with open(path, "rb") as f:
        while data := await asyncio.to_thread(f.read, CHUNK_BYTES):
            yield pb.CheckpointChunk(data=data)
