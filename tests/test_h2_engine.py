"""The HTTP/2 engine without processes: the pure header and gRPC rules, then a client
connection (http2/server.py) driven with bytes on a fake transport in front of a real
in-loop HTTP/2 upstream: relaying, drain, a slow reader's bound, and mutated frames fed
by hypothesis (a clean GOAWAY or close, never an exception or a hang)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import h2.connection
import h2.events
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.proxy.config import H2_STREAM_WINDOW
from shoal.proxy.detect import HTTP2_PREFACE
from shoal.proxy.errors import DeadlineExceeded, NoEndpoints, render_h2
from shoal.proxy.http2 import grpc
from shoal.proxy.http2.codec import error_name
from shoal.proxy.http2.headers import (
    MalformedHeaders,
    parse_request,
    scan_response,
    scan_trailers,
)

from .h2support import Client, context, serve, upstream_server

WAIT = 5.0  # every wait for the engine in these tests is bounded by this


# -- pure rules ----------------------------------------------------------------------------

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.E/U"),
           (b":authority", b"web.emojivoto:8080"), (b"content-type", b"application/grpc"),
           (b"te", b"trailers"), (b"grpc-timeout", b"250m")]


def test_request_rules() -> None:
    request = parse_request(REQUEST)
    assert request.authority == b"web.emojivoto:8080"
    assert request.grpc and request.timeout == 0.25 and request.method == b"POST"
    assert request.headers is REQUEST  # forwarded as it came, no copy
    host_only = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                 (b"host", b"web")]
    assert parse_request(host_only).authority == b"web"
    assert not parse_request(host_only).grpc
    assert parse_request(host_only).client_workload is None
    stamped = parse_request([*host_only, (b"shoal-client-workload", b"demo/web"),
                             (b"x-after", b"1")])
    assert stamped.client_workload == b"demo/web"  # the mesh's field stops here
    assert stamped.headers == [*host_only, (b"x-after", b"1")]
    assert [error_name(code) for code in (0x0, 0x2, 0x7, 0x8, 0xD, 0x2F)] == [
        "NO_ERROR", "INTERNAL_ERROR", "REFUSED_STREAM", "CANCEL", "HTTP_1_1_REQUIRED", "0x2f"]


@pytest.mark.parametrize("headers", [
    [(b":scheme", b"http"), (b":path", b"/")],  # no :method
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"")],  # empty :path
    [(b":method", b"GET"), (b":path", b"/")],  # no :scheme
    [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":status", b"200")],
    [(b":method", b"GET"), (b"x", b"1"), (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"connection", b"x")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b"transfer-encoding", b"chunked")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"te", b"gzip")],
    [(b":method", b"CONNECT"), (b":authority", b"x:1")],
])
def test_malformed_requests(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedHeaders):
        parse_request(headers)


def test_response_and_trailer_rules() -> None:
    status, grpc_status, headers = scan_response(
        [(b":status", b"200"), (b"grpc-status", b"2"), (b"connection", b"close")])
    assert (status, grpc_status) == (200, 2)
    assert headers == [(b":status", b"200"), (b"grpc-status", b"2")]
    with pytest.raises(MalformedHeaders):
        scan_response([(b":status", b"20x")])
    with pytest.raises(MalformedHeaders):
        scan_response([(b"grpc-status", b"0")])
    assert scan_trailers([(b"grpc-status", b"0"), (b":status", b"200")]) == (
        0, [(b"grpc-status", b"0")])
    assert scan_trailers([(b"grpc-status", b"junk")])[0] == grpc.UNKNOWN


def test_grpc_rules() -> None:
    assert grpc.parse_timeout(b"1H") == 3600.0
    assert grpc.parse_timeout(b"100m") == pytest.approx(0.1)
    assert grpc.parse_timeout(b"99999999n") == pytest.approx(0.099999999)
    for bad in (b"", b"m", b"123456789S", b"1x", b"-1S", b"1.5S"):
        assert grpc.parse_timeout(bad) is None
    assert grpc.percent_encode("a b%ü") == b"a b%25%C3%BC"
    assert not grpc.endpoint_ok(grpc.UNAVAILABLE) and grpc.endpoint_ok(grpc.UNKNOWN)
    assert grpc.from_http(503) == grpc.UNAVAILABLE and grpc.from_http(418) == grpc.UNKNOWN


def test_error_rendering_for_grpc_and_http() -> None:
    headers, body = render_h2(NoEndpoints("no endpoints for web.emojivoto"), grpc=True)
    fields = dict(headers)
    assert fields[b":status"] == b"200" and fields[b"grpc-status"] == b"14" and body == b""
    assert fields[b"l5d-proxy-error"] == b"no endpoints for web.emojivoto"
    headers, body = render_h2(DeadlineExceeded("late"), grpc=True)
    assert dict(headers)[b"grpc-status"] == b"4"
    headers, body = render_h2(NoEndpoints("none"), grpc=False)
    assert dict(headers)[b":status"] == b"503" and body == b"none\n"


# -- the engine on a fake transport ----------------------------------------------------------


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[tuple[int, dict[str, int]]]:
    stats: dict[str, int] = {}
    async with upstream_server(stats) as port:
        yield port, stats


async def _until(predicate: object, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_relays_a_request_and_its_response(
        upstream: tuple[int, dict[str, int]]) -> None:
    conn, transport = serve(context(upstream[0]))
    client = Client()
    stream = client.request("/")
    conn.data_received(client.take())

    def answered() -> bool:
        client.read(transport)
        return any(isinstance(e, h2.events.StreamEnded) for e in client.events)

    await _until(answered, "response")
    response = next(e for e in client.events if isinstance(e, h2.events.ResponseReceived))
    assert response.stream_id == stream
    fields = {str(name): str(value) for name, value in response.headers}  # utf-8 client
    assert fields["x-backend"] == "up"
    body = b"".join(e.data for e in client.events if isinstance(e, h2.events.DataReceived))
    assert body == b"ok"
    assert not conn.exchanges
    transport.close()


async def test_drain_sends_goaway_and_finishes_the_stream_in_flight(
        upstream: tuple[int, dict[str, int]]) -> None:
    conn, transport = serve(context(upstream[0]))
    client = Client()
    stream = client.request("/slow")
    conn.data_received(client.take())
    await _until(lambda: conn.exchanges and next(iter(conn.exchanges.values())).client,
                 "dispatch")
    conn.drain()
    await asyncio.sleep(0.01)
    client.read(transport)
    goaway = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == 0 and goaway[0].last_stream_id == stream
    # A new stream after the GOAWAY is refused; the one in flight still completes.
    # (h2 closes its own state on a GOAWAY; reopen it to play a client that ignores it.)
    client.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
    refused = client.request("/")
    conn.data_received(client.take())

    def done() -> bool:
        client.read(transport)
        return transport.closed

    await _until(done, "close after the last stream")
    ended = [e.stream_id for e in client.events if isinstance(e, h2.events.StreamEnded)]
    resets = {e.stream_id: e.error_code for e in client.events
              if isinstance(e, h2.events.StreamReset)}
    assert stream in ended
    assert resets.get(refused) == 7  # REFUSED_STREAM


async def test_a_slow_reader_is_bounded_by_the_windows(
        upstream: tuple[int, dict[str, int]]) -> None:
    """The client never acknowledges: the proxy holds at most its stream window and the
    upstream stops at the windows, far below the 2 MB it wants to send."""
    port, stats = upstream
    sent_before = stats.get("sent", 0)
    conn, transport = serve(context(port))
    client = Client()
    client.request("/big")
    conn.data_received(client.take())
    await asyncio.sleep(0.5)
    client.read(transport, ack=False)
    exchange = next(iter(conn.exchanges.values()))
    assert exchange.down is not None
    assert exchange.down.size <= H2_STREAM_WINDOW
    sent = stats["sent"] - sent_before
    assert 0 < sent <= 65_535 + H2_STREAM_WINDOW + 64 * 1024
    received = sum(len(e.data) for e in client.events if isinstance(e, h2.events.DataReceived))
    assert received <= 65_535
    transport.close()
    await asyncio.sleep(0.01)
    assert not conn.exchanges


# -- fuzzing the client side with mutated frames ---------------------------------------------

_ENCODER = hpack.Encoder()
_BLOCK = _ENCODER.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                          (b":authority", b"up"), (b"x-fuzz", b"1")])


def _frame(kind: int, stream: int, flags: int) -> Frame:
    stream_id = stream * 2 + 1
    if kind == 0:
        headers = HeadersFrame(stream_id, _BLOCK)
        headers.flags.add("END_HEADERS")
        if flags & 1:
            headers.flags.add("END_STREAM")
        return headers
    if kind == 1:
        data = DataFrame(stream_id, b"d" * (flags * 7))
        if flags & 1:
            data.flags.add("END_STREAM")
        return data
    if kind == 2:
        return WindowUpdateFrame(stream_id if flags & 1 else 0, window_increment=flags + 1)
    if kind == 3:
        return PingFrame(0, opaque_data=b"12345678")
    if kind == 4:
        return RstStreamFrame(stream_id, error_code=flags)
    if kind == 5:
        return SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: flags * 1000,
                                          SettingsFrame.MAX_CONCURRENT_STREAMS: flags})
    if kind == 6:
        return PriorityFrame(stream_id, depends_on=flags, stream_weight=flags)
    if kind == 7:
        return HeadersFrame(stream_id, _BLOCK[:5])  # CONTINUATION expected next
    if kind == 8:
        continuation = ContinuationFrame(stream_id, _BLOCK[5:])
        continuation.flags.add("END_HEADERS")
        return continuation
    return GoAwayFrame(0, last_stream_id=stream_id, error_code=flags)


FRAMES = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3), st.integers(0, 15)),
                  min_size=1, max_size=12)
MUTATIONS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4095), st.integers(0, 255)),
                     max_size=6)


def _mutate(data: bytes, mutations: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        if not out:
            break
        index = where % len(out)
        if kind == 0:
            out[index] = value  # overwrite a byte (lengths, types, flags, ids, HPACK)
        elif kind == 1:
            out.insert(index, value)
        else:
            del out[index:index + 1 + value % 16]
    return bytes(out)


def _parse_frames(data: bytes) -> list[Frame]:
    """What the proxy wrote must be well-formed HTTP/2 frames, whole."""
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        frames.append(frame)
        data = data[9 + length:]
    return frames


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=FRAMES, mutations=MUTATIONS, split=st.integers(1, 64))
async def test_mutated_frames_end_cleanly(upstream: tuple[int, dict[str, int]],
                                         frames: list[tuple[int, int, int]],
                                         mutations: list[tuple[int, int, int]],
                                         split: int) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        data = HTTP2_PREFACE + _mutate(
            b"".join(_frame(*spec).serialize() for spec in frames), mutations)
        conn, transport = serve(context(upstream[0]))
        for start in range(0, len(data), split):
            conn.data_received(data[start:start + split])  # never raises
        await asyncio.sleep(0.02)  # let dispatched streams reach the upstream and back
        closed_by_proxy = transport.closed
        if not closed_by_proxy:
            transport.close()  # the client goes away
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert conn.closed and not conn.exchanges  # every stream ended with the connection
        written = _parse_frames(bytes(transport.out))
        assert isinstance(written[0], SettingsFrame)
        if closed_by_proxy and not conn.peer_gone:
            # A connection error (not the client's own GOAWAY or EOF): the GOAWAY said
            # why, last, before the close.
            assert isinstance(written[-1], GoAwayFrame) and written[-1].error_code != 0
        assert not errors, errors
    finally:
        loop.set_exception_handler(previous)


async def test_ping_is_answered_and_oversized_headers_end_the_connection(
        upstream: tuple[int, dict[str, int]]) -> None:
    conn, transport = serve(context(upstream[0]))
    client = Client()
    client.conn.ping(b"shoal-h2")
    conn.data_received(client.take())
    await asyncio.sleep(0.01)
    events = client.read(transport)
    acks = [e for e in events if isinstance(e, h2.events.PingAckReceived)]
    assert acks and acks[0].ping_data == b"shoal-h2"
    # A header list over H2_MAX_HEADER_LIST_SIZE (64 KiB decoded): GOAWAY, then the close.
    stream = client.conn.get_next_available_stream_id()
    client.conn.send_headers(stream, [(":method", "GET"), (":scheme", "http"), (":path", "/"),
                                      (":authority", "up"), ("x-big", "v" * 70_000)])
    conn.data_received(client.take())
    await asyncio.sleep(0.01)
    assert transport.closed
    frames = _parse_frames(bytes(transport.out))
    assert isinstance(frames[-1], GoAwayFrame) and frames[-1].error_code != 0
