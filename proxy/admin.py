"""The admin port (Linkerd's 4191): ``GET /metrics`` (Prometheus exposition of the
proxy's ProxyMetrics), ``GET /ready``, ``GET /live``, ``GET /identity`` (the proxy's
identity, certificate serial and validity, issuer and trust anchors, as JSON: what
``shoal identity show --admin`` prints), and ``POST /shutdown``, accepted only from a
loopback address, which starts the same graceful drain as SIGTERM.

One request per connection (``Connection: close``); the admin port is for probes and
scrapes, not traffic, so it is a small StreamReader server rather than the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable

import msgspec
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .identity import IdentityClient
from .runtime import Runtime

log = logging.getLogger("shoal.proxy.admin")

# An admin request is a request line and a few headers; 8 KiB is plenty.
MAX_ADMIN_REQUEST_BYTES = 8 * 1024
# A probe or scrape that has not sent its request within this long is dropped.
ADMIN_READ_TIMEOUT_SECONDS = 5.0
ADMIN_WRITE_TIMEOUT_SECONDS = 10.0


def _response(status: bytes, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type +
            b"\r\ncontent-length: " + str(len(body)).encode() +
            b"\r\nconnection: close\r\n\r\n" + body)


class TrustAnchorInfo(msgspec.Struct, frozen=True, kw_only=True):
    subject: str
    fingerprint: str  # sha256, hex
    not_after: float  # unix seconds


class ProxyIdentityInfo(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /identity``: the admin port's JSON (not a bus message)."""

    identity: str
    ready: bool  # a certificate and trust anchors in hand
    serial: str = ""  # hex
    not_before: float = 0.0  # unix seconds
    not_after: float = 0.0
    refresh_count: int = 0  # renewals after the first certificate
    issuer: str = ""  # the leaf's issuer (subject)
    issuer_key_id: str = ""  # its authority key identifier, hex
    trust_anchors: list[TrustAnchorInfo] = msgspec.field(default_factory=list)
    last_error: str = ""


def identity_info(client: IdentityClient) -> ProxyIdentityInfo:
    status = client.status()
    creds = client.credentials
    issuer = key_id = ""
    not_before = 0.0
    if creds is not None:
        leaf = creds.leaf
        issuer = leaf.issuer.rfc4514_string()
        not_before = leaf.not_valid_before_utc.timestamp()
        try:
            aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
            key_id = (aki.value.key_identifier or b"").hex()
        except x509.ExtensionNotFound:
            pass
    return ProxyIdentityInfo(
        identity=status.identity, ready=status.ready, serial=status.serial,
        not_before=not_before, not_after=status.not_after,
        refresh_count=status.refresh_count, issuer=issuer, issuer_key_id=key_id,
        trust_anchors=[TrustAnchorInfo(subject=a.subject, fingerprint=a.fingerprint,
                                       not_after=a.not_after.timestamp())
                       for a in status.anchors],
        last_error=status.last_error)


def is_loopback(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


class Admin:
    def __init__(self, runtime: Runtime, shutdown: Callable[[], None]) -> None:
        self.runtime = runtime
        self.shutdown = shutdown
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, host, port,
                                                 limit=MAX_ADMIN_REQUEST_BYTES)
        address: tuple[str, int] = self.server.sockets[0].getsockname()[:2]
        return address

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.server.wait_closed()

    def answer(self, method: bytes, path: bytes, peer: object) -> bytes:
        """The response for one admin request (plain code over the request line)."""
        path = path.split(b"?", 1)[0]
        if path == b"/shutdown":
            if method != b"POST":
                return _response(b"405 Method Not Allowed", b"use POST\n")
            if not is_loopback(peer):
                return _response(b"403 Forbidden", b"shutdown only from localhost\n")
            self.shutdown()
            return _response(b"200 OK", b"shutdown\n")
        if method not in (b"GET", b"HEAD"):
            return _response(b"405 Method Not Allowed", b"use GET\n")
        if path == b"/metrics":
            body = generate_latest(self.runtime.metrics.registry())
            return _response(b"200 OK", body, CONTENT_TYPE_LATEST.encode())
        if path == b"/live":
            return _response(b"200 OK", b"live\n")
        if path == b"/identity":
            identity = self.runtime.identity
            if identity is None:
                return _response(b"404 Not Found", b"this proxy runs without identity\n")
            return _response(b"200 OK", msgspec.json.encode(identity_info(identity)),
                             b"application/json")
        if path == b"/ready":
            ready, why = self.runtime.readiness()
            if ready:
                return _response(b"200 OK", b"ready\n")
            return _response(b"503 Service Unavailable", f"not ready: {why}\n".encode())
        return _response(b"404 Not Found", b"not found\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(ADMIN_READ_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                response = _response(b"400 Bad Request", b"bad request\n")
            else:
                response = self.answer(parts[0], parts[1], writer.get_extra_info("peername"))
                if parts[0] == b"HEAD":
                    response = response.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            writer.write(response)
            async with asyncio.timeout(ADMIN_WRITE_TIMEOUT_SECONDS):
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()
