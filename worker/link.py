"""The worker's link to the coordinator: the Attach stream, its outbox, heartbeats, re-dialling,
and the calls that carry a job's bytes (frames and checkpoint parts up, checkpoint parts down),
each retried while the coordinator is away. It knows no job: the daemon (daemon.py) hands it
messages to send and takes the coordinator's messages from it (vLLM keeps its worker's
transport apart from the executor the same way).

A lost coordinator does not lose what was sent: the outbox is kept across streams (progress
within OUTBOX_LIMIT; results, checkpoints and frames always), and an upload that fails while the
coordinator restarts is tried again once a new session is up, for UPLOAD_RETRY_S.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

import grpc

from clipmesh.auth import SESSION_HEADER, TLS, channel, metadata
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc

log = logging.getLogger("clipmesh.worker")

UPLOAD_CHUNK = 1 << 20      # bytes per FrameChunk: well under the 4 MiB message limit
RECONNECT_SECONDS = 1.0
OUTBOX_LIMIT = 10_000       # messages kept while the coordinator is away; progress is dropped beyond
UPLOAD_RETRY_S = 600.0      # an upload is retried (the coordinator restarting) this long
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS)


class CoordinatorLink:
    def __init__(self, coordinator: str, worker_id: str, token: str = "", tls: TLS | None = None):
        self.coordinator, self.worker_id, self.token, self.tls = coordinator, worker_id, token, tls
        self.session_key = ""  # of the current attach session: uploads carry it
        self.outbox: collections.deque = collections.deque()  # kept across streams
        self.outbox_ready = asyncio.Event()
        self.attached = asyncio.Event()  # a stream is up (uploads wait for it)
        self.channel = None
        self.stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the stream ---------------------------------------------------------------------
    async def serve(self, register: Callable[[], pb.WorkerMessage], handle: Callable[[pb.CoordinatorMessage], None],
                    busy: Callable[[], list[str]]) -> None:
        """Attach (sending `register()` first), hand every coordinator message to `handle`, and
        re-dial whenever the stream ends, until `stopping` is set. A refusal (credentials, or a
        newer process under this name) ends the worker with its reason."""
        self._loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            try:
                await self._attached(register, handle)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in REFUSALS:
                    raise SystemExit(f"clipmesh worker: {exc.details()}") from None
                running = busy()
                log.warning("coordinator %s: %s; re-dialling%s", self.coordinator, exc.details(),
                            f" (still rendering {', '.join(running)})" if running else "")
            try:
                await asyncio.wait_for(self.stopping.wait(), RECONNECT_SECONDS)
            except TimeoutError:
                pass

    async def _attached(self, register, handle) -> None:
        """One Attach stream: register, heartbeat, hand on what comes until it ends."""
        ended = asyncio.Event()

        async def outbound():  # register, then the kept outbox; what is not taken waits for the next stream
            yield register()
            while not ended.is_set():
                if self.outbox:
                    yield self.outbox.popleft()
                    continue
                self.outbox_ready.clear()
                try:
                    await asyncio.wait_for(self.outbox_ready.wait(), 0.5)
                except TimeoutError:
                    pass

        async with channel(self.coordinator, self.tls, aio=True) as dialled:
            self.channel = dialled
            call = pb_grpc.WorkerGatewayStub(dialled).Attach(outbound(), metadata=metadata(self.token))
            stop_waiter = asyncio.create_task(self.stopping.wait())
            heartbeats = None
            try:
                async for msg in _until(call, stop_waiter):
                    if msg.WhichOneof("kind") == "registered":
                        log.info("%s attached to %s", self.worker_id, self.coordinator)
                        self.session_key = msg.registered.session_key
                        self.attached.set()
                        heartbeats = asyncio.create_task(self._heartbeat(msg.registered.heartbeat_seconds))
                    else:
                        handle(msg)
            finally:
                self.attached.clear()
                ended.set()
                stop_waiter.cancel()
                if heartbeats:
                    heartbeats.cancel()
                call.cancel()

    async def _heartbeat(self, every: float) -> None:
        """While this stream is up (its task ends with it): a heartbeat is only worth its moment."""
        while True:
            await asyncio.sleep(every)
            self.send(heartbeat=pb.Heartbeat())

    def send(self, **kind) -> None:
        """Queue a WorkerMessage (on the loop); progress gives way when the coordinator is away too long."""
        if "progress" in kind and len(self.outbox) >= OUTBOX_LIMIT:
            return
        self.outbox.append(pb.WorkerMessage(**kind))
        self.outbox_ready.set()

    def send_threadsafe(self, **kind) -> None:
        """send() from another thread (the render thread)."""
        self._loop.call_soon_threadsafe(lambda: self.send(**kind))

    def run_threadsafe(self, coroutine):
        """Run a coroutine of this link on its loop from another thread: a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    # -- calls that carry a job's bytes ---------------------------------------------------
    async def _session_changed(self, key: str) -> bool:
        """Whether the attach session `key` is replaced by a new one within a few re-dials."""
        for _ in range(3):
            if self.session_key != key or not self.attached.is_set():
                return True
            await asyncio.sleep(RECONNECT_SECONDS)
        return False

    async def _session(self) -> bool:
        """Waits for an attach session; False if the worker stops first (no session will come:
        a stopping daemon would otherwise wait out its grace on every upload still queued)."""
        if self.attached.is_set():
            return True
        waits = [asyncio.create_task(self.attached.wait()), asyncio.create_task(self.stopping.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        return self.attached.is_set()

    def _session_metadata(self) -> tuple[tuple[str, str], ...]:
        """A call on behalf of the current attach session (read at each try: a re-attach makes a new one)."""
        return (*metadata(self.token), (SESSION_HEADER, self.session_key))

    async def _retried(self, what: str, call):
        """`call(stub)` until it succeeds; while the coordinator is away (re-dialling), again
        once attached, for at most UPLOAD_RETRY_S."""
        deadline = time.monotonic() + UPLOAD_RETRY_S
        while True:
            if not await self._session():
                raise ConnectionError(f"{what}: not sent, the worker is stopping")
            key = self.session_key
            try:
                return await call(pb_grpc.WorkerGatewayStub(self.channel))
            except grpc.aio.AioRpcError as exc:
                # PERMISSION_DENIED for a session that just ended (a coordinator restart): the next one may
                stale = exc.code() == grpc.StatusCode.PERMISSION_DENIED and await self._session_changed(key)
                if (exc.code() not in _RETRIED and not stale) or time.monotonic() > deadline:
                    raise
                log.warning("%s: %s; retrying once the coordinator is back", what, exc.details())
                await asyncio.sleep(RECONNECT_SECONDS)

    async def upload_frames(self, a: pb.Assignment, rendered, after=None) -> None:
        """Streams decoded RGB24 frames [N, H, W, 3] to the coordinator, once the upload `after`
        (a concurrent future, or None) is done: pieces arrive in order."""
        if after is not None:
            await asyncio.wrap_future(after)
        n, h, w, _ = rendered.frames.shape
        data = rendered.frames.tobytes()

        async def chunks():
            yield pb.FrameChunk(header=pb.FrameHeader(job_id=a.job_id, worker_id=self.worker_id,
                                                      first_frame=rendered.first_frame, num_frames=n,
                                                      height=h, width=w, attempt=a.attempt))
            for offset in range(0, len(data), UPLOAD_CHUNK):
                yield pb.FrameChunk(data=data[offset:offset + UPLOAD_CHUNK])

        await self._retried(f"job {a.job_id}: frames from {rendered.first_frame}",
                            lambda stub: stub.UploadFrames(chunks(), metadata=self._session_metadata(), timeout=300))

    async def upload_checkpoint(self, a: pb.Assignment, part) -> None:
        """One checkpoint part; a failure costs only this checkpoint (the last complete one stays)."""
        async def chunks():
            yield pb.CheckpointChunk(header=pb.CheckpointHeader(
                job_id=a.job_id, attempt=a.attempt, worker_id=self.worker_id, step=part.step,
                latent_start=part.start, latent_end=part.end, size=len(part.data)))
            for offset in range(0, len(part.data), UPLOAD_CHUNK):
                yield pb.CheckpointChunk(data=part.data[offset:offset + UPLOAD_CHUNK])

        try:
            await self._retried(f"job {a.job_id}: checkpoint at step {part.step}",
                                lambda stub: stub.UploadCheckpoint(chunks(), metadata=self._session_metadata(),
                                                                   timeout=300))
        except grpc.aio.AioRpcError as exc:
            log.warning("job %s: checkpoint at step %d not kept: %s", a.job_id, part.step, exc.details())

    async def fetch_checkpoint(self, job_id: str, step: int, parts) -> list[bytes]:
        """The bytes of checkpoint `parts` (CheckpointPart) of the job's `step`, in order."""
        wanted = [pb.FetchCheckpointRequest(job_id=job_id, step=step, latent_start=part.latent_start,
                                            latent_end=part.latent_end) for part in parts]
        return [await self._retried(f"job {job_id}: checkpoint part [{r.latent_start}, {r.latent_end})",
                                    lambda stub, r=r: _read_part(stub, r, self._session_metadata())) for r in wanted]


async def _read_part(stub, request: pb.FetchCheckpointRequest, call_metadata) -> bytes:
    data = bytearray()
    async for chunk in stub.FetchCheckpoint(request, metadata=call_metadata, timeout=300):
        if chunk.WhichOneof("kind") == "data":
            data += chunk.data
    return bytes(data)


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
