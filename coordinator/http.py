"""The coordinator's HTTP side (`--http HOST:PORT`): OpenAI's Videos API over the same core.

    POST   /v1/videos                  create (JSON, form or multipart, as the openai SDK sends it)
    GET    /v1/videos                  list (limit, after, order)
    GET    /v1/videos/{id}             retrieve: status, progress 0-100 from real step events
    DELETE /v1/videos/{id}             cancel if running (its workers stop within a step), then delete
    GET    /v1/videos/{id}/content     the MP4 (range requests: a browser seeks)
    GET    /v1/videos/{id}/events      the job's events as Server-Sent Events: replay, then live
    GET    /v1/videos/{id}/preview     the newest frame received, a PNG, while the job runs (404 otherwise)
    POST   /v1/videos/{id}/cancel      cancel, keeping the job and the frames finished (clipmesh's own)
    GET    /api/workers                the workers, as ListWorkers (clipmesh's own)
    GET    /                           the dashboard (dashboard.html), live through the SSE stream
    GET    /metrics                    Prometheus (metrics.py)

OpenAI's fields map onto a SubmitJobRequest: `size` "WxH" is width x height, `seconds` becomes
frames at the job's fps (the nearest the model allows, stride*k+1); clipmesh's own fields
(num_frames, steps, seed, strategy, workers, guidance, guidance_scale_2, negative_prompt, fps,
height, width, cfg_parallel, shard_weights, loras) come as extra fields and win. `input_reference` (image-to-video models) is the first
frame: a file as the SDK uploads it, or a base64 data: URL in JSON. Errors are OpenAI's error JSON with the gRPC side's field-and-limit
text; the credentials are the gRPC side's (`Authorization: Bearer`, the SDK's api_key; a client
certificate where the coordinator has a CA), and HTTPS where it has a certificate. gRPC stays the
primary contract: this module only translates. aiohttp: one asyncio server for JSON, streaming
responses (SSE) and files with ranges, on the coordinator's own loop, no second server process.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import ssl
from pathlib import Path

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from clipmesh.auth import TLS
from clipmesh import images
from clipmesh.client import REQUEST_DEFAULTS
from clipmesh.v1 import clipmesh_pb2 as pb

from . import access, metrics
from .core import CoordinatorCore
from .errors import (AlreadyExists, CoordinatorError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                     ResourceExhausted)

DASHBOARD = Path(__file__).with_name("dashboard.html")
MAX_BODY_BYTES = images.MAX_IMAGE_BYTES * 4 // 3 + (64 << 10)  # an image as base64 JSON, and the other fields
STATUS = {pb.QUEUED: "queued", pb.RUNNING: "in_progress", pb.SUCCEEDED: "completed", pb.FAILED: "failed",
          pb.CANCELLED: "cancelled"}
_HTTP = {InvalidArgument: 400, PermissionDenied: 403, NotFound: 404, FailedPrecondition: 409, AlreadyExists: 409,
         ResourceExhausted: 429}
def boolean(value) -> bool:
    """A JSON true/false, or a multipart form's "true"/"false" (bool("false") would be True)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1"):
        return True
    if str(value).lower() in ("false", "0"):
        return False
    raise ValueError(value)


def loras(value) -> list[pb.LoraRef]:
    """[{"name": N, "scale": S}, ...] in JSON or as the openai SDK's multipart brackets (every item
    with both), or "N:S,N" (a plain form field, the CLI's spelling)."""
    if isinstance(value, str):
        value = [dict(zip(("name", "scale"), item.split(":", 1))) for item in value.split(",") if item]
    if not isinstance(value, list) or not all(isinstance(v, dict) and v.get("name") for v in value):
        raise ValueError(value)
    return [pb.LoraRef(name=str(v["name"]), scale=float(v.get("scale", 1.0))) for v in value]


# extra body fields: name -> (SubmitJobRequest field, type)
EXTRAS = {"num_frames": ("num_frames", int), "frames": ("num_frames", int), "steps": ("num_inference_steps", int),
          "num_inference_steps": ("num_inference_steps", int), "seed": ("seed", int), "strategy": ("strategy", str),
          "workers": ("num_workers", int), "num_workers": ("num_workers", int), "guidance": ("guidance_scale", float),
          "guidance_scale": ("guidance_scale", float), "guidance_scale_2": ("guidance_scale_2", float),
          "negative_prompt": ("negative_prompt", str),
          "fps": ("fps", float), "height": ("height", int), "width": ("width", int),
          "cfg_parallel": ("cfg_parallel", boolean), "shard_weights": ("shard_weights", boolean),
          "loras": ("loras", loras)}


def error_body(message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None):
    return web.json_response(error_body(message, param), status=status)


def _from_error(exc: CoordinatorError) -> web.Response:
    status = next(code for cls, code in _HTTP.items() if isinstance(exc, cls))
    return error_response(status, exc.detail, getattr(exc, "field", None))


def _image_bytes(reference) -> bytes:
    """input_reference as the openai SDK sends it (a multipart file), or a base64 data: URL in JSON."""
    if isinstance(reference, bytes):
        return reference
    if isinstance(reference, str) and reference.startswith("data:") and ";base64," in reference:
        try:
            return base64.b64decode(reference.partition(";base64,")[2], validate=True)
        except binascii.Error:
            raise InvalidArgument("input_reference", "the data: URL's base64 does not decode") from None
    raise InvalidArgument("input_reference", "must be an image file (a multipart upload) or a base64 data: URL; "
                                             "URLs are not fetched")


def video_object(job: pb.Job, progress: float = 0.0, frames: int = 0) -> dict:
    """A Job as OpenAI's Video, with clipmesh's own facts under "clipmesh" (`progress`, `frames`:
    the core's share done and frames in the video so far, CoordinatorCore.progress)."""
    r = job.request
    seconds = (r.num_frames / r.fps) if r.fps and r.num_frames else 0.0
    error = {"code": "job_failed" if job.state == pb.FAILED else "job_cancelled", "message": job.error} \
        if job.error else None
    return {
        "id": job.id, "object": "video", "created_at": job.created_at.seconds,
        "completed_at": job.finished_at.seconds if job.state in STATUS and job.HasField("finished_at") else None,
        "status": STATUS.get(job.state, "queued"), "model": r.model, "prompt": r.prompt,
        "progress": int(math.floor(100 * progress)), "seconds": f"{seconds:g}", "size": f"{r.width}x{r.height}",
        "error": error, "expires_at": None, "remixed_from_video_id": None,
        "clipmesh": {"strategy": job.strategy, "workers": list(job.worker_ids), "num_frames": r.num_frames,
                     "video_frames": job.video_frames, "frames_received": frames, "attempt": job.attempt,
                     "owner": job.owner},
    }


class Gateway:
    def __init__(self, core: CoordinatorCore, credentials: access.Credentials):
        self.core, self.credentials = core, credentials

    # -- who asks ---------------------------------------------------------------
    def caller(self, request: web.Request) -> access.Caller:
        if self.credentials.open:
            return access.OPEN
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        names = [value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"]
        authorization = request.headers.get("Authorization", "")
        if not authorization and request.method == "GET" and request.query.get("access_token"):
            # a browser's EventSource and <video> cannot send headers: the dashboard's reads carry the token
            authorization = f"Bearer {request.query['access_token']}"
        who = self.credentials.identify("/v1/videos", [("authorization", authorization)],
                                        {"x509_common_name": [n.encode() for n in names]})
        if who is None:
            raise web.HTTPUnauthorized(text=json.dumps(error_body(
                "missing or unknown credential (Authorization: Bearer TOKEN)", code="invalid_api_key")),
                content_type="application/json")
        if who.role not in access.CLIENT_ROLES:
            raise web.HTTPForbidden(text=json.dumps(error_body(
                f"the Videos API needs a client credential; this one is a {who.role}'s")), content_type="application/json")
        return who

    def visible(self, request: web.Request) -> tuple[access.Caller, pb.Job]:
        who = self.caller(request)
        return who, self.core.get_job(request.match_info["video_id"], who)

    # -- the Videos API -----------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        who = self.caller(request)
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                return error_response(400, "body: not JSON")
            if not isinstance(body, dict):
                return error_response(400, "body: must be a JSON object")
        else:
            try:
                form = await request.post()
            except web.HTTPRequestEntityTooLarge:
                return error_response(413, f"body: at most {MAX_BODY_BYTES} bytes (input_reference: at most "
                                           f"{images.MAX_IMAGE_BYTES})", "input_reference")
            body = {k: v if isinstance(v, str) else v.file.read() for k, v in form.items()}  # files: their bytes
            if any(key.startswith("loras[") for key in form):  # the SDK's brackets: loras[][name], loras[][scale]
                names, scales = form.getall("loras[][name]", []), form.getall("loras[][scale]", [])
                # an item without both is malformed: [{}] fails loras() as any nameless item does
                body["loras"] = [{"name": n, "scale": v} for n, v in zip(names, scales)] \
                    if len(names) == len(scales) else [{}]
        try:
            fields = self._request_fields(body)
            job = await self.core.submit(pb.SubmitJobRequest(**fields), owner=who.name)
        except InvalidArgument as exc:
            if exc.field == "image":  # named as this API names it
                exc = InvalidArgument("input_reference", str(exc).partition(": ")[2])
            return _from_error(exc)
        return web.json_response(video_object(job))

    def _request_fields(self, body: dict) -> dict:
        if not isinstance(body.get("prompt"), str):
            raise InvalidArgument("prompt", "required, a string")
        fields = {**REQUEST_DEFAULTS, "prompt": body["prompt"]}
        if isinstance(body.get("model"), str) and body["model"]:
            fields["model"] = body["model"]
        if body.get("size") is not None:
            try:
                width, height = (int(v) for v in str(body["size"]).lower().split("x"))
            except ValueError:
                raise InvalidArgument("size", f"must be WIDTHxHEIGHT, got {str(body['size'])[:40]!r}") from None
            fields.update(width=width, height=height)
        for name, (field, kind) in EXTRAS.items():
            if body.get(name) is not None:
                try:
                    fields[field] = kind(body[name])
                except (TypeError, ValueError):
                    raise InvalidArgument(name, f"must be {kind.__name__}, got {str(body[name])[:40]!r}") from None
        if body.get("seconds") is not None and not any(body.get(n) is not None for n in ("num_frames", "frames")):
            try:
                seconds = float(body["seconds"])
            except ValueError:
                raise InvalidArgument("seconds", f"must be a number, got {str(body['seconds'])[:40]!r}") from None
            model = self.core.model_info(fields["model"])
            stride = model.temporal_stride if model else 1
            if not (math.isfinite(seconds) and seconds > 0):
                raise InvalidArgument("seconds", f"must be > 0, got {seconds:g}")
            fields["num_frames"] = stride * max(round(seconds * fields["fps"] / stride), 0) + 1
        if body.get("input_reference") is not None:
            fields["image"] = _image_bytes(body["input_reference"])
        return fields

    async def list(self, request: web.Request) -> web.Response:
        who = self.caller(request)
        try:
            limit = int(request.query.get("limit", 20))
        except ValueError:
            return error_response(400, "limit: must be an integer", "limit")
        if not 1 <= limit <= 100:
            return error_response(400, f"limit: must be in [1, 100], got {limit}", "limit")
        jobs = self.core.list_jobs(1000, who)  # newest first
        if request.query.get("order") == "asc":
            jobs.reverse()
        after = request.query.get("after")
        if after:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        page = jobs[:limit]
        data = [video_object(j, *self.core.progress(j)) for j in page]
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit})

    async def retrieve(self, request: web.Request) -> web.Response:
        _, job = self.visible(request)
        return web.json_response(video_object(job, *self.core.progress(job)))

    async def delete(self, request: web.Request) -> web.Response:
        who, job = self.visible(request)
        await self.core.delete(job.id, who)
        return web.json_response({"id": job.id, "object": "video.deleted", "deleted": True})

    async def cancel(self, request: web.Request) -> web.Response:
        who, job = self.visible(request)
        job = await self.core.cancel(job.id, who)
        return web.json_response(video_object(job, *self.core.progress(job)))

    async def workers(self, request: web.Request) -> web.Response:
        self.caller(request)
        return web.json_response({"object": "list", "data": [
            MessageToDict(w, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for w in self.core.list_workers()]})

    async def dashboard(self, request: web.Request) -> web.Response:
        """The page holds no data: what it shows, it fetches with the caller's token."""
        return web.Response(text=DASHBOARD.read_text(), content_type="text/html")

    async def content(self, request: web.Request) -> web.StreamResponse:
        who, job = self.visible(request)
        return web.FileResponse(self.core.video_path(job.id, who), headers={"Content-Type": "video/mp4"})

    async def preview(self, request: web.Request) -> web.Response:
        """The newest frame of a running job as a PNG (404 before the first, and after the end)."""
        who = self.caller(request)
        preview = self.core.preview(request.match_info["video_id"], who)
        return web.Response(body=preview.png, content_type="image/png",
                            headers={"X-Clipmesh-Frame": str(preview.frame), "Cache-Control": "no-store"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        who, job = self.visible(request)
        events = self.core.watch(job.id, who)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for event in events:
            data = json.dumps(MessageToDict(event, preserving_proto_field_name=True))
            await response.write(f"id: {event.seq}\nevent: {event.WhichOneof('kind')}\ndata: {data}\n\n".encode())
        return response


async def scrape(request: web.Request) -> web.Response:
    """Prometheus' text format (open, as /metrics is by convention: it holds no prompt or frame)."""
    return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except CoordinatorError as exc:
        return _from_error(exc)


def make_app(core: CoordinatorCore, credentials: access.Credentials) -> web.Application:
    gateway = Gateway(core, credentials)
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    metrics.watch_store(core)
    app.add_routes([web.get("/metrics", scrape), web.get("/", gateway.dashboard),
                    web.get("/api/workers", gateway.workers), web.post("/v1/videos/{video_id}/cancel", gateway.cancel),
                    web.post("/v1/videos", gateway.create), web.get("/v1/videos", gateway.list),
                    web.get("/v1/videos/{video_id}", gateway.retrieve),
                    web.delete("/v1/videos/{video_id}", gateway.delete),
                    web.get("/v1/videos/{video_id}/content", gateway.content),
                    web.get("/v1/videos/{video_id}/events", gateway.events),
                    web.get("/v1/videos/{video_id}/preview", gateway.preview)])
    return app


def ssl_context(tls: TLS | None) -> ssl.SSLContext | None:
    """HTTPS with the coordinator's certificate; with its CA, clients must present one."""
    if not tls or not tls.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        context.load_verify_locations(tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start(core: CoordinatorCore, credentials: access.Credentials, listen: str, tls: TLS | None = None):
    """Serves the app on `listen` (HOST:PORT, port 0: a free one); returns (runner, port)."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(make_app(core, credentials), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host or "0.0.0.0", int(port), ssl_context=ssl_context(tls))
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]
