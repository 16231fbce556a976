"""The dashboard's only way to the mesh: the control plane's NATS APIs. Metrics queries
go to ``shoal.v1.metrics.query`` (answers shared for a moment, so a hundred browsers on
one page cost one query per refresh), tap sessions to ``shoal.v1.tapctl.session``, and
tap events come from the session's subject. Proxies are never scraped.

Failures are named: ``PlaneUnavailable`` (no answer: the service is down or the bus is
away; a 503 for the browser) and ``PlaneRefused`` (the service answered with an error;
a 400 when it was the request's fault, else a 502).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client

from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.errors import ErrorReply
from shoal.schemas.metrics import MetricsAnswer, MetricsQuery
from shoal.schemas.tap import (
    TapClose,
    TapExtend,
    TapOpen,
    TapSessionClosed,
    TapSessionGranted,
    TapSessionReply,
)

# A request to a control-plane service waits this long (the CLI waits 5 s too); the
# services answer from memory in about a millisecond, so this only fires when one is down.
REQUEST_TIMEOUT_SECONDS = 5.0
# An answer is reused for this long: under the 2 s refresh of every page, so each
# refresh sees new figures, and long enough that simultaneous viewers share one query.
ANSWER_TTL_SECONDS = 1.0
# Distinct queries remembered at once (one per open page kind and workload: a few
# dozen in practice); expired ones are dropped first, then the oldest.
MAX_CACHED_ANSWERS = 512


class PlaneUnavailable(RuntimeError):
    """No answer from a control-plane service."""


class PlaneRefused(RuntimeError):
    """A service answered with an error reply; ``code`` is its ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ERRORS: Decoder[ErrorReply] = Decoder(ErrorReply, "error reply")


async def request(nc: Client, subject: str, payload: bytes, service: str) -> bytes:
    """One request/reply; the reply body, or a named failure."""
    try:
        msg = await nc.request(subject, payload, timeout=REQUEST_TIMEOUT_SECONDS)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise PlaneUnavailable(f"the {service} service did not answer on {subject}") from None
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
        raise PlaneUnavailable("the bus is not reachable (reconnecting)") from None
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        try:
            reply = _ERRORS.decode(msg.data, subject)
            raise PlaneRefused(reply.code, f"{service} service: {reply.message}")
        except WireDecodeError:
            text = msg.headers.get("Nats-Service-Error", "error")
            raise PlaneRefused("internal", f"{service} service: {text}") from None
    return bytes(msg.data)


class MetricsClient:
    """Asks the metrics service; identical queries within ``ANSWER_TTL_SECONDS`` share one
    answer (and one request in flight)."""

    def __init__(self, nc: Client, ttl: float = ANSWER_TTL_SECONDS) -> None:
        self._nc = nc
        self._ttl = ttl
        self._decoder: Decoder[MetricsAnswer] = Decoder(MetricsAnswer, names.METRICS_QUERY)
        self._cache: dict[bytes, tuple[float, asyncio.Future[MetricsAnswer]]] = {}
        self.requests_sent = 0

    async def ask(self, query: MetricsQuery) -> MetricsAnswer:
        key = encode(query)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self._ttl and _usable(cached[1]):
            return await asyncio.shield(cached[1])
        self._prune(now)
        future = asyncio.ensure_future(self._send(key))
        self._cache[key] = (now, future)
        return await asyncio.shield(future)

    async def _send(self, payload: bytes) -> MetricsAnswer:
        self.requests_sent += 1
        data = await request(self._nc, names.METRICS_QUERY, payload, "metrics")
        try:
            return self._decoder.decode(data)
        except WireDecodeError as error:
            raise PlaneRefused("internal", f"unexpected answer: {error}") from None

    def _prune(self, now: float) -> None:
        if len(self._cache) < MAX_CACHED_ANSWERS:
            return
        for key, (at, future) in list(self._cache.items()):
            if now - at >= self._ttl and future.done():
                del self._cache[key]
        while len(self._cache) >= MAX_CACHED_ANSWERS:
            del self._cache[next(iter(self._cache))]


def _usable(future: asyncio.Future[MetricsAnswer]) -> bool:
    """In flight, or answered; a failure is not shared (the next caller asks again)."""
    if not future.done():
        return True
    return not future.cancelled() and future.exception() is None


class TapSessions:
    """Opens, extends and closes sessions through the tap service."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._decoder: Decoder[TapSessionReply] = Decoder(TapSessionReply, names.TAP_SESSION)

    async def _call(self, message: msgspec.Struct) -> Any:
        data = await request(self._nc, names.TAP_SESSION, encode(message), "tap")
        try:
            return self._decoder.decode(data)
        except WireDecodeError as error:
            raise PlaneRefused("internal", f"unexpected answer: {error}") from None

    async def open(self, request_: TapOpen) -> TapSessionGranted:
        reply = await self._call(request_)
        if not isinstance(reply, TapSessionGranted):
            raise PlaneRefused("internal", "tap service: no session in the answer")
        return reply

    async def extend(self, session_id: str, ttl_seconds: float) -> TapSessionGranted:
        reply = await self._call(TapExtend(id=session_id, ttl_seconds=ttl_seconds))
        if not isinstance(reply, TapSessionGranted):
            raise PlaneRefused("internal", "tap service: no session in the answer")
        return reply

    async def close(self, session_id: str) -> None:
        reply = await self._call(TapClose(id=session_id))
        if not isinstance(reply, TapSessionClosed):
            raise PlaneRefused("internal", "tap service: unexpected answer to close")
