"""Fail static: NATS stops in the middle of traffic and the proxies keep serving from the
endpoints they last saw (their own nats-server, so the session bus is not disturbed)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import requests

from shoal.kernel.bus import ensure_buckets
from shoal.kernel.config import BusSettings, bus_environment, generate_credentials
from shoal.kernel.natsd import EmbeddedNats

from .apps import LOOPBACK, HttpApp
from .proxyproc import ProxyProcess, destination, http_get, proxy_env

NS = "static"


def _env(server: EmbeddedNats, role: str, state_dir: Path) -> dict[str, str]:
    creds = server.credentials[role]
    settings = BusSettings(url=server.url, user=creds.user, password=creds.password, role=role)
    return proxy_env({**os.environ, **bus_environment(settings),
                      "SHOAL_STATE_DIR": str(state_dir)})


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(state_dir=tmp_path / "bus", credentials=generate_credentials())
    server.start()
    yield server
    server.stop()


async def _create_buckets(server: EmbeddedNats) -> None:
    creds = server.credentials["operator"]
    nc = await nats.connect(server.url, user=creds.user, password=creds.password)
    await ensure_buckets(nc.jetstream())
    await nc.close()


def test_traffic_keeps_flowing_when_nats_stops(own_nats: EmbeddedNats, tmp_path: Path) -> None:
    asyncio.run(_create_buckets(own_nats))
    app = HttpApp("steady").start()
    dest, dest_port = destination(_env(own_nats, "controller", tmp_path), tmp_path)
    inbound = ProxyProcess("in", _env(own_nats, "proxy", tmp_path), tmp_path,
                           "--namespace", NS, "--service", "steady", outbound=False,
                           app_port=app.port)
    out = ProxyProcess("out", _env(own_nats, "proxy", tmp_path), tmp_path, "--namespace", NS)
    children = [dest, inbound, out]
    url = f"http://{LOOPBACK}:{out.outbound_port}/"
    try:
        for child in children:
            child.start()
        dest.wait_http_ok(dest_port, "/ready")
        inbound.wait_ready()
        out.wait_ready()
        deadline = time.monotonic() + 15
        while requests.get(url, headers={"Host": "steady"}, timeout=5).status_code != 200:
            assert time.monotonic() < deadline, out.log()
            time.sleep(0.1)
        own_nats.kill()
        statuses = []
        end = time.monotonic() + 2.0
        with requests.Session() as session:
            while time.monotonic() < end:
                statuses.append(session.get(url, headers={"Host": "steady"},
                                            timeout=5).status_code)
        # New client connections too, not only the pooled ones.
        for _ in range(5):
            statuses.append(requests.get(url, headers={"Host": "steady.static"},
                                         timeout=5).status_code)
        assert len(statuses) > 10 and set(statuses) == {200}, statuses
        assert http_get(out.admin_port, "/ready")[0] == 200  # ready stays: fail static
        # Shutting down without a bus still ends cleanly (the deregistration is lost;
        # the TTL removes the instance).
        inbound.signal(signal.SIGTERM)
        assert inbound.wait(15) == 0, inbound.log()
    finally:
        for child in reversed(children):
            child.stop()
        app.stop()
