"""Protocol detection on plain bytes (shoal.proxy.detect): what real clients send, every
prefix of it, and properties over generated and random input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.proxy.detect import (
    DEFAULT_OPAQUE_PORTS,
    HTTP2_PREFACE,
    MAX_DETECT_BYTES,
    MAX_METHOD_BYTES,
    detect,
    is_http2_server_preface,
)

HTTP1_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST /api/vote?choice=:doughnut: HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\n",
    b"OPTIONS * HTTP/1.1\r\n",  # asterisk-form
    b"CONNECT web.emojivoto.svc.cluster.local:443 HTTP/1.1\r\n",  # authority-form
    b"GET http://web.emojivoto:8080/api/list HTTP/1.1\r\n",  # absolute-form (http_proxy)
    b"DELETE /a%20b;c?d=e&f#g HTTP/1.1\r\n",
    b"PROPFIND /dav/ HTTP/1.1\r\n",  # WebDAV
    b"UPDATEREDIRECTREF /r HTTP/1.1\r\n",  # the longest registered method
    b"M-SEARCH * HTTP/1.1\r\n",  # SSDP: a token with a dash
    b"PRI * HTTP/1.1\r\n",  # looks like the h2 preface until the version
    b"GET /caf\xc3\xa9 HTTP/1.1\r\n",  # raw UTF-8 (obs-text) in the target
    b"\r\nGET / HTTP/1.1\r\n",  # one empty line first (RFC 9112 section 2.2)
    b"\r\n\r\n\r\nGET / HTTP/1.1\r\n",
]

OPAQUE_STARTS = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS ClientHello
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
    b"\x00\x00\x00\x54\x00\x03\x00\x00user\x00",  # PostgreSQL startup
    b"*1\r\n$4\r\nPING\r\n",  # Redis RESP
    b"PING\r\n",  # Redis inline
    b"SET key value\r\n",  # Redis inline: three words, no HTTP version
    b"get foo\r\n",  # memcached text
    b"set k 0 0 5\r\nhello\r\n",
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",  # SSH client banner
    b"CONNECT {\"verbose\":false} \r\n",  # NATS client CONNECT: not an HTTP version
    b"SUB foo 1\r\n",
    b"EHLO client.example\r\n",  # SMTP
    b"GET / HTTP/1.1\n",  # a bare LF is not taken for HTTP (see the module docstring)
    b"GET / HTTP/2.0\r\n",
    b"GET / HTTP/1.2\r\n",
    b"GET / http/1.1\r\n",
    b"GET  / HTTP/1.1\r\n",  # two spaces
    b"GET /\tx HTTP/1.1\r\n",  # a control character in the target
    b" GET / HTTP/1.1\r\n",
    b"G(ET / HTTP/1.1\r\n",  # "(" is not a token character
    b"\r\r\n",
    b"\n",
    b"\x00",
    b"\xff\xfe",
    b"A" * (MAX_METHOD_BYTES + 1),  # too long for a method, no need to wait for more
]


def prefixes(data: bytes) -> list[bytes]:
    return [data[:i] for i in range(len(data))]


@pytest.mark.parametrize("request_bytes", HTTP1_REQUESTS)
def test_http1_request_lines(request_bytes: bytes) -> None:
    line_end = request_bytes.index(b"\r\n", request_bytes.rindex(b" HTTP/")) + 2
    assert detect(request_bytes) == "http1"
    assert detect(request_bytes[:line_end]) == "http1"
    # Every shorter prefix needs more bytes: the decision waits for the CRLF.
    for prefix in prefixes(request_bytes[:line_end]):
        assert detect(prefix) is None, prefix


def test_http2_preface() -> None:
    assert detect(HTTP2_PREFACE) == "http2"
    settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    assert detect(HTTP2_PREFACE + settings_frame) == "http2"
    for prefix in prefixes(HTTP2_PREFACE):
        assert detect(prefix) is None, prefix
    # A preface after an empty line is not a preface, nor an HTTP/1 request.
    assert detect(b"\r\n" + HTTP2_PREFACE) == "opaque"
    # The preface's request line diverges from HTTP/1 only at the version digit.
    assert detect(b"PRI * HTTP/2.0\r\n\r\nXX") == "opaque"


def test_http2_server_preface() -> None:
    settings = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"
    assert is_http2_server_preface(settings)
    assert is_http2_server_preface(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty
    assert not is_http2_server_preface(settings[:8])  # not a whole frame header yet
    assert not is_http2_server_preface(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")  # ACK
    assert not is_http2_server_preface(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00")  # length
    assert not is_http2_server_preface(b"\x00\x00\x06\x04\x00\x00\x00\x00\x01")  # stream
    for greeting in (b"220 ready\r\n", b"INFO {}\r\n", b"\x4a\x00\x00\x00\x0a8.0.36\x00"):
        assert not is_http2_server_preface(greeting), greeting


@pytest.mark.parametrize("data", OPAQUE_STARTS)
def test_opaque_starts(data: bytes) -> None:
    assert detect(data) == "opaque"


def test_opaque_is_decided_at_the_first_impossible_byte() -> None:
    # A TLS record type byte can start neither an HTTP method nor the preface.
    assert detect(b"\x16") == "opaque"
    assert detect(b"*") is None  # "*" is a token character: could be a method
    assert detect(b"*1\r") == "opaque"
    assert detect(b"GET / HTTP/1.") is None
    assert detect(b"GET / HTTP/1.x") == "opaque"
    assert detect(b"GET / X") == "opaque"


def test_empty_and_empty_lines_need_more() -> None:
    assert detect(b"") is None
    assert detect(b"\r") is None
    assert detect(b"\r\n") is None
    assert detect(b"\r\n\r") is None


def test_long_request_line_is_http1_at_the_bound() -> None:
    target = b"/" + b"a" * (2 * MAX_DETECT_BYTES)
    line = b"GET " + target + b" HTTP/1.1\r\n"
    assert detect(line[: MAX_DETECT_BYTES - 1]) is None
    assert detect(line[:MAX_DETECT_BYTES]) == "http1"
    assert detect(line) == "http1"
    # Only the first MAX_DETECT_BYTES count: garbage after them changes nothing.
    assert detect(line[:MAX_DETECT_BYTES] + b"\x00 nonsense") == "http1"


def test_long_run_of_empty_lines_is_decided_at_the_bound() -> None:
    assert detect(b"\r\n" * (MAX_DETECT_BYTES // 2 - 1)) is None
    assert detect(b"\r\n" * (MAX_DETECT_BYTES // 2)) == "http1"


def test_method_length_bound() -> None:
    assert detect(b"A" * MAX_METHOD_BYTES) is None
    assert detect(b"A" * MAX_METHOD_BYTES + b" / HTTP/1.1\r\n") == "http1"
    assert detect(b"A" * (MAX_METHOD_BYTES + 1) + b" / HTTP/1.1\r\n") == "opaque"


def test_default_opaque_ports() -> None:
    linkerd = {25, 587, 3306, 4444, 5432, 6379, 9300, 11211}
    assert linkerd <= DEFAULT_OPAQUE_PORTS
    assert 4222 in DEFAULT_OPAQUE_PORTS  # NATS clients: the server speaks first
    assert {80, 443, 8080, 4140, 4143, 4191}.isdisjoint(DEFAULT_OPAQUE_PORTS)
    assert isinstance(DEFAULT_OPAQUE_PORTS, frozenset)


# -- properties -----------------------------------------------------------------------------

TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TARGET_CHARS = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))

methods = st.binary(min_size=1, max_size=MAX_METHOD_BYTES).map(
    lambda raw: bytes(TCHARS[b % len(TCHARS)] for b in raw))
targets = st.binary(min_size=1, max_size=300).map(
    lambda raw: bytes(TARGET_CHARS[b % len(TARGET_CHARS)] for b in raw))
versions = st.sampled_from([b"HTTP/1.0", b"HTTP/1.1"])
empty_lines = st.integers(min_value=0, max_value=3).map(lambda n: b"\r\n" * n)


@st.composite
def request_lines(draw: st.DrawFn) -> bytes:
    return (draw(empty_lines) + draw(methods) + b" " + draw(targets) + b" "
            + draw(versions) + b"\r\n")


@settings(max_examples=300)
@given(request_lines(), st.binary(max_size=64))
def test_any_request_line_is_http1(line: bytes, rest: bytes) -> None:
    assert detect(line + rest) == "http1"
    for cut in range(len(line)):
        assert detect(line[:cut]) is None


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_preface_then_anything_is_http2(rest: bytes) -> None:
    assert detect(HTTP2_PREFACE + rest) == "http2"


@settings(max_examples=500)
@given(st.binary(max_size=200), st.binary(max_size=50))
def test_decisions_are_final(data: bytes, more: bytes) -> None:
    """Any bytes give an answer without an exception, and once there is an answer, more
    bytes never change it (so feeding a socket's reads one by one is safe)."""
    first = detect(data)
    assert first in (None, "http1", "http2", "opaque")
    if first is not None:
        assert detect(data + more) == first


@settings(max_examples=200)
@given(request_lines(), st.integers(min_value=0, max_value=10_000), st.integers(0, 255))
def test_mutated_request_lines_are_final(line: bytes, position: int, value: int) -> None:
    """Mutating one byte of a request line gives some answer; feeding it in pieces gives
    the same final answer as feeding it whole."""
    data = bytearray(line)
    data[position % len(data)] = value
    whole = detect(bytes(data))
    seen: str | None = None
    for cut in range(1, len(data) + 1):
        answer = detect(bytes(data[:cut]))
        if seen is not None:
            assert answer == seen
        seen = answer
    assert seen == whole


@settings(max_examples=100)
@given(st.binary(max_size=100), st.integers(0, 255), st.integers(0, 100))
def test_never_undecided_at_the_bound(head: bytes, fill: int, extra: int) -> None:
    data = head + bytes([fill]) * (MAX_DETECT_BYTES + extra - len(head))
    assert detect(data) is not None
    assert detect(data) == detect(data[:MAX_DETECT_BYTES])
