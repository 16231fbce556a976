"""Metrics reports and tap from real proxies, end to end: traffic of a known shape (about
100 req/s, every tenth request to /fail, which answers 500) from a client through two
proxies to an app, with the real destination, metrics and tap services as child
processes on a real NATS, and ``shoal viz`` run as an operator runs it.

Layout (namespace "obs"; every proxy is ``python -m shoal.proxy``, reports every second):
  traffic thread -> client proxy (outbound, workload "client") -> web proxy (inbound,
  workload "web") -> HttpApp "web"

The traffic runs for the whole module (bounded in count and time); the tests look at it
in order: tap (the CLI and a plain nats-py subscriber), a short session's expiry, stat /
top / edges, and last a proxy killed and restarted mid-window.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.metrics import MetricsReport
from shoal.schemas.tap import (
    TapEvent,
    TapFilter,
    TapOpen,
    TapRequestStart,
    TapResponseStart,
    TapSessionGranted,
    TapSessionReply,
)

from .apps import LOOPBACK, HttpApp, free_port
from .conftest import Bus
from .proxyproc import REPO, Child, ProxyProcess, destination, proxy_env

NS = "obs"
RATE = 100.0  # requests per second offered
FAIL_EVERY = 10  # every tenth request goes to /fail (500)
SECRET = "TOPSECRET-7f3a"  # in every request's credentials; must never reach the bus
API_KEY = "apikey-91c2"  # shown unless a session asks for X-Api-Key to be redacted
TRAFFIC_MAX_SECONDS = 120.0  # the traffic thread's bound, whatever happens to the tests
WINDOW = 10  # seconds, the shortest `viz` window
ROUTE_TIMEOUT_SECONDS = 15.0
WAIT_SECONDS = 10.0
CLI_TIMEOUT_SECONDS = 30.0
EVENTS: Decoder[TapEvent] = Decoder(TapEvent, names.TAP_ALL)
REPORTS: Decoder[MetricsReport] = Decoder(MetricsReport, names.METRICS_REPORTS_ALL)
REPLIES: Decoder[TapSessionReply] = Decoder(TapSessionReply, names.TAP_SESSION)


@dataclass
class Traffic:
    """About RATE req/s on one keep-alive connection, paced on an absolute schedule."""

    port: int
    sent: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, status)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        headers = {"Host": f"web.{NS}", "Authorization": f"Bearer {SECRET}",
                   "Cookie": f"session={SECRET}", "X-Api-Key": API_KEY}
        for i in range(int(RATE * TRAFFIC_MAX_SECONDS)):
            due = self.started + i / RATE
            delay = due - time.monotonic()
            if self.stop.wait(max(0.0, delay)):
                break
            path = "/fail" if i % FAIL_EVERY == FAIL_EVERY - 1 else "/"
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=5)
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status = 0
                if conn is not None:
                    conn.close()
                conn = None
            self.sent.append((time.monotonic(), status))
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)

    def rate(self, seconds: float) -> tuple[float, float]:
        """(requests per second, share answered 200) over the last ``seconds``."""
        since = time.monotonic() - seconds
        recent = [status for at, status in list(self.sent) if at >= since]
        ok = sum(1 for status in recent if status == 200)
        return len(recent) / seconds, ok / max(1, len(recent))


@dataclass
class Mesh:
    bus: Bus
    app: HttpApp
    client: ProxyProcess
    web: ProxyProcess
    traffic: Traffic
    children: list[Child]


def _wait_routed(port: int) -> None:
    deadline = time.monotonic() + ROUTE_TIMEOUT_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": f"web.{NS}"})
            last = conn.getresponse().status
            if last == 200:
                return
        except OSError as error:
            last = error
        finally:
            conn.close()
        time.sleep(0.1)
    raise AssertionError(f"web.{NS} never routed: {last!r}")


@pytest.fixture(scope="module")
def mesh(bus: Bus, buckets: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("obs-logs")
    env = proxy_env(bus.env("proxy"))
    controller = proxy_env(bus.env("controller"))
    app = HttpApp("web").start()
    dest, dest_port = destination(controller, log_dir)
    metrics_port, tap_port = free_port(), free_port()
    services = [Child(name, [sys.executable, "-m", f"shoal.services.{name}",
                             "--health-port", str(port)], controller, log_dir)
                for name, port in (("metrics", metrics_port), ("tap", tap_port))]
    common = ("--namespace", NS, "--report-interval", "1")
    client = ProxyProcess("client", env, log_dir, *common, "--workload", "client",
                          "--pod", "client-1")
    web = ProxyProcess("web", env, log_dir, *common, "--service", "web", "--pod", "web-1",
                       outbound=False, app_port=app.port)
    children: list[Child] = [dest, *services, client, web]
    traffic = Traffic(client.outbound_port)
    try:
        for child in children:
            child.start()
        dest.wait_http_ok(dest_port, "/ready")
        for service, port in zip(services, (metrics_port, tap_port), strict=True):
            service.wait_http_ok(port, "/ready")
        client.wait_ready()
        web.wait_ready()
        _wait_routed(client.outbound_port)
        traffic.start()
        yield Mesh(bus, app, client, web, traffic, children)
    finally:
        traffic.close()
        for child in reversed(children):
            child.stop()
        app.stop()
        failed = [c for c in children if c.process is not None
                  and c.process.returncode not in (0, -signal.SIGTERM)]
        for child in failed:
            print(f"--- {child.name} ---\n{child.log()[-3000:]}")


def _cli_env(bus: Bus) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update({"SHOAL_STATE_DIR": str(bus.state_dir), "NO_COLOR": "1", "COLUMNS": "250",
                "PYTHONUNBUFFERED": "1"})
    return env


async def _viz(bus: Bus, *args: str) -> object:
    """``python -m shoal.cli viz ARGS -o json``, parsed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "viz", *args, "-n", NS, "-o", "json", cwd=REPO,
        env=_cli_env(bus), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_SECONDS)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


class Collector:
    """A plain nats-py subscriber: raw payloads as they arrive."""

    def __init__(self) -> None:
        self.raw: list[tuple[float, bytes]] = []

    async def add(self, msg: Msg) -> None:
        self.raw.append((time.time(), bytes(msg.data)))

    def events(self, session: str | None = None) -> list[TapEvent]:
        decoded = [EVENTS.decode(data) for _, data in self.raw]
        return [e for e in decoded if session is None or session in e.sessions]


async def _until(predicate: object, timeout: float = WAIT_SECONDS) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


def _key(event: TapEvent) -> tuple[str, str]:
    return type(event).__name__, event.id


async def test_tap_cli_and_a_plain_subscriber_see_the_same_events(
        mesh: Mesh, operator: Client) -> None:
    collector = Collector()
    sub = await operator.subscribe(names.TAP_ALL, cb=collector.add)
    try:
        for output in ("json", "text"):
            args = ["viz", "tap", "deploy/web", "-n", NS]
            args += ["-o", "json"] if output == "json" else ["--path", "/fail"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shoal.cli", *args, cwd=REPO, env=_cli_env(mesh.bus),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL)
            assert proc.stdout is not None
            lines = [(await asyncio.wait_for(proc.stdout.readline(), CLI_TIMEOUT_SECONDS))
                     .decode() for _ in range(30 if output == "json" else 6)]
            proc.send_signal(signal.SIGINT)
            rest, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_SECONDS)
            assert proc.returncode == 0, err.decode()
            lines += rest.decode().splitlines()
            if output == "text":
                rsp = [line.split() for line in lines if line.startswith("rsp ")]
                req = [line.split() for line in lines if line.startswith("req ")]
                assert req and all(":path=/fail" in cells and "proxy=in" in cells
                                   for cells in req)
                assert rsp and all(":status=500" in cells for cells in rsp)
                continue
            printed = [json.loads(line) for line in lines if line.strip()]
            session = printed[0]["sessions"][0]
            await operator.flush()
            await asyncio.sleep(0.3)  # the subscriber's copies of the last events
            seen = {_key(e): e for e in collector.events(session)}
            for event in printed:
                key = (EVENTS.decode(json.dumps(event).encode()).__class__.__name__,
                       event["id"])
                assert key in seen, f"the CLI printed {key}, the subscriber never got it"
                assert json.loads(encode(seen[key])) == event
            starts = [e for e in seen.values() if isinstance(e, TapRequestStart)]
            assert starts and {e.path for e in starts} <= {"/", "/fail"}
            assert all(e.source.workload == "client" and e.destination.workload == "web"
                       and e.destination.pod == "web-1" for e in starts)
            assert all(e.headers["authorization"] == "[REDACTED]"
                       and e.headers["cookie"] == "[REDACTED]"
                       and e.headers["x-api-key"] == API_KEY for e in starts)
            assert "shoal-client-workload" not in starts[0].headers
            failing = [e for e in seen.values()
                       if isinstance(e, TapResponseStart) and e.status == 500]
            assert failing, "no /fail response among the tapped events"
            # The CLI closed its session: the proxy stops at once.
            await asyncio.sleep(1.0)
            count = len(collector.events(session))
            await asyncio.sleep(1.0)
            assert len(collector.events(session)) == count
    finally:
        await sub.unsubscribe()
    assert all(SECRET.encode() not in data for _, data in collector.raw)


async def test_a_session_expires_and_its_rate_cap_and_redaction_hold(
        mesh: Mesh, operator: Client) -> None:
    collector = Collector()
    sub = await operator.subscribe(names.tap_subject(NS, "web", "web-1"), cb=collector.add)
    try:
        request = TapOpen(filter=TapFilter(namespace=NS, workload="web"), max_rps=10,
                          ttl_seconds=3, redact_headers=["X-Api-Key"],
                          opened_by=f"test-{uuid.uuid4().hex[:6]}")
        msg = await operator.request(names.TAP_SESSION, encode(request), timeout=5)
        granted = REPLIES.decode(msg.data)
        assert isinstance(granted, TapSessionGranted)
        session = granted.session
        await _until(lambda: collector.events(session.id))
        await asyncio.sleep(max(0.0, session.expires_at - time.time()) + 0.5)
        after_expiry = len(collector.events(session.id))
        await asyncio.sleep(1.5)  # traffic goes on at 100 req/s
        events = collector.events(session.id)
        assert len(events) == after_expiry, "events after the session expired"
        starts = [e for e in events if isinstance(e, TapRequestStart)]
        assert starts and all(e.timestamp <= session.expires_at + 0.1 for e in starts)
        # 10/s with a burst of one second's worth, for at most the session's 3 s.
        assert len(starts) <= 10 * 3 + 10 + 1
        assert all(e.headers["x-api-key"] == "[REDACTED]" for e in starts)
        assert all(API_KEY not in encode(e).decode() for e in events)
    finally:
        await sub.unsubscribe()
    assert all(SECRET.encode() not in data for _, data in collector.raw)


async def test_stat_top_and_edges_from_the_proxies_reports(mesh: Mesh) -> None:
    # A full window of traffic, then a report or two for it to reach the service.
    ran = time.monotonic() - mesh.traffic.started
    await asyncio.sleep(max(0.0, WINDOW + 2.5 - ran))
    offered, ok_share = mesh.traffic.rate(WINDOW)
    assert offered >= 0.9 * RATE, f"the traffic fell behind: {offered:.1f} req/s"
    stat = await _viz(mesh.bus, "stat", "deploy/web", "-t", f"{WINDOW}s")
    assert isinstance(stat, list) and len(stat) == 1, stat
    web = stat[0]
    assert web["name"] == "web" and web["meshed"] == "1/1"
    assert web["rps"] == pytest.approx(offered, rel=0.10), (web, offered)
    assert abs(web["success_rate"] - ok_share) <= 0.02, (web, ok_share)
    assert 0 < web["latency_p50_ms"] <= web["latency_p99_ms"]
    assert web["tcp_conn"] >= 1

    top = await _viz(mesh.bus, "top", "deploy/web", "-t", f"{WINDOW}s")
    assert isinstance(top, list)
    rows = {(r["source"], r["method"], r["path"]): r for r in top}
    fail = rows[("client", "GET", "/fail")]
    ok = rows[("client", "GET", "/")]
    assert fail["success_rate"] == 0 and ok["success_rate"] == 1
    assert fail["destination"] == "web-1"
    for row in (fail, ok):
        assert 0 < row["best_ms"] <= row["last_ms"] <= row["worst_ms"], row
    assert ok["count"] == pytest.approx(9 * fail["count"], rel=0.2)

    edges = await _viz(mesh.bus, "edges", "deploy", "-t", f"{WINDOW}s")
    assert isinstance(edges, list)
    assert {(e["src"], e["dst"], e["src_namespace"], e["dst_namespace"]) for e in edges} \
        == {("client", "web", NS, NS)}

    # The caller's field never reaches the app, even when the app's client sends one.
    conn = http.client.HTTPConnection(LOOPBACK, mesh.client.outbound_port, timeout=5)
    try:
        conn.request("GET", "/headers", headers={"Host": f"web.{NS}",
                                                 "shoal-client-workload": "obs/evil"})
        seen = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert "shoal-client-workload" not in seen


async def test_a_proxy_killed_mid_window_and_restarted(mesh: Mesh, operator: Client) -> None:
    reports: list[MetricsReport] = []

    async def collect(msg: Msg) -> None:
        reports.append(REPORTS.decode(msg.data))

    sub = await operator.subscribe(names.metrics_subject(NS, "web", "web-1"), cb=collect)
    try:
        await _until(lambda: reports)
        old_instance = reports[-1].instance
        mesh.web.signal(signal.SIGKILL)
        mesh.web.wait(WAIT_SECONDS)
        await asyncio.sleep(0.3)  # requests in flight at the kill have ended
        served_at_kill = mesh.app.requests
        mesh.web.start()  # the same pod name and ports: a new instance
        await asyncio.to_thread(mesh.web.wait_ready)
        await asyncio.sleep(3.0)  # traffic through the new instance, a few reports
        offered, _ = mesh.traffic.rate(WINDOW)
        stat = await _viz(mesh.bus, "stat", "deploy/web", "-t", f"{WINDOW}s")
        assert isinstance(stat, list) and len(stat) == 1
        web = stat[0]
        assert 0 < web["rps"] <= offered * 1.1, (web, offered)  # a gap, never doubled
        assert 0 <= web["success_rate"] <= 1
        # Stop the traffic, then the proxy (SIGTERM): it drains and sends a last report,
        # so the new instance's reports add up to exactly what the app served since.
        mesh.traffic.close()
        await asyncio.sleep(0.5)
        assert mesh.web.stop() == 0
        await operator.flush()
        await asyncio.sleep(0.5)
        new = [r for r in reports if r.instance != old_instance]
        assert new and len({r.instance for r in new}) == 1
        assert [r.seq for r in new] == list(range(len(new)))
        inbound = sum(row.requests for r in new for row in r.requests
                      if row.direction == "inbound")
        assert inbound == mesh.app.requests - served_at_kill
        assert all(r.interval_end >= r.interval_start for r in new)
    finally:
        await sub.unsubscribe()

