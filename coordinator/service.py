"""gRPC servicers: thin translators over CoordinatorCore (MLServer style).

Each handler only converts between the wire and a core call, streams included (a
worker's Attach pump lives in the core). Domain errors are mapped to status codes in one
decorator at the edge, `grpc_errors`, on every handler.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import aclosing

import grpc

from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc

from clipmesh.auth import SESSION_HEADER

from . import access
from .core import CoordinatorCore
from .errors import (AlreadyExists, CoordinatorError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                     ResourceExhausted)

_CODES = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
VIDEO_CHUNK = 1 << 20  # well under gRPC's 4 MiB message limit


def _status_for(exc: CoordinatorError) -> grpc.StatusCode:
    return next(code for cls, code in _CODES.items() if isinstance(exc, cls))


def grpc_errors(method):
    """Maps CoordinatorError to its status code: the only place that does. Works for every
    handler shape: unary or client-streaming (`request` is then the request iterator), and
    server- or bidi-streaming (an async generator, closed at once when the call ends)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async with aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except CoordinatorError as exc:
                await context.abort(_status_for(exc), exc.detail)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except CoordinatorError as exc:
            await context.abort(_status_for(exc), exc.detail)
    return unary


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """A client sees, cancels and fetches only its own jobs (an admin, or anyone on an open
    coordinator, every job): access.caller() is who is asking."""

    def __init__(self, core: CoordinatorCore):
        self.core = core

    @grpc_errors
    async def SubmitJob(self, request, context):
        return await self.core.submit(request, owner=access.caller().name)

    @grpc_errors
    async def GetJob(self, request, context):
        return self.core.get_job(request.job_id, access.caller())

    @grpc_errors
    async def GetPreview(self, request, context):
        return self.core.preview(request.job_id, access.caller())

    @grpc_errors
    async def ListJobs(self, request, context):
        return pb.ListJobsResponse(jobs=self.core.list_jobs(request.limit, access.caller()))

    @grpc_errors
    async def WatchJob(self, request, context):
        async for event in self.core.watch(request.job_id, access.caller()):
            yield event

    @grpc_errors
    async def CancelJob(self, request, context):
        return await self.core.cancel(request.job_id, access.caller())

    @grpc_errors
    async def DeleteJob(self, request, context):
        was_running = await self.core.delete(request.job_id, access.caller())
        return pb.DeleteJobResponse(job_id=request.job_id, was_running=was_running)

    @grpc_errors
    async def FetchVideo(self, request, context):
        path = self.core.video_path(request.job_id, access.caller())
        with open(path, "rb") as f:
            while data := f.read(VIDEO_CHUNK):
                yield pb.VideoChunk(data=data)

    @grpc_errors
    async def ListWorkers(self, request, context):
        return pb.ListWorkersResponse(workers=self.core.list_workers())


class WorkerGatewayService(pb_grpc.WorkerGatewayServicer):
    """A worker speaks for itself only: its id is its credential's where that names one
    (a certificate, a NAME:TOKEN), and every call but Attach carries its attach session's key."""

    def __init__(self, core: CoordinatorCore):
        self.core = core

    def _session(self, context):
        key = dict(context.invocation_metadata() or ()).get(SESSION_HEADER, "")
        return self.core.worker_session(key, access.caller().name)

    @grpc_errors
    async def Attach(self, request_iterator, context):
        async with aclosing(self.core.serve_worker(request_iterator, access.caller().name)) as outbound:
            async for message in outbound:
                yield message

    @grpc_errors
    async def UploadFrames(self, request_iterator, context):
        session = self._session(context)
        return pb.UploadFramesResponse(frames_received=await self.core.upload_frames(session, request_iterator))

    @grpc_errors
    async def UploadCheckpoint(self, request_iterator, context):
        session = self._session(context)
        return pb.UploadCheckpointResponse(complete=await self.core.upload_checkpoint(session, request_iterator))

    @grpc_errors
    async def FetchCheckpoint(self, request, context):
        session = self._session(context)
        async for chunk in self.core.fetch_checkpoint(session, request):
            yield chunk
