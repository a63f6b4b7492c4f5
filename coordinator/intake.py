"""Frame intake: a worker's UploadFrames stream, checked and handed to the job's video.

An upload is a header, then raw RGB24 bytes. The part is checked against the running
job (sent on the attach session of its member, of that member's own frames, of the right
size), spooled to the job's scratch folder, then
given to the stitcher under the job's video lock, so it either makes the video or is
refused with a reason the worker can act on.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from clipmesh.plan import latent_of_frame
from clipmesh.specs import DECODE_RUN, decoding_rank
from clipmesh.v1 import clipmesh_pb2 as pb

from .errors import FailedPrecondition, InvalidArgument, PermissionDenied
from .jobs import ActiveJob, Jobs, shielded
from .limits import Limits
from .spool import spool
from .stitcher import FramePart, VideoClosed
from .store import FINAL_STATES


def _last_frame(path, frame_bytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(-frame_bytes, 2)
        return f.read()


class FrameIntake:
    def __init__(self, jobs: Jobs, limits: Limits = Limits()):
        self.jobs, self.limits = jobs, limits
        self._upload_ids = itertools.count()  # part files never share a name, even for a repeated upload

    async def upload(self, session, chunks: AsyncIterator[pb.FrameChunk]) -> int:
        """One UploadFrames stream of a worker's attach `session`: a header chunk first, then the data chunks."""
        first = await anext(chunks, None)
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidArgument("header", "the first chunk must be a header")

        async def data():
            async for chunk in chunks:
                yield chunk.data

        return await self.receive(session, first.header, data())

    async def receive(self, session, header: pb.FrameHeader, chunks: AsyncIterator[bytes]) -> int:
        active = self.jobs.member_of(session, header.job_id, header.worker_id, header.attempt)
        if self.jobs.get(header.job_id).state in FINAL_STATES:
            raise self.jobs.already_ended(header.job_id)
        req = active.plan.request
        if (header.height, header.width) != (req.height, req.width):
            raise InvalidArgument("header.height/width", f"must be {req.height}x{req.width}")
        end = header.first_frame + header.num_frames
        if header.first_frame < 0 or header.num_frames < 1 or (req.num_frames and end > req.num_frames):
            # an unbounded job (num_frames 0) takes any frame index
            raise InvalidArgument("header.first_frame/num_frames",
                                  f"must lie within [0, {req.num_frames or 'unbounded'})")
        self._check_own_frames(active, header)
        if not req.num_frames:  # unbounded: nothing far past the video's end is held
            ahead = self.limits.turns_ahead * active.plan.world_size * DECODE_RUN * active.plan.block_pipeline.block_frames
            limit = active.video.frames_written + ahead * self.jobs.workers.model_info(req.model).temporal_stride
            if end > limit:
                raise FailedPrecondition(f"header.first_frame/num_frames: frames up to {limit} only (the video has "
                                         f"{active.video.frames_written}); send the ones before first")
        expected = header.num_frames * header.height * header.width * 3
        folder = self.jobs.scratch_dir(header.job_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"frames-{header.first_frame:06d}-{next(self._upload_ids)}.rgb"
        await spool(chunks, path, expected, "RGB24")
        last = (end - 1, _last_frame(path, header.height * header.width * 3))  # before the writer takes the part
        try:
            part = FramePart(header.first_frame, header.num_frames, header.height, header.width, path)
            await self._add_part(header.job_id, active, part)
        except VideoClosed:  # the job ended while this part was on its way
            raise self.jobs.already_ended(header.job_id) from None
        except ValueError as exc:
            raise InvalidArgument("header.first_frame/num_frames", str(exc)) from None
        except RuntimeError as exc:  # ffmpeg died: no video can come of this job
            await self.jobs.fail(header.job_id, f"video encoding failed: {exc}")
            raise FailedPrecondition(f"job {header.job_id} failed: video encoding failed") from None
        if active.latest_frame is None or last[0] > active.latest_frame[0]:
            active.latest_frame = last  # the preview (GetPreview)
        await self.jobs.emit(header.job_id, frames=pb.FramesReceived(
            worker_id=header.worker_id, first_frame=header.first_frame, num_frames=header.num_frames))
        return header.num_frames

    def _check_own_frames(self, active: ActiveJob, header: pb.FrameHeader) -> None:
        """Every frame of the part is one the member's rank decodes (specs.decoding_rank)."""
        rank, plan = active.members.index(header.worker_id), active.plan
        stride = self.jobs.workers.model_info(plan.request.model).temporal_stride
        for frame in range(header.first_frame, header.first_frame + header.num_frames):
            if decoding_rank(plan, latent_of_frame(frame, stride)) != rank:
                raise PermissionDenied(f"header.first_frame/num_frames: frame {frame} is not rank {rank}'s to upload")

    @shielded
    async def _add_part(self, job_id: str, active: ActiveJob, part: FramePart) -> None:
        """The lock is held until the writer thread is done, even if the upload's caller went away."""
        async with active.video_lock:
            if self.jobs.running(job_id) is not active:  # the attempt ended meanwhile (a fault)
                part.path.unlink(missing_ok=True)
                raise FailedPrecondition(f"attempt {active.attempt} of job {job_id} has ended")
            await asyncio.to_thread(active.video.add, part)
