"""gRPC servicers: thin translators over CoordinatorCore (MLServer style).

Domain errors are mapped to status codes in one decorator at the edge.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc

from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc

from .core import CoordinatorCore
from .errors import AlreadyExists, CoordinatorError, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("clipmesh.coordinator")

_CODES = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
}
VIDEO_CHUNK = 1 << 20  # well under gRPC's 4 MiB message limit


def _status_for(exc: CoordinatorError) -> grpc.StatusCode:
    return next(code for cls, code in _CODES.items() if isinstance(exc, cls))


def grpc_errors(method):
    """Maps CoordinatorError to its status code; works for unary and streaming handlers."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except CoordinatorError as exc:
                await context.abort(_status_for(exc), str(exc))
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except CoordinatorError as exc:
            await context.abort(_status_for(exc), str(exc))
    return unary


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, core: CoordinatorCore):
        self.core = core

    @grpc_errors
    async def SubmitJob(self, request, context):
        return await self.core.submit(request)

    @grpc_errors
    async def GetJob(self, request, context):
        return self.core.get_job(request.job_id)

    @grpc_errors
    async def ListJobs(self, request, context):
        return pb.ListJobsResponse(jobs=self.core.list_jobs(request.limit))

    @grpc_errors
    async def WatchJob(self, request, context):
        async for event in self.core.watch(request.job_id):
            yield event

    @grpc_errors
    async def CancelJob(self, request, context):
        return await self.core.cancel(request.job_id)

    @grpc_errors
    async def FetchVideo(self, request, context):
        path = self.core.video_path(request.job_id)
        with open(path, "rb") as f:
            while data := f.read(VIDEO_CHUNK):
                yield pb.VideoChunk(data=data)

    @grpc_errors
    async def ListWorkers(self, request, context):
        return pb.ListWorkersResponse(workers=self.core.list_workers())


class WorkerGatewayService(pb_grpc.WorkerGatewayServicer):
    def __init__(self, core: CoordinatorCore):
        self.core = core

    async def Attach(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "register: the first message must be register")
        try:
            session = await self.core.attach(first.register)
        except CoordinatorError as exc:
            await context.abort(_status_for(exc), str(exc))
        worker_id = first.register.worker_id

        async def pump_inbound():
            try:
                async for msg in request_iterator:
                    await self.core.on_message(worker_id, msg)
            except Exception as exc:  # stream broken: the finally below reports the loss
                log.info("worker %s stream ended: %s", worker_id, exc)
            finally:
                await self.core.detach(worker_id, "stream closed")

        reader = asyncio.get_running_loop().create_task(pump_inbound())
        try:
            while (out := await session.outbox.get()) is not None:
                yield out
        finally:
            reader.cancel()
            await self.core.detach(worker_id, "stream closed")

    async def UploadFrames(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "header: the first chunk must be a header")

        async def data():
            async for chunk in request_iterator:
                yield chunk.data

        try:
            count = await self.core.receive_frames(first.header, data())
        except CoordinatorError as exc:
            await context.abort(_status_for(exc), str(exc))
        return pb.UploadFramesResponse(frames_received=count)
