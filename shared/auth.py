"""A caller's side of the coordinator's credentials: its token, its TLS files, its channel.

Clients present a client (or admin) token, workers a worker token: `authorization: Bearer
TOKEN` as call metadata. With TLS the channel verifies the coordinator against `--tls-ca`
and presents `--tls-cert/--tls-key` where given (required where the coordinator has a CA).
What the coordinator does with them: coordinator/access.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

SESSION_HEADER = "x-clipmesh-session"  # a worker's attach session (Registered.session_key) on its uploads


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class TLS:
    """PEM files: `ca` verifies the other side; `cert`/`key` are this side's own certificate."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    @classmethod
    def from_env(cls) -> TLS:
        return cls(*(os.environ.get(f"CLIPMESH_TLS_{part}", "") for part in ("CA", "CERT", "KEY")))

    def __bool__(self) -> bool:
        return bool(self.ca or self.cert)

    def _read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        if bool(self.cert) != bool(self.key):
            raise ValueError("--tls-cert and --tls-key go together")
        return tuple(Path(p).read_bytes() if p else None for p in (self.ca, self.key, self.cert))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, key, cert = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        """The daemon's certificate; with a CA, every peer must present one it signed (mTLS)."""
        ca, key, cert = self._read()
        if not cert:
            raise ValueError("a TLS server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def channel(address: str, tls: TLS | None = None, options=(), aio: bool = False):
    """A channel to the coordinator: TLS where `tls` is set, plaintext otherwise."""
    grpc_ = grpc.aio if aio else grpc
    if tls:
        return grpc_.secure_channel(address, tls.channel_credentials(), options=options)
    return grpc_.insecure_channel(address, options=options)
