"""The header rules the HTTP/2 engine checks itself (h2's own validation is off, see
h2codec.py): plain code over header lists, no I/O.

Requests (RFC 9113 section 8.3.1, 8.2.2): exactly one each of ``:method``, ``:scheme``
and a non-empty ``:path`` (CONNECT is refused: extended CONNECT is not supported), no
unknown or repeated pseudo-header, pseudo-headers before regular ones, no
connection-specific field (``connection``, ``keep-alive``, ``proxy-connection``,
``transfer-encoding``, ``upgrade``), ``te`` only as ``trailers``. Such a request is
malformed: the stream is reset with PROTOCOL_ERROR. The authority is ``:authority``, or
``host`` when that is absent. A request is gRPC when its content-type starts with
``application/grpc``. ``shoal-client-workload`` is the mesh's own field (as in HTTP/1,
http1/framing.py): a client's copy never travels on, its value is kept aside as
``Request.client_workload`` (the caller, for metrics and tap; observe.py).

Responses: a three-digit ``:status``; connection-specific fields are dropped rather than
failing the response. ``grpc-status`` is read from the response head (a trailers-only
response) or from the trailers.
"""

from __future__ import annotations

from typing import Final

from .codec import Headers
from .grpc import parse_status, parse_timeout

CONNECTION_SPECIFIC: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                        b"transfer-encoding", b"upgrade"})
_GRPC_CONTENT_TYPE: Final = b"application/grpc"
# The mesh's caller field (observe.CLIENT_WORKLOAD_HEADER; the codec side may not import it).
CLIENT_WORKLOAD_FIELD: Final = b"shoal-client-workload"


class MalformedHeaders(ValueError):
    """The peer's header block breaks RFC 9113 section 8: a stream error."""


class Request:
    """What the engine reads from a request head; ``headers`` travel on unchanged."""

    __slots__ = ("authority", "client_workload", "grpc", "headers", "method", "path",
                 "timeout")

    def __init__(self, headers: Headers, method: bytes, path: bytes, authority: bytes | None,
                 grpc: bool, timeout: float | None,
                 client_workload: bytes | None = None) -> None:
        self.headers = headers
        self.method = method
        self.path = path
        self.authority = authority
        self.grpc = grpc
        self.timeout = timeout
        self.client_workload = client_workload


def parse_request(headers: Headers) -> Request:
    method = scheme = path = authority = host = None
    regular = False
    grpc = False
    timeout = None
    client = None
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                raise MalformedHeaders(f"pseudo-header {name!r} after a regular field")
            if name == b":method" and method is None:
                method = value
            elif name == b":path" and path is None:
                path = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            elif name == b":authority" and authority is None:
                authority = value
            else:
                raise MalformedHeaders(f"unknown or repeated pseudo-header {name!r}")
            continue
        regular = True
        if name == b"content-type":
            grpc = value.startswith(_GRPC_CONTENT_TYPE)
        elif name == b"grpc-timeout":
            timeout = parse_timeout(value)
        elif name == b"host":
            host = value
        elif name == CLIENT_WORKLOAD_FIELD:
            client = value
        elif name in CONNECTION_SPECIFIC:
            raise MalformedHeaders(f"connection-specific field {name!r}")
        elif name == b"te" and value != b"trailers":
            raise MalformedHeaders("te other than trailers")
    if method is None:
        raise MalformedHeaders("no :method")
    if method == b"CONNECT":
        raise MalformedHeaders("CONNECT over HTTP/2 is not supported")
    if scheme is None or not path:
        raise MalformedHeaders("no :scheme or :path")
    if client is not None:  # rare (a proxy's hop): the field stops here
        headers = [(n, v) for n, v in headers if n != CLIENT_WORKLOAD_FIELD]
    return Request(headers, method, path, authority or host, grpc, timeout, client)


def scan_response(headers: Headers) -> tuple[int, int | None, Headers]:
    """(:status, grpc-status or None, the headers to forward); MalformedHeaders when
    there is no valid :status."""
    status = 0
    grpc_status = None
    dirty = False
    for name, value in headers:
        if name == b":status":
            if len(value) != 3 or not value.isdigit():
                raise MalformedHeaders(f"invalid :status {value!r}")
            status = int(value)
        elif name == b"grpc-status":
            grpc_status = parse_status(value)
        elif name in CONNECTION_SPECIFIC:
            dirty = True
    if not status:
        raise MalformedHeaders("no :status")
    if dirty:
        headers = [(n, v) for n, v in headers if n not in CONNECTION_SPECIFIC]
    return status, grpc_status, headers


def scan_trailers(headers: Headers) -> tuple[int | None, Headers]:
    """(grpc-status or None, the trailers to forward, pseudo-headers and
    connection-specific fields dropped)."""
    grpc_status = None
    dirty = False
    for name, value in headers:
        if name == b"grpc-status":
            grpc_status = parse_status(value)
        elif name[:1] == b":" or name in CONNECTION_SPECIFIC:
            dirty = True
    if dirty:
        headers = [(n, v) for n, v in headers
                   if n[:1] != b":" and n not in CONNECTION_SPECIFIC]
    return grpc_status, headers
