"""Discovery and registration against a real NATS server and the real destination service
logic (run in-process with ServiceRuntime): registrations become endpoints a proxy's
Discovery sees; deregistration and heartbeat expiry remove them; an operator's writes,
deletes and purges are followed; a malformed value is ignored; and with NATS killed and
restarted the last set stays in use, then resyncs, deletions included.

The fail-static tests get their own nats-server (killed and restarted on the same port)
and put a small TCP relay between the proxy and it, so the proxy can be kept cut off
while the operator changes the bucket: that is what proves the watch resyncs on
reconnect rather than merely following live updates."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from shoal.kernel.bus import connect, ensure_buckets
from shoal.kernel.config import BusSettings, generate_credentials
from shoal.kernel.natsd import EmbeddedNats
from shoal.proxy import discover
from shoal.proxy.balance import Balancer
from shoal.proxy.buslink import BusLink, BusUnavailable
from shoal.proxy.discover import Discovery, ServiceEntry
from shoal.proxy.register import REGISTER_TTL_SECONDS, Registrar
from shoal.schemas import names
from shoal.schemas.codec import encode
from shoal.schemas.endpoints import Endpoint, EndpointSet, Registration
from shoal.services.destination.service import DestinationService
from shoal.services.runtime import ServiceRuntime

from .conftest import Bus

NS = "disc"
WAIT = 10.0  # bound on any wait for the bus in these tests


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def until(predicate: Callable[[], bool], timeout: float = WAIT,
                what: str = "condition") -> float:
    """Poll every 10 ms until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    return time.monotonic() - start


def ports(entry: ServiceEntry) -> list[int]:
    return sorted(state.key[1] for state in entry.balancer.endpoints)


@pytest.fixture(scope="module")
async def destination(bus: Bus, buckets: None) -> AsyncIterator[ServiceRuntime]:
    runtime = ServiceRuntime("destination", "test", bus.settings("controller"))
    DestinationService(replica="destination-test").install(runtime)
    task = asyncio.create_task(runtime.run())
    await until(lambda: runtime.ready or task.done(), what="destination ready")
    assert runtime.ready, task
    yield runtime
    runtime.stop()
    await asyncio.wait_for(task, 15)


@pytest.fixture
async def link(bus: Bus, buckets: None) -> AsyncIterator[BusLink]:
    link = BusLink(bus.settings("proxy"), "test-proxy")
    await link.start()
    assert await link.wait_connected(WAIT)
    yield link
    await link.close()


@pytest.fixture
async def discovery(link: BusLink) -> AsyncIterator[Discovery]:
    discovery = Discovery(link, Balancer)
    yield discovery
    await discovery.close()


def registration(service: str, port: int, ttl: float = REGISTER_TTL_SECONDS) -> Registration:
    return Registration(namespace=NS, service=service, workload=service, pod=f"{service}-0",
                        address="127.0.0.1", port=port, ttl_seconds=ttl,
                        identity=f"{service}.{NS}.serviceaccount.identity.shoal.cluster.local")


async def test_registered_endpoint_appears_and_deregistration_removes_it_within_1s(
        destination: ServiceRuntime, link: BusLink, discovery: Discovery) -> None:
    service = unique("web")
    entry = await discovery.resolve(NS, service, timeout=WAIT)
    assert entry.known.is_set() and not entry.exists and len(entry.balancer) == 0
    registrar = Registrar(link, registration(service, 18080))
    await registrar.start()
    await until(lambda: ports(entry) == [18080], what="endpoint appears")
    assert entry.exists and entry.endpoint_set is not None
    endpoint = entry.balancer.endpoints[0].endpoint
    assert endpoint.labels == {"pod": f"{service}-0", "workload": service}
    assert endpoint.identity.startswith(f"{service}.{NS}.")
    assert registrar.sent >= 1
    assert discovery.lookup(NS, service) is entry  # one entry, one watch per service
    await registrar.stop()
    took = await until(lambda: len(entry.balancer) == 0, timeout=1.0, what="removal")
    print(f"deregistration -> endpoint gone in {took * 1000:.0f} ms")
    assert entry.endpoint_set is not None and entry.endpoint_set.endpoints == []


async def test_two_instances_then_heartbeats_stop_and_the_ttl_removes_one(
        bus: Bus, destination: ServiceRuntime, discovery: Discovery, link: BusLink) -> None:
    service = unique("emoji")
    entry = discovery.lookup(NS, service)
    steady = Registrar(link, registration(service, 18081))
    await steady.start()
    # A second proxy with its own connection, which will die without deregistering.
    doomed_link = BusLink(bus.settings("proxy"), "test-doomed")
    await doomed_link.start()
    doomed = Registrar(doomed_link, registration(service, 18082, ttl=1.5), interval_s=0.5)
    await doomed.start()
    await until(lambda: ports(entry) == [18081, 18082], what="both endpoints")
    await doomed_link.close()  # a crash: heartbeats stop, no deregistration
    died = time.monotonic()
    await asyncio.sleep(0.5)
    assert ports(entry) == [18081, 18082]  # within the TTL it stays
    await until(lambda: ports(entry) == [18081], timeout=5.0, what="ttl expiry")
    print(f"heartbeats stopped -> endpoint gone after {time.monotonic() - died:.2f}s "
          f"(ttl 1.5 s, sweep 0.5 s)")
    await steady.stop()


async def test_operator_writes_deletes_purges_and_bad_values(
        operator: Client, discovery: Discovery) -> None:
    service = unique("voting")
    key = names.service_key(NS, service)
    kv = await operator.jetstream().key_value(names.BUCKET_ENDPOINTS)
    entry = await discovery.resolve(NS, service, timeout=WAIT)
    assert entry.known.is_set() and not entry.exists

    def endpoint_set(*port_list: int) -> bytes:
        return encode(EndpointSet(namespace=NS, service=service, endpoints=[
            Endpoint(address="127.0.0.1", port=p) for p in port_list]))

    await kv.put(key, endpoint_set(1, 2))
    await until(lambda: ports(entry) == [1, 2], what="operator put")
    kept = entry.balancer.get(("127.0.0.1", 2))
    await kv.put(key, endpoint_set(2, 3))  # overwrite: 1 goes, 3 comes, 2 keeps its state
    await until(lambda: ports(entry) == [2, 3], what="overwrite")
    assert entry.balancer.get(("127.0.0.1", 2)) is kept

    await kv.put(key, b'{"namespace": "disc", "endpoints": [{"port": "eighty"}]}')
    await until(lambda: entry.malformed == 1, what="malformed value seen")
    assert ports(entry) == [2, 3] and entry.exists  # the last good set stays

    await kv.delete(key)
    await until(lambda: not entry.exists, what="delete")
    assert ports(entry) == [] and entry.endpoint_set is None

    await kv.put(key, endpoint_set(4))
    await until(lambda: ports(entry) == [4], what="put after delete")
    await kv.purge(key)
    await until(lambda: not entry.exists and ports(entry) == [], what="purge")


async def test_a_late_watch_sees_the_current_value_and_bad_names_are_refused(
        operator: Client, discovery: Discovery) -> None:
    service = unique("late")
    kv = await operator.jetstream().key_value(names.BUCKET_ENDPOINTS)
    await kv.put(names.service_key(NS, service), encode(EndpointSet(
        namespace=NS, service=service, endpoints=[Endpoint(address="127.0.0.2", port=7)])))
    entry = await discovery.resolve(NS, service, timeout=WAIT)
    assert entry.exists and ports(entry) == [7]
    for bad_ns, bad_service in (("disc", "*"), ("disc", ">"), ("Disc", "web"), ("a.b", "c")):
        bad = await discovery.resolve(bad_ns, bad_service, timeout=1.0)
        assert bad.known.is_set() and not bad.exists and not bad.watching


async def test_watches_are_bounded(discovery: Discovery,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discover, "MAX_WATCHED_SERVICES", 2)
    first = await discovery.resolve(NS, unique("one"), timeout=WAIT)
    second = discovery.lookup(NS, unique("two"))
    discovery.lookup(NS, first.service)  # used again: now the most recent
    third = discovery.lookup(NS, unique("three"))
    await until(lambda: not second.watching, what="least recently used watch stopped")
    assert len(discovery) == 2 and first.watching and third.watching
    assert first.known.is_set()  # an evicted or kept entry stays usable as it was


# --- fail static: own nats-server, killed and restarted on the same port ---------------


class Relay:
    """A TCP relay that can cut every connection through it and refuse new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blocked = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def block(self) -> None:
        self.blocked = True
        for writer in list(self._writers):
            writer.transport.abort()

    def unblock(self) -> None:
        self.blocked = False

    async def close(self) -> None:
        self.block()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            async with asyncio.timeout(2.0):
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.target_port)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnBus:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.credentials = generate_credentials()
        self.port = free_port()
        self.server = EmbeddedNats(state_dir=state_dir, credentials=self.credentials,
                                   port=self.port)

    def settings(self, role: str, port: int | None = None) -> BusSettings:
        creds = self.credentials[role]
        return BusSettings(url=f"nats://127.0.0.1:{port or self.port}", user=creds.user,
                           password=creds.password, role=role)

    def restart(self) -> None:
        self.server = EmbeddedNats(state_dir=self.state_dir, credentials=self.credentials,
                                   port=self.port)
        self.server.start()


@pytest.fixture
async def own_bus(tmp_path: Path) -> AsyncIterator[OwnBus]:
    own = OwnBus(tmp_path)
    own.server.start()
    try:
        yield own
    finally:
        own.server.stop()


async def _put_retrying(operator: Client, key: str, value: bytes) -> None:
    """A put right after a restart may find JetStream still recovering: retry (bounded)."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                kv = await operator.jetstream().key_value(names.BUCKET_ENDPOINTS)
                await kv.put(key, value)
                return
            except Exception:
                await asyncio.sleep(0.1)


async def test_nats_killed_and_restarted_last_set_stays_then_resyncs(
        own_bus: OwnBus) -> None:
    operator = await connect(own_bus.settings("operator"), "test-operator")
    await ensure_buckets(operator.jetstream())
    relay = Relay(own_bus.port)
    await relay.start()
    link = BusLink(own_bus.settings("proxy", port=relay.port), "test-proxy-failstatic")
    discovery = Discovery(link, Balancer)
    connects: list[Client] = []

    async def on_connect(nc: Client) -> None:
        connects.append(nc)

    link.on_connect(on_connect)
    try:
        kv = await operator.jetstream().key_value(names.BUCKET_ENDPOINTS)
        a, b = unique("a"), unique("b")

        def value(service: str, *port_list: int) -> bytes:
            return encode(EndpointSet(namespace=NS, service=service, endpoints=[
                Endpoint(address="127.0.0.1", port=p) for p in port_list]))

        await kv.put(names.service_key(NS, a), value(a, 1, 2))
        await kv.put(names.service_key(NS, b), value(b, 5))
        await link.start()
        entry_a = await discovery.resolve(NS, a, timeout=WAIT)
        entry_b = await discovery.resolve(NS, b, timeout=WAIT)
        assert ports(entry_a) == [1, 2] and ports(entry_b) == [5]

        own_bus.server.kill()  # a crash, not a clean shutdown
        await until(lambda: not link.connected, what="proxy sees the bus gone")
        await asyncio.sleep(1.0)
        assert ports(entry_a) == [1, 2] and ports(entry_b) == [5]  # fail static
        assert entry_a.balancer.pick(time.monotonic()) is not None
        assert not await link.publish(names.REGISTER, b"{}")  # dropped, not buffered
        with pytest.raises(BusUnavailable):
            await link.request(names.IDENTITY_CERTIFY, b"{}", timeout=0.5)

        # The bus comes back, but the proxy stays cut off while the operator changes
        # things: endpoint 1 of a goes, b is deleted entirely.
        relay.block()
        own_bus.restart()
        await _put_retrying(operator, names.service_key(NS, a), value(a, 2))
        await kv.delete(names.service_key(NS, b))
        await asyncio.sleep(0.5)
        assert ports(entry_a) == [1, 2] and ports(entry_b) == [5]  # still cut off

        relay.unblock()
        took = await until(lambda: ports(entry_a) == [2] and ports(entry_b) == [],
                           what="resync after reconnect")
        print(f"proxy reconnected and resynced {took:.2f}s after the relay opened")
        assert link.connects == 2 and len(connects) == 2  # callbacks re-ran on reconnect
        assert not entry_b.exists
        # and the restarted watch follows live changes again
        await kv.put(names.service_key(NS, b), value(b, 6, 7))
        await until(lambda: ports(entry_b) == [6, 7], what="live update after resync")
    finally:
        await discovery.close()
        await link.close()
        await relay.close()
        with contextlib.suppress(Exception):
            await operator.close()


async def test_proxy_starts_while_the_bus_is_down(own_bus: OwnBus, tmp_path: Path) -> None:
    relay = Relay(own_bus.port)
    await relay.start()
    relay.block()
    link = BusLink(own_bus.settings("proxy", port=relay.port), "test-proxy-early")
    discovery = Discovery(link, Balancer)
    registrar = Registrar(link, registration("early", 18090))
    calls: list[Client] = []

    async def on_connect(nc: Client) -> None:
        calls.append(nc)

    link.on_connect(on_connect)
    try:
        async with asyncio.timeout(1.0):
            await link.start()  # returns at once
            await registrar.start()
        entry = discovery.lookup(NS, "early")
        assert not await link.wait_connected(0.5)
        assert not entry.known.is_set() and calls == []
        assert registrar.sent == 0 and link.dropped_publishes >= 1
        relay.unblock()
        assert await link.wait_connected(WAIT)
        # No control plane has created the bucket yet: that is an answer (no endpoints).
        await until(lambda: entry.known.is_set() and registrar.sent >= 1,
                    what="watch and heartbeat after the late connect")
        assert len(calls) == 1 and not entry.exists
        # The control plane comes up: the watch, still retrying, finds the value.
        operator = await connect(own_bus.settings("operator"), "test-operator")
        try:
            await ensure_buckets(operator.jetstream())
            await _put_retrying(operator, names.service_key(NS, "early"), encode(EndpointSet(
                namespace=NS, service="early", endpoints=[Endpoint(address="127.0.0.1",
                                                                   port=9)])))
        finally:
            await operator.close()
        await until(lambda: ports(entry) == [9], what="value once the bucket exists")
    finally:
        await registrar.stop()
        await discovery.close()
        await link.close()
        await relay.close()
