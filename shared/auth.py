"""Shared-token auth for both planes' control RPCs.

The coordinator started with a token refuses every call without
`authorization: Bearer <token>`; clients and workers attach it as call metadata.
Health checks stay open so orchestrators can probe.
"""

from __future__ import annotations

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (authorization: Bearer ...)")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_unary_stream = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_stream_stream = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith((HEALTH_PREFIX, REFLECTION_PREFIX)):
            return await continuation(details)
        if dict(details.invocation_metadata or ()).get("authorization") == self._expected:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return self._deny_stream_stream
        if handler.request_streaming:
            return self._deny_stream
        if handler.response_streaming:
            return self._deny_unary_stream
        return self._deny_unary
