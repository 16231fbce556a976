"""Tap over a real NATS: the tap service opens, extends and closes sessions with caps; a
proxy's registry (on the proxy role's connection) follows the bucket; a plain nats-py
subscriber on ``shoal.v1.tap.>`` sees the events while a session is open and nothing
after it expires or closes; the relay keeps a session's events only."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shoal.proxy.tap import REDACTED, LocalProxy, RequestInfo, TapPublisher, TapRegistry
from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.errors import ErrorReply
from shoal.schemas.tap import (
    Peer,
    TapClose,
    TapEvent,
    TapExtend,
    TapFilter,
    TapOpen,
    TapRequestStart,
    TapSessionClosed,
    TapSessionGranted,
    TapSessionReply,
)
from shoal.services.tap.relay import follow
from shoal.services.tap.service import TapService
from shoal.services.tap.sessions import MAX_SESSION_RPS, MAX_SESSIONS

from .conftest import Bus
from .services import in_process

REPLIES: Decoder[TapSessionReply] = Decoder(TapSessionReply, names.TAP_SESSION)
EVENTS: Decoder[TapEvent] = Decoder(TapEvent, names.TAP_ALL)
WAIT_SECONDS = 15.0  # a bound for a loaded 2-core CI machine, not a timing assertion


async def _call(nc: Client, request: object) -> TapSessionReply | ErrorReply:
    msg = await nc.request(names.TAP_SESSION, encode(request), timeout=2.0)  # type: ignore[arg-type]
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        return Decoder(ErrorReply, "").decode(msg.data)
    return REPLIES.decode(msg.data)


async def _until(predicate: object, timeout: float = WAIT_SECONDS) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


class Proxy:
    """The tap half of a proxy: registry + publisher on the proxy role's connection."""

    def __init__(self, nc: Client, namespace: str, workload: str = "web") -> None:
        self.publisher = TapPublisher()
        self.registry = TapRegistry(LocalProxy(namespace, workload, f"{workload}-1"),
                                    self.publisher.emit)
        self.nc = nc
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.served = 0

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.registry.watch(self.nc, self.stop)),
                      asyncio.create_task(self.publisher.run(self.nc, self.stop))]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), WAIT_SECONDS)

    def serve(self, n: int, path: str = "/api/vote") -> int:
        """n requests through the hot path's tap hooks; returns how many were tapped."""
        tapped = 0
        for i in range(n):
            self.served += 1
            if not self.registry.active:  # the one check the hot path makes
                continue
            record = self.registry.request_start(RequestInfo(
                id=f"7:{self.served}", direction="inbound", method="GET",
                authority="web-svc:8080", path=path, tls=True,
                source=Peer(address="127.0.0.1", port=40000 + i, workload="vote-bot"),
                destination=Peer(address="127.0.0.1", port=8080, workload="web"),
                headers=(("authorization", "Bearer t"), ("x-request-id", str(i)))))
            if record is not None:
                tapped += 1
                record.response_start(500)
                record.response_end(grpc_status=2, response_bytes=17)
        return tapped


@contextlib.asynccontextmanager
async def _proxy(bus: Bus, namespace: str) -> AsyncIterator[Proxy]:
    nc = await bus.client("proxy")
    proxy = Proxy(nc, namespace)
    proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
        await nc.close()


@contextlib.asynccontextmanager
async def _plain_subscriber(bus: Bus) -> AsyncIterator[list[Msg]]:
    """Any NATS client: nats-py directly, the operator's credentials, no Shoal code."""
    creds = bus.server.credentials["operator"]
    nc = await nats.connect(bus.url, user=creds.user, password=creds.password)
    seen: list[Msg] = []

    async def on_message(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(names.TAP_ALL, cb=on_message)
    await nc.flush()
    try:
        yield seen
    finally:
        await nc.close()


async def test_events_flow_while_open_and_stop_after_expiry(bus: Bus, operator: Client) -> None:
    ns = f"tap-{uuid.uuid4().hex[:6]}"
    async with (in_process(bus, "tap", TapService().install), _proxy(bus, ns) as proxy,
                _plain_subscriber(bus) as seen):
        assert proxy.serve(10) == 0 and not proxy.registry.active  # no session: no events
        reply = await _call(operator, TapOpen(
            filter=TapFilter(namespace=ns, workload="web"), max_rps=5, ttl_seconds=2.0))
        assert isinstance(reply, TapSessionGranted)
        sid = reply.session.id
        assert reply.subject == f"{names.TAP_PREFIX}.{ns}.web.*"
        await _until(lambda: proxy.registry.active)
        async with follow(operator, reply.session) as relayed:
            began = time.monotonic()
            tapped = proxy.serve(100)
            refill = 5 * (time.monotonic() - began)
            assert 5 <= tapped <= 5 + refill + 1  # the rate cap: a burst of 5, then 5/s
            await _until(lambda: len(seen) >= 3 * tapped)
            await _until(lambda: relayed.queue.qsize() >= 3 * tapped)
        events = [EVENTS.decode(m.data) for m in seen]
        assert all(m.subject == names.tap_subject(ns, "web", "web-1") for m in seen)
        assert all(e.sessions == [sid] for e in events)
        starts = [e for e in events if isinstance(e, TapRequestStart)]
        assert len(starts) == tapped
        assert starts[0].headers["authorization"] == REDACTED
        assert starts[0].headers["x-request-id"] == "0"
        # The client stops extending: the session expires, and events stop.
        await _until(lambda: not proxy.registry.active)
        count = len(seen)
        assert proxy.serve(50) == 0
        await asyncio.sleep(0.3)
        assert len(seen) == count


async def test_extend_close_and_caps(bus: Bus, operator: Client) -> None:
    ns = f"tap-{uuid.uuid4().hex[:6]}"
    async with in_process(bus, "tap", TapService().install), _proxy(bus, ns) as proxy:
        granted = await _call(operator, TapOpen(filter=TapFilter(namespace=ns),
                                                max_rps=50_000 / 10, ttl_seconds=2.0))
        assert isinstance(granted, TapSessionGranted)
        assert granted.session.max_rps == min(5000, MAX_SESSION_RPS)
        sid = granted.session.id
        await _until(lambda: proxy.registry.active)
        extended = await _call(operator, TapExtend(id=sid, ttl_seconds=30))
        assert isinstance(extended, TapSessionGranted)
        assert extended.session.expires_at > granted.session.expires_at + 20
        await asyncio.sleep(2.5)  # past the first expiry: the extension keeps it open
        assert proxy.registry.active and proxy.serve(1) == 1
        closed = await _call(operator, TapClose(id=sid))
        assert isinstance(closed, TapSessionClosed)
        await _until(lambda: not proxy.registry.active)
        gone = await _call(operator, TapExtend(id=sid))
        assert isinstance(gone, ErrorReply) and gone.code == "bad_request"
        # The session cap: open until refused, then close them all.
        opened: list[str] = []
        refused: ErrorReply | None = None
        for _ in range(MAX_SESSIONS + 1):
            reply = await _call(operator, TapOpen(filter=TapFilter(namespace=ns, pod="none")))
            if isinstance(reply, ErrorReply):
                refused = reply
                break
            assert isinstance(reply, TapSessionGranted)
            opened.append(reply.session.id)
        for session_id in opened:
            await _call(operator, TapClose(id=session_id))
        assert refused is not None and "too many open tap sessions" in refused.message
        assert len(opened) <= MAX_SESSIONS


async def test_proxies_may_not_open_sessions(bus: Bus, buckets: None) -> None:
    errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)

    nc = await bus.client("proxy", error_cb=on_error)
    try:
        with pytest.raises(nats.errors.Error):
            await nc.request(names.TAP_SESSION, encode(TapOpen()), timeout=0.5)
        await _until(lambda: any("permissions violation" in str(e) for e in errors))
    finally:
        await nc.close()


def test_events_before_the_session_id_is_known_are_kept() -> None:
    from shoal.schemas.tap import TapResponseStart
    from shoal.services.tap.relay import SessionEvents

    events = SessionEvents(names.TAP_ALL)
    for sid in ("mine", "other", "mine"):
        events.offer(encode(TapResponseStart(id="1:1", direction="inbound", status=200,
                                             latency_us=1, sessions=[sid])), "s")
    events.offer(b"not json", "s")
    assert events.queue.qsize() == 0 and events.malformed == 1
    events.bind("mine")
    assert events.queue.qsize() == 2
