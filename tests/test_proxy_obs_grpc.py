"""gRPC in metrics reports, ``viz top``/``viz routes`` and tap, end to end: the demo's
shape, a grpcio client using its proxy through ``grpc_proxy`` (HTTP CONNECT, HTTP/2 in the
tunnel) to call a gRPC service behind another proxy over mutual TLS, with the real
identity, destination, metrics and tap services as child processes on a real NATS.

Layout (namespace "obsgrpc"; every proxy ``python -m shoal.proxy``, reports every second):
  grpcio (grpc_proxy) -> "web" proxy (outbound, identity web) =mTLS h2=> "voting" proxy
    (inbound, identity voting) -> grpcio server (tests/grpcapps.py)
  grpcio (h2c)        -> "plain" proxy (outbound, --no-identity) -> "voting" proxy, as
    plaintext HTTP/2: the caller comes from the shoal-client-workload field there

What must hold: inbound tap events of the voting proxy carry the gRPC method path and
grpc-status (0 for Unary, 2 = UNKNOWN for Fail), the caller from the client certificate
(workload and identity, tls) or, for the plaintext hop, from the field (never shown to
tap or the app); reports carry rows by route with grpc-status, the caller and the TLS
identities; ``viz top`` and ``viz routes`` show the calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shoal.proxy.config import IDENTITY_TOKEN_ENV
from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.metrics import MetricsReport, RequestRow
from shoal.schemas.tap import (
    TapEvent,
    TapFilter,
    TapOpen,
    TapRequestStart,
    TapResponseEnd,
    TapSessionGranted,
    TapSessionReply,
)

from .apps import LOOPBACK, free_port
from .conftest import Bus
from .grpcapps import MESSAGE_OPTIONS, SERVICE, GrpcBackend
from .identity_support import SCHEME, clear_trust_bundle, join_token, make_material
from .proxyproc import REPO, Child, ProxyProcess, destination, proxy_env

NS = "obsgrpc"
ROUTE_TIMEOUT_SECONDS = 30.0  # certify, register, destination, watch: bounded
RPC_TIMEOUT = 10.0
WAIT_SECONDS = 15.0  # a tap session reaching the proxy, a report reaching the service
CLI_TIMEOUT_SECONDS = 30.0
CALLS = 20  # Unary calls per client per round (bounded)
ROUNDS = 3
EVENTS: Decoder[TapEvent] = Decoder(TapEvent, names.TAP_ALL)
REPORTS: Decoder[MetricsReport] = Decoder(MetricsReport, names.METRICS_REPORTS_ALL)
REPLIES: Decoder[TapSessionReply] = Decoder(TapSessionReply, names.TAP_SESSION)
UNARY = f"/{SERVICE}/Unary"
FAIL = f"/{SERVICE}/Fail"
WEB_ID = SCHEME.identity("web", NS)
VOTING_ID = SCHEME.identity("voting", NS)


@dataclass
class Mesh:
    bus: Bus
    web: ProxyProcess
    plain: ProxyProcess
    voting: ProxyProcess
    backend: GrpcBackend
    children: list[Child]


def _connect_channel(mesh: Mesh) -> grpc.Channel:
    """grpcio through its proxy as the demo's web does: CONNECT, then HTTP/2 inside."""
    options = [("grpc.http_proxy", f"http://{LOOPBACK}:{mesh.web.outbound_port}"),
               *MESSAGE_OPTIONS]
    return grpc.insecure_channel(f"voting.{NS}:8080", options=options)


def _plain_channel(mesh: Mesh) -> grpc.Channel:
    options = [("grpc.default_authority", f"voting.{NS}:8080"), *MESSAGE_OPTIONS]
    return grpc.insecure_channel(f"{LOOPBACK}:{mesh.plain.outbound_port}", options=options)


def _wait_routed(channel: grpc.Channel) -> None:
    unary = channel.unary_unary(UNARY)
    deadline = time.monotonic() + ROUTE_TIMEOUT_SECONDS
    while True:
        try:
            assert unary(b"ping", timeout=5) == b"ping"
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _calls(channel: grpc.Channel) -> None:
    """CALLS Unary calls and one Fail (UNKNOWN) on a channel."""
    unary = channel.unary_unary(UNARY)
    for index in range(CALLS):
        assert unary(b"vote %d" % index, timeout=RPC_TIMEOUT) == b"vote %d" % index
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(FAIL)(b"x", timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNKNOWN


@pytest.fixture(scope="module")
def mesh(bus: Bus, buckets: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    asyncio.run(clear_trust_bundle(bus))
    tmp = tmp_path_factory.mktemp("obsgrpc")
    identity_dir, _ = make_material(tmp)
    log_dir = tmp / "logs"
    log_dir.mkdir()
    controller = proxy_env(bus.env("controller"))
    env = proxy_env(bus.env("proxy"))
    health, metrics_port, tap_port = free_port(), free_port(), free_port()
    identity = Child("identity", [sys.executable, "-m", "shoal.services.identity",
                                  "--identity-dir", str(identity_dir), "--health-port",
                                  str(health), "--log-level", "warning"], controller, log_dir)
    dest, dest_port = destination(controller, log_dir)
    services = [Child(name, [sys.executable, "-m", f"shoal.services.{name}",
                             "--health-port", str(port)], controller, log_dir)
                for name, port in (("metrics", metrics_port), ("tap", tap_port))]
    backend = GrpcBackend("voting")
    common = ("--namespace", NS, "--report-interval", "1")
    web = ProxyProcess("web", {**env, IDENTITY_TOKEN_ENV: join_token(identity_dir, NS, "web")},
                       log_dir, *common, "--workload", "web", "--pod", "web-1", identity=True)
    plain = ProxyProcess("plain", env, log_dir, *common, "--workload", "plain",
                         "--pod", "plain-1")
    voting = ProxyProcess(
        "voting", {**env, IDENTITY_TOKEN_ENV: join_token(identity_dir, NS, "voting")},
        log_dir, *common, "--service", "voting", "--workload", "voting", "--pod", "voting-1",
        outbound=False, app_port=backend.port, identity=True)
    children: list[Child] = [identity, dest, *services, web, plain, voting]
    result = Mesh(bus, web, plain, voting, backend, children)
    try:
        for child in children:
            child.start()
        backend.start()  # after the forks (see GrpcBackend.start)
        identity.wait_http_ok(health, "/ready")
        dest.wait_http_ok(dest_port, "/ready")
        for service, port in zip(services, (metrics_port, tap_port), strict=True):
            service.wait_http_ok(port, "/ready")
        for proxy in (web, plain, voting):
            proxy.wait_ready()
        for make in (_connect_channel, _plain_channel):
            with make(result) as channel:
                _wait_routed(channel)
        yield result
    except BaseException:
        for child in children:
            print(f"--- {child.name} ---\n{child.log()[-3000:]}")
        raise
    finally:
        for child in reversed(children):
            child.stop()
        backend.stop()


class Collector:
    """A plain nats-py subscriber, decoding as messages arrive."""

    def __init__(self, decode: Callable[[bytes], object]) -> None:
        self.decode = decode
        self.items: list[object] = []

    async def add(self, msg: Msg) -> None:
        self.items.append(self.decode(bytes(msg.data)))


async def _until(predicate: Callable[[], bool], what: str,
                 timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _traffic(mesh: Mesh) -> None:
    def run() -> None:
        for make in (_connect_channel, _plain_channel):
            with make(mesh) as channel:
                _calls(channel)
    await asyncio.to_thread(run)


def _cli_env(bus: Bus) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update({"SHOAL_STATE_DIR": str(bus.state_dir), "NO_COLOR": "1", "COLUMNS": "250"})
    return env


async def _viz(bus: Bus, *args: str) -> object:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "viz", *args, "-n", NS, "-o", "json", cwd=REPO,
        env=_cli_env(bus), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_SECONDS)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_grpc_calls_in_tap_events_with_grpc_status(mesh: Mesh, operator: Client) -> None:
    events = Collector(EVENTS.decode)
    sub = await operator.subscribe(names.tap_subject(NS, "voting", "voting-1"), cb=events.add)
    try:
        request = TapOpen(filter=TapFilter(namespace=NS, workload="voting"), max_rps=1000,
                          ttl_seconds=30, opened_by=f"test-{uuid.uuid4().hex[:6]}")
        msg = await operator.request(names.TAP_SESSION, encode(request), timeout=5)
        granted = REPLIES.decode(msg.data)
        assert isinstance(granted, TapSessionGranted)
        session = granted.session.id
        # The session reaches the proxy through the shoal_tap watch: call until tapped.
        for _ in range(ROUNDS):
            await _traffic(mesh)
            if any(isinstance(e, TapResponseEnd) for e in events.items):
                break
        await _traffic(mesh)  # one whole round with the session surely in force
        await operator.flush()
        await asyncio.sleep(0.5)
    finally:
        await sub.unsubscribe()
    mine = [e for e in events.items if isinstance(e, TapEvent) and session in e.sessions]
    starts = {e.id: e for e in mine if isinstance(e, TapRequestStart)}
    ends = {e.id: e for e in mine if isinstance(e, TapResponseEnd)}
    assert starts and ends

    def calls(caller: str, path: str) -> list[tuple[TapRequestStart, TapResponseEnd]]:
        return [(start, ends[key]) for key, start in starts.items()
                if start.source.workload == caller and start.path == path and key in ends]

    for caller, tls, identity in (("web", True, WEB_ID), ("plain", False, "")):
        ok, failed = calls(caller, UNARY), calls(caller, FAIL)
        assert len(ok) >= CALLS and failed, (caller, len(ok), len(failed))
        for start, end in ok + failed:
            assert start.direction == "inbound" and start.method == "POST"
            assert start.authority == f"voting.{NS}:8080"
            assert start.source.namespace == NS and start.source.identity == identity
            assert start.tls is tls
            assert start.destination.workload == "voting"
            assert start.destination.pod == "voting-1"
            assert "shoal-client-workload" not in start.headers
            assert start.headers["content-type"].startswith("application/grpc")
            assert end.reset_error == "" and end.duration_us > 0
        assert {end.grpc_status for _, end in ok} == {0}
        assert {end.grpc_status for _, end in failed} == {2}
        assert all(end.response_bytes > 0 for _, end in ok)
    # The caller's field never reached the app either.
    assert mesh.backend.total() > 0
    assert "shoal-client-workload" not in mesh.backend.metadata_keys


def _rows(reports: list[object], workload: str) -> list[RequestRow]:
    return [row for report in reports if isinstance(report, MetricsReport)
            and report.namespace == NS and report.workload == workload
            for row in report.requests]


def _count(rows: list[RequestRow], **match: object) -> int:
    return sum(row.requests for row in rows
               if all(getattr(row, key) == value for key, value in match.items()))


async def test_grpc_calls_in_reports_top_and_routes(mesh: Mesh, operator: Client) -> None:
    reports = Collector(REPORTS.decode)
    sub = await operator.subscribe(names.METRICS_REPORTS_ALL, cb=reports.add)
    try:
        await _traffic(mesh)

        def reported() -> bool:
            inbound = _rows(reports.items, "voting")
            return (_count(inbound, route=UNARY, peer_workload="web") >= CALLS
                    and _count(inbound, route=UNARY, peer_workload="plain") >= CALLS
                    and _count(_rows(reports.items, "web"), route=FAIL) >= 1)
        await _until(reported, "the calls in metrics reports")
    finally:
        await sub.unsubscribe()
    inbound = _rows(reports.items, "voting")
    assert _count(inbound, direction="inbound", route=UNARY, peer_workload="web",
                  peer_namespace=NS, grpc_status=0, success=True, tls=True,
                  client_id=WEB_ID) >= CALLS
    assert _count(inbound, direction="inbound", route=FAIL, peer_workload="web",
                  grpc_status=2, success=False, tls=True, client_id=WEB_ID) >= 1
    assert _count(inbound, direction="inbound", route=FAIL, peer_workload="plain",
                  grpc_status=2, success=False, tls=False) >= 1
    outbound = _rows(reports.items, "web")
    assert _count(outbound, direction="outbound", route=UNARY, peer_workload="voting",
                  grpc_status=0, success=True, tls=True, server_id=VOTING_ID) >= CALLS
    assert _count(outbound, direction="outbound", route=FAIL, peer_workload="voting",
                  grpc_status=2, success=False) >= 1
    assert all(row.latency_min_ms is not None and row.latency_min_ms > 0
               for row in inbound if row.route in (UNARY, FAIL))

    async def shown() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        top = await _viz(mesh.bus, "top", "deploy/voting", "-t", "10s")
        routes = await _viz(mesh.bus, "routes", "deploy/voting", "-t", "10s")
        assert isinstance(top, list) and isinstance(routes, list)
        return top, routes

    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        top, routes = await shown()
        rows = {(r["source"], r["path"]): r for r in top}
        named = {r["route"]: r for r in routes}
        if (("web", FAIL) in rows and ("plain", FAIL) in rows and UNARY in named
                and FAIL in named) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    assert rows[("web", FAIL)]["success_rate"] == 0
    assert rows[("web", UNARY)]["success_rate"] == 1
    assert rows[("web", UNARY)]["method"] == "POST"
    assert rows[("plain", FAIL)]["destination"] == "voting-1"
    assert named[FAIL]["success_rate"] == 0
    assert named[UNARY]["success_rate"] == 1
