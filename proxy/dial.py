"""Connecting to an endpoint, plain or with mutual TLS, for both HTTP engines' pools:
one place turns connect and handshake failures into the errors a client sees (502/504,
with the reason), so HTTP/1 and HTTP/2 report them alike."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

from . import tls
from .accept import connect_tcp
from .errors import (
    IdentityUnavailable,
    UpstreamConnectTimeout,
    UpstreamIdentityMismatch,
    UpstreamRefused,
    UpstreamTlsFailed,
)
from .identity import IdentityError, PeerIdentityMismatch, check_peer_identity
from .route import EndpointKey

P = TypeVar("P", bound=asyncio.Protocol)


def _connect_failed(host: str, port: int, timeout: float,
                    error: Exception) -> UpstreamConnectTimeout | UpstreamRefused:
    if isinstance(error, TimeoutError):
        return UpstreamConnectTimeout(
            f"connecting to {host}:{port} timed out after {timeout:g}s")
    reason = getattr(error, "strerror", None) or type(error).__name__
    return UpstreamRefused(f"connecting to {host}:{port} failed: {reason}")


async def dial_plain(factory: Callable[[], P], key: EndpointKey, timeout: float) -> P:
    """A plaintext connection with ``factory``'s protocol on it (TCP_NODELAY set)."""
    loop = asyncio.get_running_loop()
    host, port = key
    try:
        async with asyncio.timeout(timeout):
            transport, protocol = await loop.create_connection(factory, host, port)
    except (TimeoutError, OSError) as error:
        raise _connect_failed(host, port, timeout, error) from None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return protocol


async def dial_tls(client: tls.ClientTls, key: EndpointKey, timeout: float, identity: str,
                   alpn: tuple[str, ...], handshake_timeout: float) -> tls.TlsConnection:
    """A mutual-TLS connection to ``key`` whose peer proved exactly ``identity``."""
    loop = asyncio.get_running_loop()
    host, port = key
    try:
        context = client.client_context(alpn)
    except IdentityError as error:
        raise IdentityUnavailable(f"no TLS credentials for {identity} yet: "
                                  f"{error.reason}") from None
    try:
        sock = await connect_tcp(loop, host, port, timeout)
    except (TimeoutError, OSError) as error:
        raise _connect_failed(host, port, timeout, error) from None
    return await handshake_errors(
        tls.originate(loop, sock, context, identity, handshake_timeout),
        f"{host}:{port}", identity)


async def handshake_errors(handshake: Awaitable[tls.TlsConnection], where: str,
                           identity: str) -> tls.TlsConnection:
    """Await a client handshake and check the peer is exactly ``identity``; failures
    become the errors the client sees (502, with the reason)."""
    try:
        connection = await handshake
    except ssl.SSLCertVerificationError as error:
        raise UpstreamIdentityMismatch(
            f"{where} is not {identity}: {error.verify_message}") from None
    except TimeoutError:
        raise UpstreamTlsFailed(f"TLS handshake with {where} timed out") from None
    except (ssl.SSLError, OSError) as error:
        raise UpstreamTlsFailed(f"TLS handshake with {where} ({identity}) failed: "
                                f"{error}") from None
    try:
        check_peer_identity(connection.ssl_object, identity)
    except PeerIdentityMismatch as error:
        connection.abort()
        raise UpstreamIdentityMismatch(f"{where} is not {identity}: it proved "
                                       f"{error.actual or 'no identity'}") from None
    return connection
