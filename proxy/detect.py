"""Protocol detection on a connection's first bytes: HTTP/2 prior knowledge, HTTP/1.x, or
opaque TCP. Pure code over bytes, no I/O; ``shoal.proxy.accept`` feeds it from sockets.

Rules (the decision is made as early as the bytes allow):
- ``http2``: the data starts with the HTTP/2 connection preface (RFC 9113 section 3.4).
- ``http1``: the data starts with a request line, ``method SP request-target SP
  HTTP/1.0|HTTP/1.1 CRLF`` (RFC 9112 section 3), after any number of empty lines (a server
  SHOULD ignore at least one CRLF before the request line, RFC 9112 section 2.2). The method
  is a token (RFC 9110 section 5.6.2); the target is one or more visible characters or
  obs-text (any of the four request-target forms fits); a method longer than
  MAX_METHOD_BYTES is not taken for one. The terminator must be CRLF: a bare
  LF is not accepted, such a client is forwarded as opaque bytes to the server to judge.
- ``opaque``: as soon as the data cannot be a prefix of either of the above.
- ``None``: the data is still a prefix of one of them; read more (up to MAX_DETECT_BYTES).

A request line longer than MAX_DETECT_BYTES that still looks like one is ``http1``: the
HTTP/1 front end then answers it (414/400) instead of the proxy passing an over-long
request line to the application unchecked.

TLS is a separate question (``detect_tls``), asked only where the proxy may terminate
TLS (the inbound side, where other proxies connect with mutual TLS): a TLS record header
carrying a ClientHello, ``0x16 0x03 0x00-0x04 <length> 0x01`` (RFC 8446 5.1 and 4: the
record type handshake, a legacy record version 3.x, the handshake type client_hello).
``detect`` itself calls a ClientHello opaque, which is right for every other room.
"""

from __future__ import annotations

import re
from typing import Final, Literal

# "tls" only comes from ``detect_tls`` (shoal.proxy.accept.classify with tls=True).
Protocol = Literal["http1", "http2", "opaque", "tls"]

# Linkerd waits 10 s for the first bytes before falling back to opaque. Shoal keeps the
# number because it no longer stalls anyone: a server that speaks first ends detection at
# once when the upstream is connected eagerly (shoal.proxy.accept), so the timeout only
# matters for a client and a server that are both silent, where waiting costs nothing, and
# for an HTTP client that opens a connection early (browser preconnect) and must still be
# seen as HTTP when it sends its request.
DETECT_TIMEOUT_SECONDS: Final = 10.0

# RFC 9112 section 3: "It is RECOMMENDED that all HTTP senders and recipients support, at a
# minimum, request-line lengths of 8000 octets"; nginx and Apache use 8 KiB buffers too.
MAX_DETECT_BYTES: Final = 8192

# The longest method in the IANA HTTP Method Registry is UPDATEREDIRECTREF (17 octets);
# 32 leaves room for extensions and lets a long first word decide "opaque" early.
MAX_METHOD_BYTES: Final = 32

# Linkerd's default opaque ports (SMTP 25, submission 587, MySQL 3306, Galera 4444,
# PostgreSQL 5432, Redis 6379, Elasticsearch transport 9300, memcached 11211), plus NATS:
# clients 4222 (the server speaks first, linkerd2 #13364), cluster routes 6222 and leaf
# nodes 7422, which Shoal's own bus uses between servers.
DEFAULT_OPAQUE_PORTS: Final = frozenset(
    {25, 587, 3306, 4222, 4444, 5432, 6222, 6379, 7422, 9300, 11211}
)

# RFC 9113 section 3.4: the client connection preface starts with this exact sequence.
HTTP2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 8446 5.1: ContentType handshake(22), legacy_record_version 0x0301 (an initial
# ClientHello may say TLS 1.0) or 0x0303; 0x0300-0x0304 are accepted as 3.x. Then the
# record length (2 bytes) and the handshake type client_hello(1) (RFC 8446 4).
TLS_RECORD_HANDSHAKE: Final = 0x16
TLS_MAJOR_VERSION: Final = 0x03
TLS_MAX_MINOR_VERSION: Final = 0x04
TLS_HANDSHAKE_CLIENT_HELLO: Final = 0x01
TLS_DETECT_BYTES: Final = 6

_HTTP1_VERSIONS: Final = (b"HTTP/1.1\r\n", b"HTTP/1.0\r\n")
_CRLF: Final = b"\r\n"
# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" /
#         "|" / "~" / DIGIT / ALPHA                      (RFC 9110 section 5.6.2)
_TOKEN_RUN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
# request-target: visible characters (RFC 9112 section 3.2) and obs-text, no SP or CTL.
_TARGET_RUN: Final = re.compile(rb"[\x21-\x7e\x80-\xff]*")


def detect(data: bytes) -> Protocol | None:
    """The protocol of a connection that began with ``data``, or None if more bytes are
    needed. Only the first MAX_DETECT_BYTES count, and from there on the answer is never
    None; once the answer is not None, more bytes never change it."""
    data = data[:MAX_DETECT_BYTES]
    if data[: len(HTTP2_PREFACE)] == HTTP2_PREFACE[: len(data)]:
        if len(data) >= len(HTTP2_PREFACE):
            return "http2"
        return None  # a prefix of the preface (and maybe of "PRI * HTTP/1.1" too)
    verdict = _http1(data)
    if verdict is True:
        return "http1"
    if verdict is False:
        return "opaque"
    return "http1" if len(data) >= MAX_DETECT_BYTES else None


def _http1(data: bytes) -> bool | None:
    """True: a complete request line; False: cannot become one; None: a prefix of one."""
    size = len(data)
    pos = 0
    while data.startswith(_CRLF, pos):  # empty lines before the request line
        pos += 2
    if pos == size or data[pos:] == b"\r":
        return None
    method_end = _run_end(_TOKEN_RUN, data, pos)
    if method_end - pos > MAX_METHOD_BYTES:
        return False
    if method_end == size:
        return None
    if method_end == pos or data[method_end] != 0x20:
        return False
    target_start = method_end + 1
    target_end = _run_end(_TARGET_RUN, data, target_start)
    if target_end == size:
        return None
    if target_end == target_start or data[target_end] != 0x20:
        return False
    rest = data[target_end + 1 :]
    for version in _HTTP1_VERSIONS:
        if rest.startswith(version):
            return True
    if any(version.startswith(rest) for version in _HTTP1_VERSIONS):
        return None
    return False


def _run_end(run: re.Pattern[bytes], data: bytes, pos: int) -> int:
    """Where the run of characters matched by ``run`` that starts at ``pos`` ends."""
    match = run.match(data, pos)
    return match.end() if match else pos


def detect_tls(data: bytes) -> bool | None:
    """True: ``data`` starts with a TLS record carrying a ClientHello; False: it cannot;
    None: it is a prefix of such a start (read more)."""
    checks = (
        len(data) < 1 or data[0] == TLS_RECORD_HANDSHAKE,
        len(data) < 2 or data[1] == TLS_MAJOR_VERSION,
        len(data) < 3 or data[2] <= TLS_MAX_MINOR_VERSION,
        len(data) < 6 or data[5] == TLS_HANDSHAKE_CLIENT_HELLO,
    )
    if not all(checks):
        return False
    return True if len(data) >= TLS_DETECT_BYTES else None


def is_http2_server_preface(data: bytes) -> bool:
    """``data`` starts with what an HTTP/2 server may send before the client said
    anything: its connection preface, a SETTINGS frame (RFC 9113 3.4: type 0x4, no ACK
    flag, stream 0, a length that is a multiple of 6). gRPC servers send it at once."""
    return (len(data) >= 9 and data[3] == 0x4 and data[4] == 0 and data[5:9] == b"\0\0\0\0"
            and int.from_bytes(data[:3], "big") % 6 == 0)
