"""The destination service: registrations become shoal_endpoints entries (pure registry
tests, then the real service against a real NATS server)."""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.client import Client
from nats.js.kv import KeyValue

from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.endpoints import Deregistration, EndpointSet, Registration
from shoal.services.destination.registry import ADOPTED_TTL_SECONDS, Registry
from shoal.services.destination.service import DestinationService

from .conftest import Bus
from .services import in_process


def _reg(pod: str, port: int, ns: str = "ns", ttl: float = 10.0) -> Registration:
    return Registration(namespace=ns, service="web", workload="web", pod=pod,
                        address="127.0.0.1", port=port, ttl_seconds=ttl)


def test_registry_heartbeats_expiry_and_deregistration() -> None:
    registry = Registry()
    assert registry.register(_reg("a", 1), now=0) == ["ns.web"]
    assert registry.register(_reg("a", 1), now=1) == []  # a heartbeat changes nothing
    assert registry.register(_reg("b", 2, ttl=3), now=1) == ["ns.web"]
    assert [e.port for e in registry.endpoint_set("ns.web", 1).endpoints] == [1, 2]
    assert registry.expire(now=5) == ["ns.web"]  # b's heartbeats stopped
    assert [e.port for e in registry.endpoint_set("ns.web", 5).endpoints] == [1]
    dereg = Deregistration(namespace="ns", service="web", pod="a", address="127.0.0.1",
                           port=1)
    assert registry.deregister(dereg) == ["ns.web"]
    assert registry.deregister(dereg) == []
    assert registry.endpoint_set("ns.web", 6).endpoints == []


def test_adopted_instances_get_one_ttl_to_heartbeat() -> None:
    registry = Registry()
    registry.register(_reg("a", 1), now=0)
    stored = registry.endpoint_set("ns.web", 0)
    late = Registry()
    late.adopt(stored, now=100)
    assert late.expire(now=100 + ADOPTED_TTL_SECONDS - 1) == []
    assert late.register(_reg("a", 1), now=101) == []  # same endpoint: no write
    assert late.expire(now=101 + 9) == []  # the heartbeat gave it its own TTL back
    assert late.endpoint_set("ns.web", 101).endpoints[0].labels["pod"] == "a"


async def _wait_for_ports(kv: KeyValue, key: str, ports: set[int], timeout: float = 5) -> None:
    decoder: Decoder[EndpointSet] = Decoder(EndpointSet, names.BUCKET_ENDPOINTS)
    async with asyncio.timeout(timeout):
        while True:
            try:
                entry = await kv.get(key)
                if entry.value and {e.port for e in decoder.decode(entry.value).endpoints} == ports:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.05)


async def test_service_writes_endpoints_and_drops_silent_instances(
    bus: Bus, operator: Client,
) -> None:
    ns = f"t{uuid.uuid4().hex[:6]}"
    proxy = await bus.client("proxy")
    kv = await operator.jetstream().key_value(names.BUCKET_ENDPOINTS)
    try:
        async with in_process(bus, "destination", DestinationService().install):
            await proxy.publish(names.REGISTER, encode(_reg("a", 1001, ns)))
            await proxy.publish(names.REGISTER, encode(_reg("b", 1002, ns, ttl=1.0)))
            await proxy.publish(names.REGISTER, b'{"type":"register","port":"x"}')  # dropped
            await _wait_for_ports(kv, f"{ns}.web", {1001, 1002})
            # b stops heartbeating: gone after its TTL; a keeps heartbeating
            for _ in range(8):
                await proxy.publish(names.REGISTER, encode(_reg("a", 1001, ns)))
                await asyncio.sleep(0.25)
            await _wait_for_ports(kv, f"{ns}.web", {1001}, timeout=3)
            await proxy.publish(names.REGISTER, encode(Deregistration(
                namespace=ns, service="web", pod="a", address="127.0.0.1", port=1001)))
            await _wait_for_ports(kv, f"{ns}.web", set(), timeout=2)
    finally:
        await proxy.close()
