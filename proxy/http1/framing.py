"""HTTP/1.1 framing decisions as plain code over parsed heads: no sockets, no await.

The server and client Protocols hand this module what httptools parsed (method, target,
version, the header list) and get back a head object that says how the body is framed,
whether the connection stays open, whether the peer asks to switch protocols, and which
headers travel to the next hop. The rules, with their sources:

* Hop-by-hop fields (RFC 9110 7.6.1): ``Connection`` and every field it lists, plus
  ``Proxy-Connection``, ``Keep-Alive``, ``TE``, ``Transfer-Encoding`` and ``Upgrade``, are
  meant for one connection and are not forwarded; the proxy writes its own.
  ``Proxy-Authorization`` (requests) and ``Proxy-Authenticate`` (responses) are for the
  proxy a client was configured with, which is this one, so they stop here too.
* Message body length (RFC 9112 6.3): a response to HEAD, a 1xx, 204 or 304 has no body;
  ``Transfer-Encoding`` ending in ``chunked`` is chunked; another transfer coding in a
  response is read until close; ``Content-Length`` gives the length; a response with
  neither is read until close. A request with neither has no body.
* Request smuggling guards (RFC 9112 6.1, 6.3): a request with both Transfer-Encoding and
  Content-Length, with a transfer coding that does not end in chunked, with differing
  Content-Length values, or an HTTP/1.1 request without exactly one Host is rejected (400).
* Persistence (RFC 9112 9.3): HTTP/1.1 stays open unless ``close`` is listed; HTTP/1.0
  only with ``keep-alive``. A close-delimited response ends its connection.
* Upgrade (RFC 9110 7.8): honoured only on HTTP/1.1 requests that list ``upgrade`` in
  Connection; after a 101 both connections carry opaque bytes.
* Expect: 100-continue (RFC 9110 10.1.1) travels end to end; interim 1xx responses are
  relayed to HTTP/1.1 clients and dropped for HTTP/1.0 ones.
* ``shoal-client-workload`` (observe.CLIENT_WORKLOAD_HEADER) is the mesh's own field: a
  client's copy never travels on (so an app cannot pose as another workload to the next
  proxy), its value is kept aside as ``RequestHead.client_workload``.

Bodies are forwarded as they arrive. Content-Length bodies keep their header and bytes;
chunked bodies are re-chunked one chunk per read (with the received Transfer-Encoding
value and the trailers), or sent close-delimited to an HTTP/1.0 client.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MalformedRequest, UpstreamMalformed

Header = tuple[bytes, bytes]


class Body(enum.IntEnum):
    NONE = 0  # no body at all
    LENGTH = 1  # Content-Length bytes
    CHUNKED = 2  # chunked transfer coding
    CLOSE = 3  # everything until the connection closes (responses only)


# RFC 9110 7.6.1: dropped in both directions; the proxy writes its own framing fields.
HOP_BY_HOP: frozenset[bytes] = frozenset({
    b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding",
    b"upgrade",
})

# Fields whose values the framing rules read; everything else is only filtered.
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONNECTION = b"connection"
_PROXY_CONNECTION = b"proxy-connection"
_HOST = b"host"
_UPGRADE = b"upgrade"
_EXPECT = b"expect"

LAST_CHUNK = b"0\r\n\r\n"
CRLF = b"\r\n"
# Methods that a reused keep-alive connection may be retried with when it turns out to
# have been closed by the server before any response byte (RFC 9110 9.2.2: idempotent).
IDEMPOTENT_METHODS: frozenset[bytes] = frozenset({
    b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE",
})


# The Connection values nearly every peer sends, pre-parsed (the hot path's shortcut).
_COMMON_CONNECTION: dict[bytes, frozenset[bytes]] = {
    value: frozenset({value.lower()})
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def connection_tokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """The lower-cased tokens of one or more ``Connection`` field values."""
    if len(values) == 1:
        common = _COMMON_CONNECTION.get(values[0])
        if common is not None:
            return common
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def parse_content_length(values: Sequence[bytes]) -> int | None:
    """RFC 9110 8.6: one non-negative decimal, or a list of identical ones; else None."""
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])  # the usual single value: the loop below says the same
    found: int | None = None
    for value in values:
        for item in value.split(b","):
            item = item.strip()
            if not item.isdigit() or len(item) > 18:  # 18 digits: far above any body
                return None
            length = int(item)
            if found is not None and found != length:
                return None
            found = length
    return found


def _last_coding(values: Sequence[bytes]) -> bytes:
    codings = [c.strip().lower() for v in values for c in v.split(b",") if c.strip()]
    return codings[-1] if codings else b""


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    minor: int  # HTTP/1.<minor>
    headers: list[Header]  # end-to-end fields, in order
    host: bytes | None
    body: Body
    content_length: int
    keep_alive: bool  # the client wants the connection kept open
    upgrade: bytes | None  # the Upgrade value when the client asks to switch protocols
    expect_continue: bool
    transfer_encoding: bytes  # the received value, re-sent when re-chunking
    # Set by the router: send ``host`` as the Host field (absolute-form, RFC 9112 3.2.2,
    # or an HTTP/1.0 request that had none).
    rewrite_host: bool = False
    # The caller's ``shoal-client-workload`` value (the field itself is not forwarded).
    client_workload: bytes | None = None

    @property
    def is_connect(self) -> bool:
        return self.method == b"CONNECT"


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[Header]
    body: Body
    content_length: int
    keep_alive: bool  # the upstream connection may carry another request afterwards
    upgrade: bytes | None  # 101 to an upgrade request: the protocol switched to
    transfer_encoding: bytes


# What a field name means to framing. Kept fields travel on and are also read; the
# others are hop-by-hop: read (or just noted) and left out of ``FieldScan.headers``.
_F_HOST, _F_LENGTH, _F_EXPECT, _F_CODING, _F_CONNECTION, _F_UPGRADE, _F_HOP, _F_CLIENT = (
    range(1, 9))
# The mesh's caller field (observe.CLIENT_WORKLOAD_HEADER; framing may not import it).
CLIENT_WORKLOAD_FIELD = b"shoal-client-workload"
_COMMON_FIELDS = {
    _CONTENT_LENGTH: _F_LENGTH, _TRANSFER_ENCODING: _F_CODING, _CONNECTION: _F_CONNECTION,
    _PROXY_CONNECTION: _F_CONNECTION, _UPGRADE: _F_UPGRADE, b"keep-alive": _F_HOP,
    b"te": _F_HOP,
}
REQUEST_FIELDS: dict[bytes, int] = {
    **_COMMON_FIELDS, _HOST: _F_HOST, _EXPECT: _F_EXPECT, b"proxy-authorization": _F_HOP,
    CLIENT_WORKLOAD_FIELD: _F_CLIENT}
RESPONSE_FIELDS: dict[bytes, int] = {**_COMMON_FIELDS, b"proxy-authenticate": _F_HOP}
# Connection tokens that name no field of their own: they never widen the drop set.
_PLAIN_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})
_NO_TOKENS: frozenset[bytes] = frozenset()


def _join(previous: bytes | None, value: bytes) -> bytes:
    """Several lines of one field are one comma-separated list (RFC 9110 5.3)."""
    return value if previous is None else previous + b", " + value


def _end_to_end(headers: list[Header], drop: frozenset[bytes]) -> list[Header]:
    return [h for h in headers if h[0].lower() not in drop]


class FieldScan:
    """A head's fields as the parser reports them, one ``add`` per field: end-to-end
    fields go to ``headers`` in order, hop-by-hop ones are left out, and the values the
    framing rules need are kept aside. The protocols hand ``add`` to httptools as the
    ``on_header`` callback, so each field costs one call; ``reset`` between heads."""

    __slots__ = ("client", "coding", "connection", "expect", "fields", "headers", "host",
                 "hosts", "length", "size", "upgrade")

    def __init__(self, fields: dict[bytes, int]) -> None:
        self.fields = fields
        self.headers: list[Header] = []
        self.size = 0  # bytes of names and values, for the head-size limit
        self.hosts = 0
        self.host: bytes | None = None
        self.length: bytes | None = None
        self.expect: bytes | None = None
        self.coding: bytes | None = None
        self.connection: bytes | None = None
        self.upgrade: bytes | None = None
        self.client: bytes | None = None

    def reset(self) -> None:
        self.headers = []
        self.size = self.hosts = 0
        self.host = self.length = self.expect = None
        self.coding = self.connection = self.upgrade = self.client = None

    def trailers(self) -> None:
        """The head was taken: what ``add`` gets from now on are trailer fields."""
        self.headers = []
        self.size = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value)
        code = self.fields.get(name.lower())
        if code is None:
            self.headers.append((name, value))
        elif code <= _F_EXPECT:
            self.headers.append((name, value))
            if code == _F_HOST:
                self.host = value
                self.hosts += 1
            elif code == _F_LENGTH:
                self.length = _join(self.length, value)
            else:
                self.expect = value
        elif code == _F_CODING:
            self.coding = _join(self.coding, value)
        elif code == _F_CONNECTION:
            self.connection = _join(self.connection, value)
        elif code == _F_UPGRADE:
            self.upgrade = _join(self.upgrade, value)
        elif code == _F_CLIENT:
            self.client = value  # one value: a repeated field keeps the last


def scan_of(headers: list[Header], fields: dict[bytes, int]) -> FieldScan:
    scan = FieldScan(fields)
    for name, value in headers:
        scan.add(name, value)
    return scan


def analyze_request(method: bytes, target: bytes, minor: int,
                    headers: list[Header] | FieldScan) -> RequestHead:
    """Framing of a parsed request; raises MalformedRequest (400) when unsafe to forward."""
    scan = headers if isinstance(headers, FieldScan) else scan_of(headers, REQUEST_FIELDS)
    if scan.hosts > 1:
        raise MalformedRequest("malformed request: more than one Host header")
    if minor >= 1 and not scan.hosts:
        raise MalformedRequest("malformed request: HTTP/1.1 request without a Host header")
    connection = scan.connection
    tokens = connection_tokens((connection,)) if connection is not None else _NO_TOKENS
    body, length = Body.NONE, 0
    coding = scan.coding
    if coding is not None:
        if scan.length is not None:
            raise MalformedRequest(
                "malformed request: both Transfer-Encoding and Content-Length")
        if _last_coding((coding,)) != b"chunked":
            raise MalformedRequest(
                "malformed request: Transfer-Encoding does not end in chunked")
        body = Body.CHUNKED
    elif scan.length is not None:
        parsed = parse_content_length((scan.length,))
        if parsed is None:
            raise MalformedRequest("malformed request: invalid Content-Length")
        length = parsed
        body = Body.LENGTH if parsed else Body.NONE
    keep_alive = b"close" not in tokens if minor >= 1 else b"keep-alive" in tokens
    upgrade = None
    if minor >= 1 and scan.upgrade and b"upgrade" in tokens and method != b"CONNECT":
        upgrade = scan.upgrade
    expect = scan.expect
    expect_continue = (minor >= 1 and expect is not None
                       and expect.strip().lower() == b"100-continue")
    kept = scan.headers
    if not tokens <= _PLAIN_TOKENS:  # Connection names end-to-end fields: drop those too
        kept = _end_to_end(kept, tokens)
    # Content-Length stays: the body bytes are forwarded unchanged, so it holds.
    return RequestHead(method, target, minor, kept, scan.host, body, length, keep_alive,
                       upgrade, expect_continue, coding or b"", client_workload=scan.client)


def analyze_response(status: int, reason: bytes, minor: int,
                     headers: list[Header] | FieldScan, request: RequestHead) -> ResponseHead:
    """Framing of a parsed response to ``request``; raises UpstreamMalformed (502)."""
    scan = headers if isinstance(headers, FieldScan) else scan_of(headers, RESPONSE_FIELDS)
    connection = scan.connection
    tokens = connection_tokens((connection,)) if connection is not None else _NO_TOKENS
    drop = _NO_TOKENS if tokens <= _PLAIN_TOKENS else tokens
    body, length = Body.CLOSE, 0
    coding = scan.coding
    if request.method == b"HEAD" or status < 200 or status == 204 or status == 304:
        body = Body.NONE
    elif coding is not None:
        # RFC 9112 6.3 item 3: Transfer-Encoding overrides Content-Length, which goes.
        if scan.length is not None:
            drop = drop | {_CONTENT_LENGTH}
        body = Body.CHUNKED if _last_coding((coding,)) == b"chunked" else Body.CLOSE
    elif scan.length is not None:
        parsed = parse_content_length((scan.length,))
        if parsed is None:
            raise UpstreamMalformed("malformed response from upstream: invalid Content-Length")
        length = parsed
        body = Body.LENGTH if parsed else Body.NONE
    upgrade = None
    if status == 101:
        if request.upgrade is None or not scan.upgrade:
            raise UpstreamMalformed("upstream switched protocols without an upgrade request")
        upgrade = scan.upgrade
    keep_alive = b"close" not in tokens if minor >= 1 else b"keep-alive" in tokens
    keep_alive = keep_alive and body is not Body.CLOSE and upgrade is None
    kept = _end_to_end(scan.headers, drop) if drop else scan.headers
    return ResponseHead(status, reason, kept, body, length, keep_alive, upgrade,
                        coding or b"")


def downstream_body(response: ResponseHead, request: RequestHead) -> Body:
    """How the response body is framed toward the client: chunked only to HTTP/1.1
    clients; an HTTP/1.0 client gets the bytes close-delimited instead."""
    if response.body is Body.CHUNKED and request.minor == 0:
        return Body.CLOSE
    return response.body


def must_close_downstream(response: ResponseHead, request: RequestHead, out_body: Body,
                          request_complete: bool, draining: bool) -> bool:
    """Whether the client connection ends after this response.

    An unfinished request body (the upstream answered early) cannot be told apart from
    the next request, so that connection closes too (RFC 9112 9.6)."""
    return (draining or not request.keep_alive or out_body is Body.CLOSE
            or not request_complete)


def render_request_head(request: RequestHead) -> bytes:
    """The request head for the upstream, always HTTP/1.1, with ``request.target`` (the
    router may have turned absolute-form into origin-form) and, when the router set
    ``rewrite_host``, ``request.host`` replacing or adding the Host field."""
    parts = [b"%s %s HTTP/1.1\r\n" % (request.method, request.target)]
    if request.rewrite_host and request.host is not None:
        host = request.host
        replaced = False
        for name, value in request.headers:
            if len(name) == 4 and name.lower() == _HOST:
                value, replaced = host, True
            parts.append(b"%s: %s\r\n" % (name, value))
        if not replaced:
            parts.append(b"Host: %s\r\n" % host)
    else:
        parts += [b"%s: %s\r\n" % field for field in request.headers]
    if request.body is Body.CHUNKED:
        parts += (b"Transfer-Encoding: ", request.transfer_encoding, CRLF)
    if request.upgrade is not None:
        parts += (b"Connection: upgrade\r\nUpgrade: ", request.upgrade, CRLF)
    parts.append(CRLF)
    return b"".join(parts)


def render_response_head(response: ResponseHead, out_body: Body, close: bool,
                         client_minor: int) -> list[bytes]:
    """The response head for the client, as parts to be joined with the first body
    bytes into one write."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason)]
    parts += [b"%s: %s\r\n" % field for field in response.headers]
    if out_body is Body.CHUNKED:
        parts += (b"Transfer-Encoding: ", response.transfer_encoding, CRLF)
    if response.upgrade is not None:
        parts += (b"Connection: upgrade\r\nUpgrade: ", response.upgrade, CRLF)
    elif close:
        parts.append(b"Connection: close\r\n")
    elif client_minor == 0:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(CRLF)
    return parts


def render_interim(status: int, reason: bytes, headers: list[Header]) -> bytes:
    """A 1xx interim response (100 Continue, 103 Early Hints) relayed to the client;
    ``headers`` are end-to-end already (FieldScan)."""
    parts = [b"HTTP/1.1 %d " % status, reason, CRLF]
    for name, value in headers:
        parts += (name, b": ", value, CRLF)
    parts.append(CRLF)
    return b"".join(parts)


def chunk_header(size: int) -> bytes:
    return b"%x\r\n" % size


def last_chunk(trailers: Sequence[Header]) -> bytes:
    """The zero chunk with the trailer fields that arrived (RFC 9112 7.1.2)."""
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for name, value in trailers:
        parts += (name, b": ", value, CRLF)
    parts.append(CRLF)
    return b"".join(parts)


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """``http://authority/path?q`` -> (authority, origin-form); None when not absolute.

    Only ``http`` is accepted: a client speaks TLS to an https origin through CONNECT."""
    if target[:1] == b"/" or b"://" not in target[:16]:
        return None
    scheme, _, rest = target.partition(b"://")
    if scheme.lower() != b"http":
        raise MalformedRequest(f"unsupported scheme in absolute-form target: {scheme!r}")
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(i for i in (slash, query, len(rest)) if i >= 0)
    authority, path = rest[:cut], rest[cut:]
    authority = authority.rpartition(b"@")[2]  # userinfo is deprecated (RFC 9110 4.2.4)
    if not authority:
        raise MalformedRequest("absolute-form target without an authority")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def is_retryable(request: RequestHead) -> bool:
    """A request the proxy may send again on a fresh connection when a reused one was
    closed by the server before any response byte: idempotent and without a body (its
    bytes are not kept)."""
    return (request.body is Body.NONE and request.upgrade is None
            and request.method in IDEMPOTENT_METHODS)
