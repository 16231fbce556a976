"""The proxy's telemetry across a bus restart (its own nats-server, so the session bus is
not disturbed): the tap watch is restarted on reconnect and follows sessions opened after
it, and the metrics reports of the outage are sent late, in order, so the reports of the
proxy's life (read back from the JetStream stream) add up to exactly the requests the
app served, the last one sent on SIGTERM after draining."""

from __future__ import annotations

import asyncio
import http.client
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shoal.kernel.bus import ensure_buckets
from shoal.kernel.config import BusSettings, bus_environment, generate_credentials
from shoal.kernel.natsd import EmbeddedNats
from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.metrics import MetricsReport
from shoal.schemas.tap import TapEvent, TapFilter, TapSession

from .apps import LOOPBACK, HttpApp, free_port
from .proxyproc import ProxyProcess, proxy_env

NS = "telemetry"
WAIT_SECONDS = 15.0
EVENTS: Decoder[TapEvent] = Decoder(TapEvent, names.TAP_ALL)
REPORTS: Decoder[MetricsReport] = Decoder(MetricsReport, names.METRICS_REPORTS_ALL)


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(state_dir=tmp_path / "bus", credentials=generate_credentials())
    server.start()
    yield server
    server.stop()


def _env(server: EmbeddedNats, role: str) -> dict[str, str]:
    creds = server.credentials[role]
    settings = BusSettings(url=server.url, user=creds.user, password=creds.password, role=role)
    return proxy_env({**os.environ, **bus_environment(settings)})


async def _operator(server: EmbeddedNats) -> Client:
    creds = server.credentials["operator"]
    return await nats.connect(server.url, user=creds.user, password=creds.password,
                              max_reconnect_attempts=-1, reconnect_time_wait=0.2)


def _get(port: int) -> int:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


async def _tap_until(nc: Client, port: int, session: str, seen: list[TapEvent]) -> None:
    """Send requests until the proxy publishes events for ``session``."""
    async with asyncio.timeout(WAIT_SECONDS):
        while not any(session in e.sessions for e in seen):
            assert await asyncio.to_thread(_get, port) == 200
            await asyncio.sleep(0.05)


async def _session(nc: Client, sid: str) -> None:
    kv = await nc.jetstream().key_value(names.BUCKET_TAP)
    session = TapSession(id=sid, expires_at=time.time() + 50,
                         filter=TapFilter(namespace=NS, workload="client"))
    await kv.put(sid, encode(session))


async def test_tap_and_reports_survive_a_bus_restart(own_nats: EmbeddedNats,
                                                     tmp_path: Path) -> None:
    nc = await _operator(own_nats)
    await ensure_buckets(nc.jetstream())
    app = HttpApp("app").start()
    local = free_port()
    proxy = ProxyProcess("client", _env(own_nats, "proxy"), tmp_path, "--namespace", NS,
                         "--workload", "client", "--pod", "client-1", "--no-register",
                         "--report-interval", "0.5",
                         "--upstream", f"{local}=app.{NS}:80",
                         "--static-endpoint", f"app.{NS}={LOOPBACK}:{app.port}")
    seen: list[TapEvent] = []

    async def on_event(msg: Msg) -> None:
        seen.append(EVENTS.decode(msg.data))

    try:
        proxy.start()
        await asyncio.to_thread(proxy.wait_ready)
        await nc.subscribe(names.TAP_ALL, cb=on_event)
        await _session(nc, "before")
        await _tap_until(nc, local, "before", seen)

        own_nats.kill()
        for _ in range(20):  # served from what the proxy knows; reports wait
            assert await asyncio.to_thread(_get, local) == 200
        await asyncio.sleep(1.0)
        own_nats.restart()
        async with asyncio.timeout(WAIT_SECONDS):
            while not nc.is_connected:
                await asyncio.sleep(0.05)
        await _session(nc, "after")  # only a watch restarted on reconnect sees it
        await _tap_until(nc, local, "after", seen)

        proxy.signal(15)
        assert await asyncio.to_thread(proxy.wait, WAIT_SECONDS) == 0, proxy.log()
        served = app.requests
        js = nc.jetstream()
        sub = await js.subscribe(names.metrics_subject(NS, "client", "client-1"),
                                 ordered_consumer=True)
        reports: list[MetricsReport] = []
        async with asyncio.timeout(WAIT_SECONDS):
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    break
                reports.append(REPORTS.decode(msg.data))
        await sub.unsubscribe()
        assert len({r.instance for r in reports}) == 1
        seqs = [r.seq for r in reports]
        assert seqs == list(range(len(seqs))), seqs  # none lost, none twice, in order
        counted = sum(row.requests for r in reports for row in r.requests
                      if row.direction == "outbound")
        assert counted == served, (counted, served)
        assert {row.peer_service for r in reports for row in r.requests} == {"app"}
    finally:
        proxy.stop()
        app.stop()
        await nc.close()
