"""Synthetic mesh traffic for the dashboard tests, published as the proxy role, and the
control plane (metrics, tap, dashboard) running in-process on the test's bus.

The shape follows emojivoto: vote-bot calls web; web calls emoji (always fine) and
voting (VoteDoughnut fails with gRPC Unknown); web answers /api/vote with 500 when that
happens. So web is below 100% success and emoji at 100%, as the issue's browser test
expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.js.kv import KeyValue

from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.metrics import LATENCY_BUCKETS_MS, MetricsReport, RequestRow, TcpRow
from shoal.schemas.tap import (
    Peer,
    TapEvent,
    TapRequestStart,
    TapResponseEnd,
    TapResponseStart,
    TapSession,
)
from shoal.services.dashboard.service import DashboardService
from shoal.services.metrics.service import MetricsService
from shoal.services.tap.service import TapService

from .conftest import Bus
from .services import in_process

N_BUCKETS = len(LATENCY_BUCKETS_MS) + 1
TRUST = "serviceaccount.identity.shoal.cluster.local"
# Report interval of the synthetic proxies (real ones report every few seconds; 1 s
# makes a test's figures settle sooner).
REPORT_SECONDS = 1.0


def identity(workload: str, namespace: str) -> str:
    return f"{workload}.{namespace}.{TRUST}"


def histogram(latency_ms: float, n: int) -> list[int]:
    counts = [0] * N_BUCKETS
    index = next((i for i, bound in enumerate(LATENCY_BUCKETS_MS) if latency_ms <= bound),
                 N_BUCKETS - 1)
    counts[index] = n
    return counts


def row(direction: str, peer: str, route: str, n: int, latency_ms: float, *, ns: str,
        ok: bool = True, grpc: bool = False, me: str = "", tls: bool = True) -> RequestRow:
    """n requests of one route between this workload (``me``) and ``peer``."""
    status_class = "2xx" if ok or grpc else "5xx"
    client, server = (peer, me) if direction == "inbound" else (me, peer)
    return RequestRow(
        direction=direction,  # type: ignore[arg-type]
        peer_namespace=ns, peer_workload=peer,
        peer_service=peer if direction == "outbound" else "",
        authority=f"{(me if direction == 'inbound' else peer)}-svc.{ns}.svc.cluster.local:8080",
        route=route, status_class=status_class,  # type: ignore[arg-type]
        status_code=200 if ok or grpc else 500,
        grpc_status=(0 if ok else 2) if grpc else None, success=ok, tls=tls,
        client_id=identity(client, ns) if tls else "",
        server_id=identity(server, ns) if tls else "",
        requests=n, latency_counts=histogram(latency_ms, n), latency_sum_ms=latency_ms * n,
        latency_min_ms=latency_ms * 0.7, latency_max_ms=latency_ms * 1.6,
        latency_last_ms=latency_ms, last_at=time.time())


def emojivoto_rows(ns: str, scale: float = 1.0) -> dict[str, list[RequestRow]]:
    """One second of emojivoto traffic per workload (requests rounded, at least 1)."""

    def n(rate: float) -> int:
        return max(1, round(rate * scale))

    return {
        "vote-bot": [
            row("outbound", "web", "GET /api/list", n(10), 6, ns=ns, me="vote-bot"),
            row("outbound", "web", "GET /api/vote", n(8), 9, ns=ns, me="vote-bot"),
            row("outbound", "web", "GET /api/vote", n(2), 12, ns=ns, me="vote-bot", ok=False),
        ],
        "web": [
            row("inbound", "vote-bot", "GET /api/list", n(10), 5, ns=ns, me="web"),
            row("inbound", "vote-bot", "GET /api/vote", n(8), 8, ns=ns, me="web"),
            row("inbound", "vote-bot", "GET /api/vote", n(2), 11, ns=ns, me="web", ok=False),
            row("outbound", "emoji", "/emojivoto.v1.EmojiService/ListAll", n(10), 2, ns=ns,
                me="web", grpc=True),
            row("outbound", "emoji", "/emojivoto.v1.EmojiService/FindByShortcode", n(10), 2,
                ns=ns, me="web", grpc=True),
            row("outbound", "voting", "/emojivoto.v1.VotingService/VoteJoy", n(8), 3, ns=ns,
                me="web", grpc=True),
            row("outbound", "voting", "/emojivoto.v1.VotingService/VoteDoughnut", n(2), 3,
                ns=ns, me="web", grpc=True, ok=False),
        ],
        "emoji": [
            row("inbound", "web", "/emojivoto.v1.EmojiService/ListAll", n(10), 1.5, ns=ns,
                me="emoji", grpc=True),
            row("inbound", "web", "/emojivoto.v1.EmojiService/FindByShortcode", n(10), 1.2,
                ns=ns, me="emoji", grpc=True),
        ],
        "voting": [
            row("inbound", "web", "/emojivoto.v1.VotingService/VoteJoy", n(8), 2.5, ns=ns,
                me="voting", grpc=True),
            row("inbound", "web", "/emojivoto.v1.VotingService/VoteDoughnut", n(2), 2.5,
                ns=ns, me="voting", grpc=True, ok=False),
        ],
    }


def many_rows(ns: str, count: int) -> dict[str, list[RequestRow]]:
    """``count`` workloads in a chain, each serving its predecessor; every seventh one
    fails a tenth of its requests so the table has colour."""
    out: dict[str, list[RequestRow]] = {}
    for i in range(count):
        me, caller = f"svc-{i:02d}", f"svc-{(i - 1) % count:02d}"
        rows = [row("inbound", caller, "GET /work", 9, 4 + i % 20, ns=ns, me=me),
                row("inbound", caller, "GET /work", 1, 30, ns=ns, me=me, ok=i % 7 != 3)]
        out[me] = rows
    return out


@dataclass
class Mesh:
    """Synthetic proxies: one pod per workload, reports every ``REPORT_SECONDS``."""

    namespace: str
    shape: str = "emojivoto"  # or "many:<count>"
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    seq: int = 0

    def rows(self, scale: float) -> dict[str, list[RequestRow]]:
        if self.shape.startswith("many:"):
            return many_rows(self.namespace, int(self.shape.split(":")[1]))
        return emojivoto_rows(self.namespace, scale)

    def reports(self, start: float, seconds: int, jitter: bool = False) -> list[MetricsReport]:
        out = []
        rng = random.Random(self.seq)
        for i in range(int(seconds / REPORT_SECONDS)):
            begin = start + i * REPORT_SECONDS
            scale = 0.8 + 0.4 * rng.random() if jitter else 1.0
            for workload, requests in self.rows(scale).items():
                direction = "outbound" if workload == "vote-bot" else "inbound"
                tcp = [TcpRow(direction=direction, peer_namespace=self.namespace,  # type: ignore[arg-type]
                              tls=True, opens=1, closes=1, open_connections=2,
                              read_bytes=2000, write_bytes=8000)]
                out.append(MetricsReport(
                    namespace=self.namespace, workload=workload, pod=f"{workload}-0",
                    instance=self.instance, seq=self.seq, interval_start=begin,
                    interval_end=begin + REPORT_SECONDS,
                    identity=identity(workload, self.namespace), requests=requests, tcp=tcp))
            self.seq += 1
        return out


async def publish(nc: Client, reports: list[MetricsReport]) -> None:
    for report in reports:
        await nc.publish(names.metrics_subject(report.namespace, report.workload, report.pod),
                         encode(report))
    await nc.flush()


async def keep_reporting(nc: Client, mesh: Mesh, stop: asyncio.Event,
                         jitter: bool = True) -> None:
    """Publish one report per pod every second until ``stop`` (at most ten minutes)."""
    deadline = time.monotonic() + 600
    while not stop.is_set() and time.monotonic() < deadline:
        now = time.time()
        await publish(nc, mesh.reports(now - REPORT_SECONDS, 1, jitter=jitter))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REPORT_SECONDS)


@dataclass
class Stack:
    dashboard: DashboardService
    metrics: MetricsService

    @property
    def url(self) -> str:
        return self.dashboard.url

    async def until_accepted(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.metrics.aggregator.accepted < count:
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def control_plane(bus: Bus, poll_interval: float = 0.5) -> AsyncIterator[Stack]:
    """Metrics, tap and the dashboard, in-process, the dashboard on a free port."""
    metrics = MetricsService("metrics-test")
    dashboard = DashboardService(port=0, poll_interval=poll_interval)
    async with in_process(bus, "metrics", metrics.install), \
            in_process(bus, "tap", TapService("tap-test").install), \
            in_process(bus, "dashboard", dashboard.install):
        yield Stack(dashboard, metrics)


# ----- tap, as a proxy sees it


async def open_sessions(kv: KeyValue, namespace: str, workload: str,
                        timeout: float = 10.0) -> list[TapSession]:
    """Wait for tap sessions on ``namespace``/``workload`` in ``shoal_tap`` (as a proxy's
    watch would see them)."""
    decoder: Decoder[TapSession] = Decoder(TapSession, names.BUCKET_TAP)
    async with asyncio.timeout(timeout):
        while True:
            found = []
            with contextlib.suppress(Exception):
                for key in await kv.keys():
                    entry = await kv.get(key)
                    if not entry.value:
                        continue
                    session = decoder.decode(entry.value)
                    if (session.filter.namespace == namespace
                            and session.filter.workload == workload):
                        found.append(session)
            if found:
                return found
            await asyncio.sleep(0.05)


def vote_call(namespace: str, session_id: str, n: int = 1, method: str = "VoteDoughnut",
              grpc_status: int = 2) -> list[TapEvent]:
    """The three events of an inbound call at voting (VoteDoughnut fails with Unknown)."""
    now = time.time()
    src = Peer(address="127.0.0.1", port=41000 + n, namespace=namespace, workload="web",
               pod="web-0", identity=identity("web", namespace))
    dst = Peer(address="127.0.0.1", port=8080, namespace=namespace, workload="voting",
               pod="voting-0", identity=identity("voting", namespace))
    common = {"id": f"7:{n}", "sessions": [session_id], "direction": "inbound",
              "source": src, "destination": dst, "tls": True}
    return [
        TapRequestStart(**common, timestamp=now, method="POST",  # type: ignore[arg-type]
                        authority=f"voting-svc.{namespace}.svc.cluster.local:8080",
                        path=f"/emojivoto.v1.VotingService/{method}", scheme="http",
                        headers={"content-type": "application/grpc", "te": "trailers",
                                 "authorization": "<redacted>"}),
        TapResponseStart(**common, timestamp=now + 0.002, status=200,  # type: ignore[arg-type]
                         latency_us=2100 + 37 * n, headers={"content-type": "application/grpc"}),
        TapResponseEnd(**common, timestamp=now + 0.0025,  # type: ignore[arg-type]
                       grpc_status=grpc_status, duration_us=2500 + 41 * n,
                       response_bytes=0 if grpc_status else 5),
    ]


def vote_doughnut(namespace: str, session_id: str, n: int = 1) -> list[TapEvent]:
    return vote_call(namespace, session_id, n)


async def publish_tap(nc: Client, namespace: str, events: list[TapEvent]) -> None:
    for event in events:
        pod = event.destination.pod if event.direction == "inbound" else event.source.pod
        workload = (event.destination.workload if event.direction == "inbound"
                    else event.source.workload)
        await nc.publish(names.tap_subject(namespace, workload, pod), encode(event))
    await nc.flush()
