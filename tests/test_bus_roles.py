"""Roles on a real NATS server: what a proxy may and may not do, observed, not assumed.

A publish the user may not make does not raise in nats-py: the server reports it
asynchronously as a permissions violation, so each test watches the error callback and
checks that the write did not happen."""

from __future__ import annotations

import asyncio
import uuid

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shoal.schemas import names
from shoal.schemas.codec import encode
from shoal.schemas.endpoints import Endpoint, EndpointSet
from shoal.schemas.metrics import MetricsReport

from .conftest import Bus

pytestmark = pytest.mark.usefixtures("buckets")


class Violations:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.seen = asyncio.Event()

    async def __call__(self, error: Exception) -> None:
        self.errors.append(str(error))
        self.seen.set()

    async def wait_for(self, fragment: str, timeout: float = 3.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for error in self.errors:
                    if fragment.lower() in error.lower():
                        return error
                self.seen.clear()
                await self.seen.wait()


async def _proxy(bus: Bus) -> tuple[Client, Violations]:
    violations = Violations()
    nc = await bus.client("proxy", error_cb=violations)
    return nc, violations


@pytest.mark.parametrize("bucket", [names.BUCKET_ENDPOINTS, names.BUCKET_POLICY,
                                    names.BUCKET_TRUST])
async def test_proxy_cannot_write_state_buckets(bus: Bus, operator: Client, bucket: str) -> None:
    nc, violations = await _proxy(bus)
    key = f"test.denied-{uuid.uuid4().hex[:8]}"
    try:
        await nc.jetstream().key_value(bucket)  # reading the bucket is allowed
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            # what kv.put does, with a short wait for the ack that never comes
            await nc.jetstream().publish(f"$KV.{bucket}.{key}", b"forged", timeout=0.5)
        error = await violations.wait_for("Permissions Violation")
        assert f"$KV.{bucket}.{key}".lower() in error.lower()
    finally:
        await nc.close()
    op_kv = await operator.jetstream().key_value(bucket)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await op_kv.get(key)


async def test_proxy_cannot_call_policy_apply(bus: Bus) -> None:
    nc, violations = await _proxy(bus)
    try:
        await nc.publish(names.POLICY_APPLY, b"{}")
        error = await violations.wait_for("Permissions Violation")
        assert names.POLICY_APPLY.lower() in error.lower()
    finally:
        await nc.close()


async def test_operator_can_write_state_and_call_apply(bus: Bus, operator: Client) -> None:
    received: list[bytes] = []

    async def policy_stub(msg: Msg) -> None:  # stands in for the policy
        received.append(msg.data)                          # service: this test is about
        await msg.respond(b"ok")                           # the operator's permission
    sub = await operator.subscribe(names.POLICY_APPLY, cb=policy_stub)
    try:
        reply = await operator.request(names.POLICY_APPLY, b"{}", timeout=2)
        assert reply.data == b"ok" and received == [b"{}"]
    finally:
        await sub.unsubscribe()
    for bucket in (names.BUCKET_ENDPOINTS, names.BUCKET_POLICY, names.BUCKET_TRUST):
        kv = await operator.jetstream().key_value(bucket)
        revision = await kv.put("test.operator", b"{}")
        assert revision > 0
        await kv.delete("test.operator")


async def test_proxy_reads_and_watches_buckets(bus: Bus, operator: Client) -> None:
    op_kv = await operator.jetstream().key_value(names.BUCKET_ENDPOINTS)
    value = EndpointSet(namespace="test", service="watched",
                        endpoints=[Endpoint(address="127.0.0.1", port=9)])
    await op_kv.put("test.watched", encode(value))
    nc, violations = await _proxy(bus)
    try:
        kv = await nc.jetstream().key_value(names.BUCKET_ENDPOINTS)
        entry = await kv.get("test.watched")
        assert entry.value == encode(value)
        watcher = await kv.watch("test.watched")
        first = await watcher.updates(timeout=2)
        assert first is not None and first.value == encode(value)
        await watcher.stop()
    finally:
        await nc.close()
    assert not [e for e in violations.errors if "violation" in e.lower()]


async def test_proxy_publishes_metrics_and_requests_certification(
    bus: Bus, operator: Client
) -> None:
    subject = names.metrics_subject("test", "web", "web-1")
    sub = await operator.subscribe(names.METRICS_REPORTS_ALL)
    nc, violations = await _proxy(bus)
    try:
        report = MetricsReport(namespace="test", workload="web", pod="web-1", instance="i",
                               seq=0, interval_start=0, interval_end=1)
        await nc.publish(subject, encode(report))
        await nc.flush()
        msg = await sub.next_msg(timeout=2)
        assert msg.subject == subject
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(names.IDENTITY_CERTIFY, b"{}", timeout=1)  # allowed, unserved
    finally:
        await sub.unsubscribe()
        await nc.close()
    assert not [e for e in violations.errors if "violation" in e.lower()]


async def test_wrong_password_is_refused(bus: Bus) -> None:
    settings = bus.settings("proxy")
    from shoal.kernel.bus import connect
    from shoal.kernel.config import BusSettings

    wrong = BusSettings(url=settings.url, user=settings.user, password="wrong", role="proxy")
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await connect(wrong, "test-wrong", allow_reconnect=False)
