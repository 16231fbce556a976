"""Tap on the proxy: which open sessions a request matches, the per-session rate cap,
header redaction, body capture, and the three events a tapped request produces.

The hot path asks one question, ``registry.active``: False while no open session can
match this proxy (no session, or none whose namespace/workload/pod filter names it), so
with tap unused a request costs one attribute check. When it is True the proxy asks
``registry.can_emit()`` (has any of those sessions a token left? at 100 events/s under
heavy traffic most requests stop here), and only then builds a ``RequestInfo`` and calls
``registry.request_start``, which applies the filters and each session's token bucket and
returns a ``TapRecord`` (or None); the record then produces the response events. Events
go to ``shoal.v1.tap.<ns>.<workload>.<pod>``, once per request whatever the number of
sessions, listing the matching sessions' ids.

Sessions come from the ``shoal_tap`` bucket (``TapRegistry.watch``), or from anything
that calls ``apply(key, value)``. Entries removed by the bucket's TTL produce no delete
event, so the registry also honours each session's ``expires_at`` on its own. A watch
(re)started after the bus was away replays the bucket; sessions it no longer holds were
closed meanwhile and are dropped (``retain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client

from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.tap import (
    MAX_BODY_CAPTURE_BYTES,
    Direction,
    Peer,
    TapFilter,
    TapRequestStart,
    TapResponseEnd,
    TapResponseStart,
    TapSession,
)

log = logging.getLogger("shoal.proxy.tap")

# Linkerd never shows these in tap output; a session may add more.
DEFAULT_REDACTED_HEADERS = frozenset({"authorization", "cookie", "set-cookie",
                                      "proxy-authorization"})
REDACTED = "[REDACTED]"
# Headers kept per event, and bytes per header value: events stay small whatever the
# request carries (HTTP/2's default header list is 16 KiB; we keep a fraction).
MAX_EVENT_HEADERS = 64
MAX_HEADER_VALUE_CHARS = 512
# Events waiting for the bus: 100/s per session for a few sessions for a few seconds.
TAP_QUEUE_LIMIT = 2048
# How often expiry is checked without traffic, so `active` falls within this of expiry.
EXPIRY_CHECK_SECONDS = 1.0
WATCH_RETRY_SECONDS = 1.0  # back-off before re-watching the bucket after an error

Emit = Callable[[str, bytes], None]
BodyPolicy = Callable[["RequestInfo"], bool]


@dataclass(frozen=True)
class LocalProxy:
    """The workload this proxy serves (its subject and what filters match on)."""

    namespace: str
    workload: str
    pod: str


Headers = Sequence[tuple[str, str]] | Sequence[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestInfo:
    """What the proxy knows about a request when its head arrives. Headers may be the
    engine's raw bytes pairs: they are decoded only for an event that goes out."""

    id: str  # "<connection>:<stream>", as Linkerd's id=B:S
    direction: Direction
    method: str
    authority: str = ""
    path: str = ""
    scheme: str = "http"
    source: Peer = field(default_factory=Peer)
    destination: Peer = field(default_factory=Peer)
    tls: bool = False
    headers: Headers = ()


def proxy_can_match(filter_: TapFilter, local: LocalProxy) -> bool:
    """Whether a session could ever match a request of this proxy."""
    return ((not filter_.namespace or filter_.namespace == local.namespace)
            and (not filter_.workload or filter_.workload == local.workload)
            and (not filter_.pod or filter_.pod == local.pod))


def _peer_matches(namespace: str, workload: str, peer: Peer, local: LocalProxy) -> bool:
    peer_ns = peer.namespace or local.namespace
    return ((not namespace or namespace == peer_ns)
            and (not workload or workload == peer.workload))


def filter_matches(filter_: TapFilter, local: LocalProxy, request: RequestInfo) -> bool:
    """Every non-empty field of the filter must match (TapFilter's contract). ``to_*`` is
    the destination's workload, ``from_*`` the source's; the path is a prefix, the
    method and scheme are case-insensitive, the authority is exact (port included if
    the filter gives one)."""
    if not proxy_can_match(filter_, local):
        return False
    if filter_.direction and filter_.direction != request.direction:
        return False
    if (filter_.to_namespace or filter_.to_workload) and not _peer_matches(
            filter_.to_namespace, filter_.to_workload, request.destination, local):
        return False
    if (filter_.from_namespace or filter_.from_workload) and not _peer_matches(
            filter_.from_namespace, filter_.from_workload, request.source, local):
        return False
    if filter_.method and filter_.method.upper() != request.method.upper():
        return False
    if filter_.scheme and filter_.scheme.lower() != request.scheme.lower():
        return False
    if filter_.authority:
        wanted = filter_.authority.lower()
        have = request.authority.lower()
        if wanted != have and (":" in wanted or have.rsplit(":", 1)[0] != wanted):
            return False
    return request.path.startswith(filter_.path_prefix)


class TokenBucket:
    """A session's rate cap: ``rate`` events per second, bursts up to one second's worth
    (Linkerd's ``--max-rps`` is a per-second cap)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.tokens = self.burst
        self.last = now

    def take(self, now: float) -> bool:
        if self.available(now):
            self.tokens -= 1.0
            return True
        return False

    def available(self, now: float) -> bool:
        """Refill to ``now``; whether a token is there (none is taken). Asked per request
        while a session is open, so a full bucket skips the arithmetic."""
        tokens = self.tokens
        if tokens < self.burst:
            elapsed = now - self.last
            if elapsed > 0.0:
                tokens += elapsed * self.rate
                if tokens > self.burst:
                    tokens = self.burst
                self.tokens = tokens
        if now > self.last:
            self.last = now
        return tokens >= 1.0


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def redact(headers: Headers, extra: Iterable[str] = ()) -> dict[str, str]:
    """Headers as an event carries them (str or raw bytes pairs): names lower-cased,
    repeated headers joined with ", ", sensitive values replaced by ``[REDACTED]``,
    bounded in count and size."""
    hidden = DEFAULT_REDACTED_HEADERS | {name.lower() for name in extra}
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = _text(raw_name).lower()
        value = _text(raw_value)
        if name not in out and len(out) >= MAX_EVENT_HEADERS:
            continue
        shown = REDACTED if name in hidden else value[:MAX_HEADER_VALUE_CHARS]
        if name in out and shown != REDACTED:
            out[name] = f"{out[name]}, {shown}"[:MAX_HEADER_VALUE_CHARS]
        else:
            out[name] = shown
    return out


def capture_body(body: bytes, limit: int) -> str:
    """At most ``limit`` bytes of a body (never more than MAX_BODY_CAPTURE_BYTES), as
    text; bytes that are not UTF-8 become U+FFFD."""
    limit = max(0, min(limit, MAX_BODY_CAPTURE_BYTES))
    return body[:limit].decode("utf-8", errors="replace") if limit else ""


@dataclass
class ActiveSession:
    session: TapSession
    bucket: TokenBucket
    can_match: bool


@dataclass
class TapRecord:
    """One tapped request: produces its response events on the same subject."""

    registry: TapRegistry
    request: RequestInfo
    sessions: list[str]
    redact_extra: frozenset[str]
    started: float  # monotonic seconds
    ended: bool = False

    def response_start(self, status: int, headers: Headers = (),
                       now: float | None = None) -> None:
        latency = (time.monotonic() if now is None else now) - self.started
        r = self.request
        event = TapResponseStart(id=r.id, sessions=self.sessions, direction=r.direction,
                                 source=r.source, destination=r.destination, tls=r.tls,
                                 timestamp=time.time(), status=status,
                                 latency_us=max(0, int(latency * 1e6)),
                                 headers=redact(headers, self.redact_extra))
        self.registry.publish(event)

    def response_end(self, *, grpc_status: int | None = None, reset_error: str = "",
                     response_bytes: int = 0, now: float | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        duration = (time.monotonic() if now is None else now) - self.started
        r = self.request
        event = TapResponseEnd(id=r.id, sessions=self.sessions, direction=r.direction,
                               source=r.source, destination=r.destination, tls=r.tls,
                               timestamp=time.time(), grpc_status=grpc_status,
                               reset_error=reset_error,
                               duration_us=max(0, int(duration * 1e6)),
                               response_bytes=max(0, response_bytes))
        self.registry.publish(event)


class TapRegistry:
    """The open sessions this proxy knows, and the one flag the hot path reads."""

    def __init__(self, local: LocalProxy, emit: Emit, *,
                 body_allowed: BodyPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.local = local
        self.subject = names.tap_subject(local.namespace, local.workload, local.pod)
        self.active = False  # read on the hot path: False costs one attribute check
        self._emit = emit
        self._body_allowed = body_allowed or (lambda _request: False)
        self._clock = clock
        self._sessions: dict[str, ActiveSession] = {}
        self._buckets: list[TokenBucket] = []  # of the live sessions that can match here
        self._next_expiry = math.inf
        self._decoder: Decoder[TapSession] = Decoder(TapSession, names.BUCKET_TAP)
        self.published = 0
        self.rate_limited = 0

    # ----- sessions

    def apply(self, key: str, value: bytes | None, now: float | None = None) -> None:
        """A bucket entry changed: ``value`` None (or empty) means deleted."""
        now = self._clock() if now is None else now
        if not value:
            self._sessions.pop(key, None)
        else:
            try:
                session = self._decoder.decode(value)
            except WireDecodeError as error:
                log.warning("ignored tap session %s: %s", key, error)
                self._sessions.pop(key, None)
                self._recompute(now)
                return
            old = self._sessions.get(key)
            if old is not None and old.session.max_rps == session.max_rps:
                bucket = old.bucket  # an extension keeps the bucket: the cap holds
            else:
                bucket = TokenBucket(session.max_rps, now)
            self._sessions[key] = ActiveSession(session, bucket,
                                                proxy_can_match(session.filter, self.local))
        self._recompute(now)

    def retain(self, keys: Iterable[str], now: float | None = None) -> None:
        """Keep only these sessions: the bucket's whole content after a (re)watch."""
        now = self._clock() if now is None else now
        wanted = set(keys)
        for key in [k for k in self._sessions if k not in wanted]:
            del self._sessions[key]
        self._recompute(now)

    def expire(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        if now >= self._next_expiry:
            for key in [k for k, s in self._sessions.items()
                        if s.session.expires_at and s.session.expires_at <= now]:
                del self._sessions[key]
            self._recompute(now)

    def _recompute(self, now: float) -> None:
        live = [s for s in self._sessions.values()
                if s.can_match and (not s.session.expires_at or s.session.expires_at > now)]
        self._buckets = [s.bucket for s in live]
        self.active = bool(live)
        expiries = [s.session.expires_at for s in self._sessions.values()
                    if s.session.expires_at]
        self._next_expiry = min(expiries, default=math.inf)

    @property
    def sessions(self) -> list[TapSession]:
        return [s.session for s in self._sessions.values()]

    def can_emit(self, now: float | None = None) -> bool:
        """Whether any session that could match this proxy has a token left: when none
        has, no request can be tapped, so the caller need not describe it."""
        wall = self._clock() if now is None else now
        if wall >= self._next_expiry:
            self.expire(wall)
        for bucket in self._buckets:  # noqa: SIM110 - a loop: any(generator) costs more
            if bucket.available(wall):
                return True
        return False

    # ----- events

    def request_start(self, request: RequestInfo, body: bytes = b"",
                      now: float | None = None) -> TapRecord | None:
        """Call only when ``active``; returns the record to report the response with, or
        None when no session matches or every matching session is at its rate cap."""
        wall = self._clock() if now is None else now
        self.expire(wall)
        matched: list[ActiveSession] = []
        for active in self._sessions.values():
            if not active.can_match or not filter_matches(active.session.filter, self.local,
                                                          request):
                continue
            if active.bucket.take(wall):
                matched.append(active)
            else:
                self.rate_limited += 1
        if not matched:
            return None
        extra = frozenset(h.lower() for a in matched for h in a.session.redact_headers)
        body_limit = max((a.session.max_body_bytes for a in matched
                          if a.session.capture_body), default=0)
        captured = ""
        if body_limit and body and self._body_allowed(request):
            captured = capture_body(body, body_limit)
        record = TapRecord(self, request, [a.session.id for a in matched], extra,
                           time.monotonic())
        event = TapRequestStart(id=request.id, sessions=record.sessions,
                                direction=request.direction, source=request.source,
                                destination=request.destination, tls=request.tls,
                                timestamp=wall, method=request.method,
                                authority=request.authority, path=request.path,
                                scheme=request.scheme,
                                headers=redact(request.headers, extra), body=captured)
        self.publish(event)
        return record

    def publish(self, event: msgspec.Struct) -> None:
        self.published += 1
        self._emit(self.subject, encode(event))

    # ----- the bucket

    async def watch(self, nc: Client, stopping: asyncio.Event) -> None:
        """Follow ``shoal_tap`` until ``stopping``; re-watch after bus errors, keeping
        the sessions known so far (they still expire on time)."""
        failures = 0
        while not stopping.is_set():
            try:
                kv = await nc.jetstream().key_value(names.BUCKET_TAP)
                watcher = await kv.watchall()
                failures = 0
                initial: set[str] | None = set()  # keys until the end-of-initial marker
                try:
                    while not stopping.is_set():
                        try:
                            entry = await watcher.updates(  # type: ignore[no-untyped-call]
                                timeout=EXPIRY_CHECK_SECONDS)
                        except TimeoutError:
                            self.expire()
                            continue
                        if entry is None:  # the end of the initial values
                            if initial is not None:
                                self.retain(initial)
                                initial = None
                            continue
                        deleted = entry.operation is not None  # DEL or PURGE
                        if initial is not None and not deleted:
                            initial.add(entry.key)
                        self.apply(entry.key, None if deleted else entry.value)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG  # once, not 1/s
                log.log(level, "tap: watching %s failed (%s); retrying every %ss",
                        names.BUCKET_TAP, error, WATCH_RETRY_SECONDS)
                self.expire()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), WATCH_RETRY_SECONDS)


class TapPublisher:
    """The bounded queue between the hot path (``emit``: an append, never blocks) and the
    bus. The runner wakes once for whatever has accumulated and hands it all to the
    client in one go (a publish only appends to nats-py's buffer), so under load tap
    events cost a wake-up per event-loop pass, not per event."""

    def __init__(self, limit: int = TAP_QUEUE_LIMIT) -> None:
        self.limit = limit
        self.queue: deque[tuple[str, bytes]] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0
        self.sent = 0

    def emit(self, subject: str, payload: bytes) -> None:
        if len(self.queue) >= self.limit:
            if not self.dropped:
                log.warning("tap: event queue full (%d); dropping events", self.limit)
            self.dropped += 1
            return
        self.queue.append((subject, payload))
        if not self._ready.is_set():
            self._ready.set()

    async def run(self, nc: Client, stopping: asyncio.Event) -> None:
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                ready = asyncio.ensure_future(self._ready.wait())
                await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not ready.done():
                    ready.cancel()
                    return
                self._ready.clear()
                queue = self.queue
                while queue:
                    subject, payload = queue.popleft()
                    try:
                        await nc.publish(subject, payload)
                        self.sent += 1
                    except Exception as error:  # the bus is away: tap is best effort
                        self.dropped += 1
                        log.debug("tap: publish failed: %s", error)
        finally:
            stop.cancel()
