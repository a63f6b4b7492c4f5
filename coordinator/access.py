"""Who may call what: the coordinator's credentials, its three roles, and the caller of an RPC.

Roles: a *client* submits jobs and sees, cancels and fetches its own; an *admin* is a client
who sees every job; a *worker* attaches, uploads and fetches checkpoints. A credential is
  - a bearer token (`authorization: Bearer ...`) from the role's list, or
  - with TLS and a CA (`--tls-ca`), the certificate every peer must then present: its common
    name says role and name, "client/alice", "admin/ops", "worker/gpu-3" (`clipmesh certs`).
    With a CA the WorkerGateway takes certificates only: a worker's id is its certificate's,
    not what it claims.
A client's name owns the jobs it submits (tokens: `NAME:TOKEN`, a bare token is "client").
With no credential configured at all the coordinator is open (a laptop on loopback) and its
log says so. Health and reflection stay open, as is the convention.

The same interceptor turns request bytes that do not parse into INVALID_ARGUMENT (gRPC's own
answer is UNKNOWN, with a traceback in the log per request), and logs bad requests at most
once a second.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import logging
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from .errors import PermissionDenied
from .metrics import RPCS

log = logging.getLogger("clipmesh.coordinator")

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
WORKER_PREFIX = "/clipmesh.v1.WorkerGateway/"
CLIENT_ROLES, WORKER_ROLES = ("client", "admin"), ("worker",)


@dataclass(frozen=True)
class Caller:
    role: str         # "client", "admin", "worker"; "open" when no credential is configured
    name: str = ""    # a client's name (it owns its jobs); a worker's id where a certificate gives it

    @property
    def sees_all(self) -> bool:
        return self.role in ("admin", "open")

    def sees(self, owner: str) -> bool:
        """Whether this caller may see (cancel, fetch) a job submitted by `owner`."""
        return self.sees_all or owner == self.name


OPEN = Caller("open")


def check_visible(who: Caller, job) -> None:
    """PermissionDenied unless `who` may see (cancel, fetch, delete) the job."""
    if not who.sees(job.owner):
        raise PermissionDenied(f"job {job.id} is another client's")
_current: contextvars.ContextVar[Caller] = contextvars.ContextVar("clipmesh_caller", default=OPEN)


def caller() -> Caller:
    """The caller of the RPC being handled (set by AccessInterceptor for the handler's task)."""
    return _current.get()


def _parse_tokens(spec: str, default_name: str) -> dict[str, str]:
    """'NAME:TOKEN,TOKEN,...' -> {token: name}; a bare token gets `default_name`."""
    tokens = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, token = item.rpartition(":")
        tokens[token] = name or default_name
    return tokens


class Credentials:
    def __init__(self, client_tokens: str = "", admin_tokens: str = "", worker_tokens: str = "",
                 certificates: bool = False):
        """Token lists as 'NAME:TOKEN,...'; `certificates`: TLS with a CA, so every peer has a verified one."""
        self.by_role = {"client": _parse_tokens(client_tokens, "client"), "admin": _parse_tokens(admin_tokens, "admin"),
                        "worker": _parse_tokens(worker_tokens, "")}
        self.certificates = certificates

    @property
    def open(self) -> bool:
        return not self.certificates and not any(self.by_role.values())

    def identify(self, method: str, metadata, auth_context: dict) -> Caller | None:
        """The caller, from its certificate (with a CA) or its token; None if it has neither."""
        if self.certificates:
            names = auth_context.get("x509_common_name") or []
            role, _, name = (names[0].decode() if names else "").partition("/")
            if role in self.by_role and name:
                return Caller(role, name)
            if method.startswith(WORKER_PREFIX):
                return None  # workers are known by their certificates only
        value = dict(metadata or ()).get("authorization", "")
        token = value.removeprefix("Bearer ") if value.startswith("Bearer ") else None
        for role, tokens in self.by_role.items():
            for known, name in tokens.items():
                if token is not None and hmac.compare_digest(known.encode(), token.encode()):
                    return Caller(role, name)
        return None


def _code_name(code) -> str:
    """A handler context's code (None until set: OK; a StatusCode, or its number) by name."""
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


class _Malformed:
    """A request whose bytes did not parse (the deserializer's answer instead of raising)."""


class _BadRequestLog:
    """One log line per second at most, with the count of those not logged."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.last, self.quiet = every_s, 0.0, 0

    def __call__(self, method: str, why: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.quiet += 1
            return
        more = f" (and {self.quiet} more since the last)" if self.quiet else ""
        log.warning("bad request to %s: %s%s", method, why, more)
        self.last, self.quiet = now, 0


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health and reflection, checks the method is the role's,
    and makes the caller known to the handler (`caller()`)."""

    def __init__(self, credentials: Credentials):
        self.credentials = credentials
        self.bad_request = _BadRequestLog()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        method, credentials, bad_request = details.method, self.credentials, self.bad_request
        roles = WORKER_ROLES if method.startswith(WORKER_PREFIX) else CLIENT_ROLES

        def parse(data: bytes):
            try:
                return handler.request_deserializer(data)
            except (DecodeError, ValueError, TypeError):
                return _Malformed()

        async def admit(context) -> contextvars.Token:
            if credentials.open:
                return _current.set(OPEN)
            who = credentials.identify(method, context.invocation_metadata(), context.auth_context())
            if who is None:
                bad_request(method, "no credential")
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or unknown credential (authorization: Bearer TOKEN, or a certificate "
                                    "signed by the coordinator's CA)")
            if who.role not in roles:
                bad_request(method, f"a {who.role}'s credential")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method.rsplit('/', 1)[1]} needs a {' or '.join(roles)} credential; "
                                    f"this one is a {who.role}'s")
            return _current.set(who)

        async def refuse_malformed(context):
            bad_request(method, "request bytes do not parse")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid protobuf message of this method")

        async def checked(requests, context):  # a request stream: each message as it comes
            async for request in requests:
                if isinstance(request, _Malformed):
                    await refuse_malformed(context)
                yield request

        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)

        name = method.rsplit("/", 1)[1]

        def count(context) -> None:
            RPCS.labels(name, _code_name(context.code())).inc()

        @contextlib.asynccontextmanager
        async def admitted(request, context):
            """The caller admitted and known for the call, its request checked; the call counted."""
            try:
                token = await admit(context)
                try:
                    if isinstance(request, _Malformed):
                        await refuse_malformed(context)
                    yield checked(request, context) if handler.request_streaming else request
                finally:
                    # a stream may be closed from another task (its context): nothing to undo there
                    with contextlib.suppress(ValueError):
                        _current.reset(token)
            finally:
                count(context)

        if handler.response_streaming:
            async def guarded(request, context):
                async with admitted(request, context) as requests:
                    async for response in behavior(requests, context):
                        yield response
        else:
            async def guarded(request, context):
                async with admitted(request, context) as requests:
                    return await behavior(requests, context)

        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        return make[handler.request_streaming, handler.response_streaming](
            guarded, request_deserializer=parse, response_serializer=handler.response_serializer)
