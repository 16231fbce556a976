"""Every failure the proxy answers itself, and the one place that renders them.

Each failure is a small named class that knows its HTTP status and says whose fault it is
in its message (as linkerd2-proxy's errors do). ``render`` turns one into a complete
HTTP/1.1 response carrying the reason in a ``shoal-proxy-error`` header, and the same text
in ``l5d-proxy-error`` so Linkerd tooling that looks for that header keeps working.
Nothing else in the proxy writes an error response.

Statuses (docs/proxy.md, "Errors"): malformed request 400, request target too long 414,
headers over the limit 431, request head too slow 408, unknown service 503, no endpoints
after fail-fast 503, no certificate yet 503, upstream refused or reset 502, the
endpoint's certificate not for the identity discovery named 502, TLS handshake failed
502, upstream connect or response timeout 504.
"""

from __future__ import annotations

from typing import ClassVar

from .http2.grpc import from_http as grpc_from_http
from .http2.grpc import percent_encode

ERROR_HEADER = b"shoal-proxy-error"
LINKERD_ERROR_HEADER = b"l5d-proxy-error"

# Header values are one line of visible ASCII (RFC 9110 5.5); longer details are cut.
MAX_ERROR_TEXT = 200


class ProxyError(Exception):
    """A request the proxy answers itself. ``status`` is what the client sees."""

    status: ClassVar[int] = 502
    reason: ClassVar[bytes] = b"Bad Gateway"
    # True: the peer broke the protocol, so the connection cannot be trusted any more.
    fatal: ClassVar[bool] = False
    # What a gRPC client sees (None: mapped from ``status``, see http2/grpc.py).
    grpc_status: ClassVar[int | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedRequest(ProxyError):
    """The client sent bytes that are not a valid HTTP/1.x request (client's fault)."""

    status, reason, fatal = 400, b"Bad Request", True


class BadAuthority(ProxyError):
    """Host / absolute-form authority is not a service name the proxy can route."""

    status, reason = 400, b"Bad Request"


class RequestTargetTooLong(ProxyError):
    status, reason, fatal = 414, b"URI Too Long", True


class HeadersTooLarge(ProxyError):
    status, reason, fatal = 431, b"Request Header Fields Too Large", True


class RequestHeadTimeout(ProxyError):
    status, reason, fatal = 408, b"Request Timeout", True


class MethodNotAllowed(ProxyError):
    status, reason = 405, b"Method Not Allowed"


class UnknownService(ProxyError):
    """Discovery answered: the endpoints bucket has no such service."""

    status, reason = 503, b"Service Unavailable"


class NoEndpoints(ProxyError):
    """The service exists (or discovery has not answered) but had no endpoint to send to
    within the fail-fast timeout (Linkerd: 3 s outbound, 1 s inbound)."""

    status, reason = 503, b"Service Unavailable"


class EndpointConnectError(ProxyError):
    """Connecting to an endpoint failed before any request byte was sent, so the request
    may go to another endpoint (the balancer counts a failure against this one)."""


class UpstreamRefused(EndpointConnectError):
    """Connecting to the endpoint failed (refused, unreachable)."""

    status, reason = 502, b"Bad Gateway"


class UpstreamIdentityMismatch(EndpointConnectError):
    """The endpoint's certificate does not carry the identity discovery said it has (or
    does not chain to the trust anchors): nothing was sent to it."""

    status, reason = 502, b"Bad Gateway"


class UpstreamTlsFailed(EndpointConnectError):
    """The TLS handshake with the endpoint's proxy failed for another reason."""

    status, reason = 502, b"Bad Gateway"


class IdentityUnavailable(ProxyError):
    """This proxy has no certificate yet, so it cannot open mutual TLS to a meshed
    endpoint (it is not ready either: /ready says so)."""

    status, reason = 503, b"Service Unavailable"


class UpstreamReset(ProxyError):
    """The endpoint closed or reset the connection before a complete response head."""

    status, reason = 502, b"Bad Gateway"


class UpstreamMalformed(ProxyError):
    """The endpoint answered with bytes that are not a valid HTTP/1.x response."""

    status, reason = 502, b"Bad Gateway"


class UpstreamConnectTimeout(EndpointConnectError):
    status, reason = 504, b"Gateway Timeout"


class ResponseTimeout(ProxyError):
    """No response head from the endpoint within the response timeout."""

    status, reason = 504, b"Gateway Timeout"


class DeadlineExceeded(ProxyError):
    """The request's ``grpc-timeout`` passed before its response ended."""

    status, reason, grpc_status = 504, b"Gateway Timeout", 4


class EndpointBusy(ProxyError):
    """Every HTTP/2 connection to the endpoint carries its maximum of streams."""

    status, reason = 503, b"Service Unavailable"


def _header_text(message: str) -> bytes:
    text = message.encode("ascii", "replace")[:MAX_ERROR_TEXT]
    return bytes(c if 0x20 <= c < 0x7F else 0x3F for c in text)  # "?" for the rest


def render(error: ProxyError, *, close: bool, head_only: bool = False) -> bytes:
    """The whole response for ``error``; ``close`` adds ``Connection: close``;
    ``head_only`` (the request was HEAD) leaves the body out but keeps its length."""
    text = _header_text(error.message)
    body = text + b"\n"
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (error.status, error.reason),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        ERROR_HEADER + b": " + text + b"\r\n",
        LINKERD_ERROR_HEADER + b": " + text + b"\r\n",
    ]
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def render_h2(error: ProxyError, grpc: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) of the HTTP/2 answer for ``error``. A gRPC request gets a
    trailers-only response (HTTP 200, ``grpc-status``, ``grpc-message``, no body), the way
    Linkerd answers gRPC clients; others get the status and the text body."""
    text = _header_text(error.message)
    if grpc:
        code = error.grpc_status if error.grpc_status is not None else grpc_from_http(
            error.status)
        return [(b":status", b"200"), (b"content-type", b"application/grpc"),
                (b"grpc-status", b"%d" % code), (b"grpc-message", percent_encode(error.message)),
                (ERROR_HEADER, text), (LINKERD_ERROR_HEADER, text)], b""
    body = text + b"\n"
    return [(b":status", b"%d" % error.status),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)), (ERROR_HEADER, text),
            (LINKERD_ERROR_HEADER, text)], body
