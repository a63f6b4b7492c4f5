"""A worker that speaks the real WorkerGateway protocol over real gRPC, without torch: the
tests play it to place jobs, upload frames of a known colour each, and probe the gateway."""

from __future__ import annotations

import queue
import threading

import grpc
import imageio.v3 as iio
import numpy as np

from clipmesh import presets
from clipmesh.auth import SESSION_HEADER, metadata
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.v1 import clipmesh_pb2_grpc as pb_grpc
from conftest import WORKER_TOKEN

HEIGHT, WIDTH = 32, 48
WAIT = 30.0  # seconds for any one awaited message; the coordinator answers in milliseconds
UPLOAD_CHUNK = 1 << 20


def colour(i: int) -> np.ndarray:
    """Frame i's solid colour: no two of the first 16 closer than 58 (H.264 is off by ~2)."""
    return np.array([(i * 67) % 256, (i * 131 + 50) % 256, (255 - i * 19) % 256], np.uint8)


def frames(first: int, end: int) -> np.ndarray:
    return np.stack([np.broadcast_to(colour(i), (HEIGHT, WIDTH, 3)) for i in range(first, end)])


def assert_frames_in_order(path, count: int) -> None:
    """Each decoded frame's mean colour is nearest to its own frame's colour."""
    video = iio.imread(path)
    assert video.shape == (count, HEIGHT, WIDTH, 3)
    means = video.reshape(count, -1, 3).mean(axis=1)
    palette = np.stack([colour(i) for i in range(count)]).astype(float)
    nearest = np.linalg.norm(means[:, None] - palette[None], axis=-1).argmin(axis=1)
    assert nearest.tolist() == list(range(count))
    assert np.abs(means - palette).max() < 12


def drain(stream, into: queue.Queue) -> None:
    """Moves a gRPC response stream into a queue until it ends (or its channel closes)."""
    try:
        for message in stream:
            into.put(message)
    except grpc.RpcError:
        pass


class FakeWorker:
    """Attaches like a worker daemon serving tiny-wan, so the coordinator places jobs on it; what
    it sends of a job carries the attempt it was assigned, as a daemon's messages do."""

    def __init__(self, address: str, name: str, token: str = WORKER_TOKEN, model: str = "tiny-wan",
                 info: pb.ModelInfo | None = None):
        """`info`: the model limits it claims (default: the preset table's for `model`)."""
        self.name, self.token = name, token
        self.attempts: dict[str, int] = {}  # job -> the attempt of its assignment
        self.channel = grpc.insecure_channel(address)
        self.gateway = pb_grpc.WorkerGatewayStub(self.channel)
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.outbox.put(pb.WorkerMessage(register=pb.Register(
            worker_id=name, host="127.0.0.1", device="cpu", threads=1, speed=1.0,
            model=info or pb.ModelInfo(**presets.model_limits(model)))))
        stream = self.gateway.Attach(iter(self.outbox.get, None), metadata=metadata(token))
        threading.Thread(target=drain, args=(stream, self.inbox), daemon=True).start()
        self.session_key = self.expect("registered").session_key

    def expect(self, kind: str) -> pb.CoordinatorMessage:
        msg = self.inbox.get(timeout=WAIT)
        assert msg.WhichOneof("kind") == kind, msg
        if kind == "assignment":
            self.attempts[msg.assignment.job_id] = msg.assignment.attempt
        return getattr(msg, kind)

    def send(self, **kind) -> None:
        if "result" in kind:  # a daemon's result names the attempt it ends
            kind["result"].attempt = self.attempts.get(kind["result"].job_id, 0)
        self.outbox.put(pb.WorkerMessage(**kind))

    def step(self, job_id: str, block: int, step: int, total: int) -> None:
        self.send(progress=pb.StepProgress(worker_id=self.name, rank=0, step=step, total_steps=total,
                                           latent_start=2 * block, latent_end=2 * block + 2, seconds=0.01,
                                           block=block, attempt=self.attempts.get(job_id, 0)))

    def upload(self, job_id: str, first: int, end: int, worker_id: str = "", session_key: str | None = None,
               attempt: int | None = None, white: bool = False, token: str | None = None) -> int:
        """Frames [first, end) of the job in their colours (or `white`), as this worker (or claiming
        `worker_id`, on `session_key`, presenting `token`)."""
        data = (np.full_like(frames(first, end), 255) if white else frames(first, end)).tobytes()
        attempt = self.attempts.get(job_id, 0) if attempt is None else attempt
        chunks = [pb.FrameChunk(header=pb.FrameHeader(job_id=job_id, worker_id=worker_id or self.name, first_frame=first,
                                                      num_frames=end - first, height=HEIGHT, width=WIDTH,
                                                      attempt=attempt))]
        chunks += [pb.FrameChunk(data=data[i:i + UPLOAD_CHUNK]) for i in range(0, len(data), UPLOAD_CHUNK)]
        key = self.session_key if session_key is None else session_key
        credential = metadata(self.token if token is None else token)
        return self.gateway.UploadFrames(iter(chunks), metadata=(*credential, (SESSION_HEADER, key)),
                                         timeout=WAIT).frames_received

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


def call_raw(channel: grpc.Channel, service: str, method, messages: list[bytes], token: str, session: str = "",
             timeout: float = 10.0) -> grpc.StatusCode:
    """One call of any shape (`method`: a MethodDescriptor of `service`, its full name) with raw
    request bytes: a request stream sends `messages`, a unary call the first. The status it ends with."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        method.client_streaming, method.server_streaming]
    request = iter(messages) if method.client_streaming else messages[0]
    credentials = (*metadata(token), *(((SESSION_HEADER, session),) if session else ()))
    try:
        response = kind(f"/{service}/{method.name}", request_serializer=None, response_deserializer=None)(
            request, metadata=credentials, timeout=timeout)
        if method.server_streaming:
            for _ in response:
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
