"""The proxy's metrics-and-tap hooks (proxy/observe.py): route labels and their bound,
the caller's workload, the per-request observer's events and counts as plain code, then
through the real HTTP/1 engine on loopback sockets (the caller field stamped outbound,
stripped inbound, tap events with trailers and byte counts, proxy-made errors tapped)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from shoal.proxy.config import Http1Settings
from shoal.proxy.http1.client import Pool
from shoal.proxy.http1.server import Connections, ServerContext, ServerProtocol
from shoal.proxy.metrics import ProxyMetrics
from shoal.proxy.observe import (
    CLIENT_WORKLOAD_HEADER,
    MAX_ROUTE_SEGMENTS,
    OTHER_ROUTE,
    TAP_OFF,
    Observer,
    RequestObserver,
    RouteSeries,
    RouteTable,
    grpc_status_of,
    parse_client_workload,
    route_template,
    workload_of_identity,
)
from shoal.proxy.route import FixedRouter, FixedTarget, NullRequestCounter, NullTcpCounter
from shoal.proxy.tap import REDACTED, LocalProxy, TapRegistry
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.metrics import RequestRow
from shoal.schemas.tap import (
    Peer,
    TapEvent,
    TapFilter,
    TapRequestStart,
    TapResponseEnd,
    TapResponseStart,
    TapSession,
)

from .apps import LOOPBACK, free_port

LOCAL = LocalProxy("demo", "web", "web-1")
EVENTS: Decoder[TapEvent] = Decoder(TapEvent, "test")
IO_TIMEOUT = 10.0


@pytest.mark.parametrize(("method", "path", "label"), [
    ("GET", "/api/vote?choice=:doughnut:", "GET /api/vote"),
    ("GET", "/", "GET /"),
    ("GET", "", "GET /"),
    ("POST", "/users/12345/orders", "POST /users/{id}/orders"),
    ("GET", "/a/b/c/d/e", "GET /a/b/c/*"),
    ("GET", "/item/3f2a9c1e-aaaa-bbbb-cccc-0123456789ab", "GET /item/{id}"),
    ("GET", "/blob/" + "x" * 60, "GET /blob/{id}"),
    ("GET", "/static//js/app.js#top", "GET /static/js/app.js"),
])
def test_route_templates(method: str, path: str, label: str) -> None:
    assert route_template(method, path) == label
    assert MAX_ROUTE_SEGMENTS == 3


def test_route_table_is_bounded_and_grpc_keeps_the_method_path() -> None:
    table = RouteTable(max_routes=3, max_cache=4)
    assert table.label(b"POST", b"/emojivoto.v1.VotingService/VoteDoughnut", grpc=True) == \
        "/emojivoto.v1.VotingService/VoteDoughnut"
    assert table.label(b"CONNECT", b"web:80") == "CONNECT"
    assert table.label(b"GET", b"/a?x=1") == "GET /a"
    assert table.label(b"GET", b"/b") == f"GET {OTHER_ROUTE}"  # a fourth label
    assert table.label(b"GET", b"/a?x=2") == "GET /a"  # known labels stay
    assert table.overflowed == 1
    for i in range(20):  # the raw cache is cleared, never grown past its bound
        table.label(b"GET", b"/a?i=%d" % i)
    assert sum(len(paths) for paths in table._cache.values()) <= 4


def test_client_workload_and_grpc_status_parsing() -> None:
    assert parse_client_workload(b"demo/vote-bot") == ("demo", "vote-bot")
    for bad in (None, b"", b"vote-bot", b"demo/", b"Demo/x", b"a/b/c", b"a b/c"):
        assert parse_client_workload(bad) is None
    assert grpc_status_of([(b"Grpc-Status", b"2"), (b"grpc-message", b"x")]) == 2
    assert grpc_status_of([(b"grpc-status", b"99")]) == 2  # unknown reads as UNKNOWN
    assert grpc_status_of([(b"x", b"1")]) is None


def test_the_caller_from_a_client_identity_wins_over_the_field() -> None:
    web = "web.demo.serviceaccount.identity.shoal.cluster.local"
    assert workload_of_identity(web) == b"demo/web"
    for bad in ("", "web.demo", "x.serviceaccount.identity.shoal.cluster.local",
                "a.b.Demo.serviceaccount.identity.shoal.cluster.local"):
        assert workload_of_identity(bad) is None
    metrics = ProxyMetrics()
    registry, events = _tapping()
    observer, target = _inbound(metrics, registry)
    mtls = observer.for_client(web).connection(_Transport())
    assert mtls.tls and mtls.client_identity == web
    # A stamped field that disagrees loses to the certificate.
    obs = mtls.request(target, target.endpoint, b"GET", b"web", b"/", [], b"demo/evil", 1.0)
    obs.response_start(200, [], 1.01)
    obs.response_end((), 1.02)
    plain = observer.connection(_Transport())  # the room itself: plaintext, field trusted
    assert not plain.tls and plain.client_identity == ""
    plain.request(target, target.endpoint, b"GET", b"web", b"/", [], b"demo/vote-bot",
                  2.0).response_start(200, [], 2.01)
    callers = {(row.peer_workload, row.requests) for row in _rows(metrics)}
    assert callers == {("web", 1), ("vote-bot", 1)}
    start = next(e for e in events if isinstance(e, TapRequestStart))
    assert start.tls and start.source.workload == "web"
    assert start.source.identity == web and start.source.namespace == "demo"


def _session(sid: str = "s1", **kw: object) -> bytes:
    return encode(TapSession(id=sid, expires_at=time.time() + 30, **kw))  # type: ignore[arg-type]


def _tapping(local: LocalProxy = LOCAL) -> tuple[TapRegistry, list[TapEvent]]:
    events: list[TapEvent] = []
    registry = TapRegistry(local, lambda _s, payload: events.append(EVENTS.decode(payload)))
    registry.apply("s1", _session(redact_headers=["x-api-key"]))
    return registry, events


def _inbound(metrics: ProxyMetrics, registry: TapRegistry | None,
             ) -> tuple[Observer, FixedTarget]:
    observer = Observer("inbound", tap=registry or TAP_OFF, local=LOCAL, identity="web.demo")
    pool = Pool(max_idle=1, idle_timeout=1.0, max_head_bytes=1024)
    target = FixedTarget(LOOPBACK, 8080, pool, NullRequestCounter(), 0.1,
                         series=RouteSeries(metrics, "inbound", {"tls": "no_identity"}),
                         peer=observer.local_peer(LOOPBACK, 8080))
    return observer, target


class _Transport:
    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.9", 40001) if name == "peername" else None


def _rows(metrics: ProxyMetrics) -> list[RequestRow]:
    return metrics.snapshot_deltas()[0]


def test_a_request_is_counted_once_with_route_caller_and_best_worst_last() -> None:
    metrics = ProxyMetrics()
    observer, target = _inbound(metrics, None)
    conn = observer.connection(_Transport())
    t0 = time.monotonic()
    for latency in (0.004, 0.002, 0.009):
        obs = conn.request(target, target.endpoint, b"GET", b"web:8080",
                           b"/api/vote?choice=x", [], b"demo/vote-bot", t0)
        obs.response_start(500, [], t0 + latency)
        obs.response_bytes += 10
        obs.response_end([(b"grpc-status", b"2")])
        obs.fail(0, "CANCEL")  # late: counted already, nothing changes
        assert obs.tap is None  # no session: never built
    rows = _rows(metrics)
    assert len(rows) == 1
    row = rows[0]
    assert (row.route, row.peer_namespace, row.peer_workload) == ("GET /api/vote", "demo",
                                                                  "vote-bot")
    assert row.requests == 3 and row.status_code == 500 and not row.success
    assert (row.latency_min_ms, row.latency_max_ms, row.latency_last_ms) == pytest.approx(
        (2.0, 9.0, 9.0))
    assert abs(row.last_at - time.time()) < 5
    assert _rows(metrics) == []  # deltas: nothing new since


def test_grpc_is_classified_by_its_status_at_the_end() -> None:
    metrics = ProxyMetrics()
    observer, target = _inbound(metrics, None)
    conn = observer.connection(_Transport())
    ok = conn.request(target, None, b"POST", b"web", b"/pkg.Svc/Ok", [], None, 0.0, grpc=True)
    ok.response_start(200, [], 0.001)
    ok.response_end([(b"grpc-status", b"0")])
    bad = conn.request(target, None, b"POST", b"web", b"/pkg.Svc/Bad", [], None, 0.0,
                       grpc=True)
    bad.response_start(200, [(b"grpc-status", b"14")], 0.001)  # trailers-only
    bad.response_end()
    rows = {r.route: r for r in _rows(metrics)}
    assert rows["/pkg.Svc/Ok"].success and rows["/pkg.Svc/Ok"].grpc_status == 0
    assert not rows["/pkg.Svc/Bad"].success and rows["/pkg.Svc/Bad"].grpc_status == 14
    assert rows["/pkg.Svc/Bad"].requests == 1


def test_tapped_request_events_with_peers_redaction_and_bytes() -> None:
    metrics = ProxyMetrics()
    registry, events = _tapping()
    observer, target = _inbound(metrics, registry)
    conn = observer.connection(_Transport())
    obs = conn.request(target, target.endpoint, b"GET", b"web:8080", b"/api/vote",
                       [(b"Authorization", b"Bearer s3cret"), (b"X-Api-Key", b"k"),
                        (b"Accept", b"*/*")], b"demo/vote-bot", time.monotonic())
    obs.response_start(200, [(b"Set-Cookie", b"id=1")], time.monotonic())
    obs.response_bytes += 42
    obs.response_end([(b"grpc-status", b"0")])
    req, rsp, end = events
    assert isinstance(req, TapRequestStart) and isinstance(rsp, TapResponseStart)
    assert isinstance(end, TapResponseEnd)
    assert req.id == f"{conn.id}:1" and req.direction == "inbound"
    assert req.source == Peer(address="127.0.0.9", port=40001, namespace="demo",
                              workload="vote-bot")
    assert req.destination == Peer(address=LOOPBACK, port=8080, namespace="demo",
                                   workload="web", pod="web-1", identity="web.demo")
    assert req.headers == {"authorization": REDACTED, "x-api-key": REDACTED, "accept": "*/*"}
    assert rsp.status == 200 and rsp.headers == {"set-cookie": REDACTED}
    assert end.grpc_status == 0 and end.response_bytes == 42 and end.reset_error == ""
    # A proxy-made answer, and a reset, are tapped too.
    failed = conn.request(target, None, b"GET", b"web", b"/x", [], None, time.monotonic())
    failed.fail(503)
    cut = conn.request(target, None, b"GET", b"web", b"/y", [], None, time.monotonic())
    cut.response_start(200, [], time.monotonic())
    cut.fail(0, "INTERNAL_ERROR")
    kinds = [(type(e).__name__, getattr(e, "status", None), getattr(e, "reset_error", None))
             for e in events[3:]]
    assert kinds == [("TapRequestStart", None, None), ("TapResponseStart", 503, None),
                     ("TapResponseEnd", None, ""), ("TapRequestStart", None, None),
                     ("TapResponseStart", 200, None), ("TapResponseEnd", None,
                                                        "INTERNAL_ERROR")]
    statuses = sorted((r.status_code, r.success) for r in _rows(metrics))
    assert statuses == [(200, True), (200, True), (503, False)]


def test_outbound_stamps_the_caller_and_a_filter_on_the_destination() -> None:
    registry, events = _tapping()
    registry.apply("s1", _session(filter=TapFilter(to_workload="voting")))
    observer = Observer("outbound", tap=registry, local=LOCAL)
    assert observer.stamp == (CLIENT_WORKLOAD_HEADER, b"demo/web")
    assert Observer("inbound", local=LOCAL).stamp is None
    pool = Pool(max_idle=1, idle_timeout=1.0, max_head_bytes=1024)
    voting = FixedTarget(LOOPBACK, 9000, pool, NullRequestCounter(), 0.1,
                         peer=Peer(address=LOOPBACK, port=9000, workload="voting"))
    emoji = FixedTarget(LOOPBACK, 9001, pool, NullRequestCounter(), 0.1,
                        peer=Peer(address=LOOPBACK, port=9001, workload="emoji"))
    conn = observer.connection(_Transport())
    assert conn.request(emoji, None, b"GET", b"emoji", b"/", [], None, 0.0).tap is None
    tapped = conn.request(voting, None, b"GET", b"voting", b"/", [], None, 0.0)
    assert tapped.tap is not None
    start = events[0]
    assert isinstance(start, TapRequestStart) and start.id == f"{conn.id}:2"
    assert start.source.workload == "web" and start.source.pod == "web-1"


# -- through the HTTP/1 engine -------------------------------------------------------------


@dataclass
class Seen:
    heads: list[bytes] = field(default_factory=list)


async def _upstream(seen: Seen) -> asyncio.Server:
    """Answers every request with a chunked body and a grpc-status trailer."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                seen.heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                             b"Trailer: grpc-status\r\n\r\n5\r\nhello\r\n3\r\n!!!\r\n"
                             b"0\r\ngrpc-status: 7\r\n\r\n")
                await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, LOOPBACK, 0)


@dataclass
class Front:
    observer: Observer
    target: FixedTarget
    connections: Connections = field(default_factory=Connections)
    server: asyncio.Server | None = None

    async def start(self) -> int:
        ctx = ServerContext(FixedRouter(self.target), Http1Settings(), NullTcpCounter(),
                            self.connections, observer=self.observer)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: ServerProtocol(ctx), LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.connections.close_all()
        self.target.pool.close_all()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Seen, int]]:
    seen = Seen()
    server = await _upstream(seen)
    yield seen, int(server.sockets[0].getsockname()[1])
    server.close()


async def _get(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(head)
        writer.write_eof()
        async with asyncio.timeout(IO_TIMEOUT):
            return await reader.read()
    finally:
        writer.close()


async def test_engine_inbound_strips_the_caller_and_taps(upstream: tuple[Seen, int]) -> None:
    seen, port = upstream
    metrics = ProxyMetrics()
    registry, events = _tapping()
    observer = Observer("inbound", tap=registry, local=LOCAL)
    pool = Pool(max_idle=4, idle_timeout=3.0, max_head_bytes=64 * 1024)
    target = FixedTarget(LOOPBACK, port, pool, NullRequestCounter(), 0.5,
                         series=RouteSeries(metrics, "inbound", {}),
                         peer=observer.local_peer(LOOPBACK, port))
    front = Front(observer, target)
    try:
        front_port = await front.start()
        raw = await _get(front_port, b"GET /api/vote?c=1 HTTP/1.1\r\nHost: web\r\n"
                         b"Shoal-Client-Workload: demo/vote-bot\r\n"
                         b"Cookie: a=b\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and b"grpc-status: 7" in raw
        assert b"shoal-client-workload" not in seen.heads[0].lower()  # the app never sees it
        assert [type(e).__name__ for e in events] == ["TapRequestStart", "TapResponseStart",
                                                      "TapResponseEnd"]
        req, _, end = events
        assert isinstance(req, TapRequestStart) and isinstance(end, TapResponseEnd)
        assert req.source.workload == "vote-bot" and req.source.address == LOOPBACK
        assert req.headers["cookie"] == REDACTED and req.path == "/api/vote?c=1"
        assert end.grpc_status == 7 and end.response_bytes == 8
        row = _rows(metrics)[0]
        assert (row.route, row.peer_workload, row.requests) == ("GET /api/vote", "vote-bot", 1)
        # The app is gone: the proxy's own 502 is counted and tapped.
        front.target = FixedTarget(LOOPBACK, free_port(), pool, NullRequestCounter(), 0.5,
                                   series=RouteSeries(metrics, "inbound", {}))
        front.close()
        front_port = await front.start()
        raw = await _get(front_port, b"GET /gone HTTP/1.1\r\nHost: web\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 502")
        rsp = events[-2]
        assert isinstance(rsp, TapResponseStart) and rsp.status == 502
        assert [(r.route, r.status_code) for r in _rows(metrics)] == [("GET /gone", 502)]
    finally:
        front.close()


async def test_engine_outbound_replaces_a_spoofed_caller(upstream: tuple[Seen, int]) -> None:
    seen, port = upstream
    observer = Observer("outbound", local=LOCAL)
    pool = Pool(max_idle=4, idle_timeout=3.0, max_head_bytes=64 * 1024)
    front = Front(observer, FixedTarget(LOOPBACK, port, pool, NullRequestCounter(), 0.5))
    try:
        front_port = await front.start()
        raw = await _get(front_port, b"GET / HTTP/1.1\r\nHost: voting\r\n"
                         b"shoal-client-workload: other/evil\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200")
        head = seen.heads[0].lower()
        assert head.count(b"shoal-client-workload") == 1
        assert b"shoal-client-workload: demo/web\r\n" in head
    finally:
        front.close()


def test_request_observer_without_tap_or_grpc_is_lean() -> None:
    counter = NullRequestCounter()
    obs = RequestObserver.new(counter, 0.0)
    obs.response_start(204, [], 0.001)
    obs.response_end([(b"grpc-status", b"1")])  # ignored: not gRPC, nobody tapping
    assert obs.grpc_status is None and obs.observed


def test_a_rewatch_drops_sessions_closed_while_the_bus_was_away() -> None:
    registry, _ = _tapping()
    registry.apply("s2", _session("s2"))
    registry.retain(["s2"])  # the bucket's content when the watch came back
    assert [s.id for s in registry.sessions] == ["s2"] and registry.active
    registry.retain([])
    assert registry.sessions == [] and not registry.active
