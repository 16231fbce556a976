"""Endpoint discovery: keeps each called service's balancer fed from ``shoal_endpoints``.

The first ``lookup`` of a service starts a KV watch on key ``<ns>.<service>``; every
value is decoded with the schema's decoder and handed to the service's ``Balancer``.

Event flow and failure rules:
- A watch first delivers the key's current value (or its delete/purge marker), then an
  end-of-initial-values marker (``None`` in nats-py), then live updates. The entry is
  ``known`` once that marker (or a value) arrived; a key that does not exist, or was
  deleted or purged, means an empty endpoint set (``exists`` False).
- A malformed value is logged and ignored: the last good set stays in use.
- Fail static: when the bus goes away, nothing is cleared; the balancer keeps serving
  the last set. On every (re)connect ``BusLink`` runs ``_on_connect``, which restarts all
  watches; a restarted watch delivers the current state again, so changes made while the
  proxy was cut off (deletions included) are applied.
- A watch that fails to start (JetStream still recovering after a server restart, say)
  is retried while connected, backing off from ``WATCH_RETRY_SECONDS`` to
  ``WATCH_RETRY_MAX_SECONDS``; logged once per streak of failures. A bucket that does
  not exist yet (the proxy started before the control plane) is an answer: the entry is
  ``known`` with no endpoints (any set seen before is kept), and the watch keeps retrying.

Concurrency: one task per watched service; the balancer is only touched from the event
loop, so the proxy's request path needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError
from shoal.schemas.endpoints import EndpointSet

from .balance import Balancer
from .buslink import BusLink

log = logging.getLogger("shoal.proxy.discover")

# Linkerd fails a request that found no endpoints after 3 s outbound, 1 s inbound.
OUTBOUND_FAILFAST_SECONDS = 3.0
INBOUND_FAILFAST_SECONDS = 1.0
# Services watched at once. Each is one JetStream consumer; an app calling more distinct
# services than this is unusual, and Host headers are client input, so the bound keeps a
# stream of made-up authorities from creating unbounded watches. Beyond it the least
# recently looked-up service's watch stops (its entry keeps its last set).
MAX_WATCHED_SERVICES = 1024
# Pause before retrying a watch that could not start or broke while connected, doubled
# per failure up to the maximum: quick after a blip, a STREAM.INFO every 2 s at worst.
WATCH_RETRY_SECONDS = 0.5
WATCH_RETRY_MAX_SECONDS = 2.0
# Bound on starting one watch (consumer create + info); nats-py's JetStream default is 5.
WATCH_START_TIMEOUT_SECONDS = 5.0
# Bound on stopping a watch (an unsubscribe; may hang while the bus is away).
WATCH_STOP_TIMEOUT_SECONDS = 1.0
# Bound on waiting for the watch tasks at close.
CLOSE_TIMEOUT_SECONDS = 2.0
# The server removes a watch's ephemeral consumer after this long without interest: long
# enough to ride out a short disconnect, short enough that the consumers of a proxy that
# died or restarted its watches do not linger (nats-py's default is 5 minutes).
WATCH_INACTIVE_THRESHOLD_SECONDS = 30.0


class ServiceEntry:
    """One service's discovery state, shared by every request to it."""

    def __init__(self, namespace: str, service: str, balancer: Balancer) -> None:
        self.namespace = namespace
        self.service = service
        self.key = names.service_key(namespace, service)
        self.balancer = balancer
        self.endpoint_set: EndpointSet | None = None  # last good set (kept: fail static)
        self.known = asyncio.Event()  # the bucket answered (a value or "no such key")
        self.exists = False  # the bucket holds a (non-deleted) entry for this service
        self.revision = 0  # KV revision of the last applied value or marker
        self.updates = 0  # how many times the set was applied (for tests and debugging)
        self.malformed = 0  # values ignored because they did not decode
        self.last_used = time.monotonic()
        self._restart = asyncio.Event()
        self._stopped = False  # checked as well as cancelling: nats-py may swallow a cancel
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (f"ServiceEntry({self.key}, exists={self.exists}, "
                f"endpoints={len(self.balancer)}, rev={self.revision})")

    @property
    def watching(self) -> bool:
        return self._task is not None and not self._task.done()


class Discovery:
    """Per-service endpoint watches over a ``BusLink``; see the module docstring."""

    def __init__(self, link: BusLink, balancer_factory: Callable[[], Balancer]) -> None:
        self._link = link
        self._factory = balancer_factory
        self._entries: OrderedDict[str, ServiceEntry] = OrderedDict()
        self._decoder: Decoder[EndpointSet] = Decoder(EndpointSet, names.BUCKET_ENDPOINTS)
        self._kv: KeyValue | None = None
        self._kv_client: Client | None = None
        self._closed = False
        link.on_connect(self._on_connect)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, namespace: str, service: str) -> ServiceEntry:
        """The entry for a service, starting its watch on the first call."""
        key = names.service_key(namespace, service)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.last_used = time.monotonic()
            return entry
        entry = ServiceEntry(namespace, service, self._factory())
        if not (names.is_dns_label(namespace) and names.is_dns_label(service)):
            # Not a name the destination can write (and '*' or '>' would be wildcards in
            # the watch): known at once, with no endpoints. Not cached.
            entry.known.set()
            return entry
        self._entries[key] = entry
        if len(self._entries) > MAX_WATCHED_SERVICES:
            _, evicted = self._entries.popitem(last=False)
            log.info("watching more than %d services: stopped watching %s",
                     MAX_WATCHED_SERVICES, evicted.key)
            self._stop_entry(evicted)
        if not self._closed:
            entry._task = asyncio.create_task(self._watch(entry), name=f"watch-{key}")
        return entry

    async def resolve(self, namespace: str, service: str, timeout: float) -> ServiceEntry:
        """``lookup``, then wait up to ``timeout`` until the bucket has answered."""
        entry = self.lookup(namespace, service)
        if not entry.known.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await entry.known.wait()
        return entry

    async def close(self) -> None:
        self._closed = True
        tasks = [entry._task for entry in self._entries.values() if entry._task is not None]
        for entry in self._entries.values():
            self._stop_entry(entry)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_SECONDS)
            if pending:
                log.warning("%d watch tasks did not stop within %.0fs", len(pending),
                            CLOSE_TIMEOUT_SECONDS)

    @staticmethod
    def _stop_entry(entry: ServiceEntry) -> None:
        entry._stopped = True
        entry._restart.set()  # wakes the task wherever it waits, should a cancel be lost
        if entry._task is not None:
            entry._task.cancel()

    async def _on_connect(self, nc: Client) -> None:
        # Only signal: each watch task restarts itself (BusLink bounds this callback).
        self._kv = None
        for entry in self._entries.values():
            entry._restart.set()

    async def _bucket(self) -> KeyValue:
        nc = self._link.client
        if nc is None:
            raise ConnectionError("bus not connected")
        if self._kv is None or self._kv_client is not nc:
            self._kv = await nc.jetstream().key_value(names.BUCKET_ENDPOINTS)
            self._kv_client = nc
        return self._kv

    async def _watch(self, entry: ServiceEntry) -> None:
        """Run the entry's watch, restarting it after reconnects and failures."""
        failures = 0
        while not entry._stopped:
            if not self._link.connected:
                # Wait for the bus; _on_connect sets _restart once it is back.
                await entry._restart.wait()
                if entry._stopped:
                    return
            entry._restart.clear()
            try:
                async with asyncio.timeout(WATCH_START_TIMEOUT_SECONDS):
                    kv = await self._bucket()
                    watcher = await kv.watch(
                        entry.key, inactive_threshold=WATCH_INACTIVE_THRESHOLD_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if isinstance(error, BucketNotFoundError):
                    error = ConnectionError(f"bucket {names.BUCKET_ENDPOINTS} does not exist")
                    entry.known.set()  # an answer: no endpoints (yet)
                level = logging.WARNING if failures == 0 else logging.DEBUG
                log.log(level, "watch of %s could not start: %s; retrying", entry.key, error)
                await self._pause(entry, failures)
                failures += 1
                continue
            if failures:
                log.info("watch of %s started after %d failed attempts", entry.key, failures)
            failures = 0
            if entry._stopped:
                entry._restart.set()  # stopped while starting: fall through to stop it
            reader = asyncio.create_task(self._read(entry, watcher))
            restart = asyncio.create_task(entry._restart.wait())
            try:
                await asyncio.wait({reader, restart}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reader, restart):
                    task.cancel()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(WATCH_STOP_TIMEOUT_SECONDS):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            if reader.done() and not reader.cancelled():
                log.warning("watch of %s ended: %s; restarting", entry.key,
                            reader.exception())
                await self._pause(entry, 0)

    @staticmethod
    async def _pause(entry: ServiceEntry, failures: int) -> None:
        """Sleep before a retry, but wake at once when the bus comes back."""
        delay = min(WATCH_RETRY_MAX_SECONDS, WATCH_RETRY_SECONDS * 2.0 ** min(failures, 8))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await entry._restart.wait()

    async def _read(self, entry: ServiceEntry, watcher: Any) -> None:
        seen = False  # a value or marker arrived before the end-of-initial marker
        async for update in watcher:
            if update is None:  # end of the initial values
                if not seen:
                    self._apply_absent(entry, 0)
                entry.known.set()
                continue
            seen = True
            if update.operation in (KV_DEL, KV_PURGE):
                self._apply_absent(entry, update.revision)
            else:
                self._apply_value(entry, update.value or b"", update.revision)
            entry.known.set()
        raise ConnectionError("watch stopped")

    def _apply_absent(self, entry: ServiceEntry, revision: int) -> None:
        entry.exists = False
        entry.endpoint_set = None
        entry.revision = revision
        entry.updates += 1
        entry.balancer.update((), time.monotonic())
        log.info("endpoints %s: none (no entry)", entry.key)

    def _apply_value(self, entry: ServiceEntry, value: bytes, revision: int) -> None:
        try:
            endpoint_set = self._decoder.decode(value, f"{names.BUCKET_ENDPOINTS}/{entry.key}")
        except WireDecodeError as error:
            entry.malformed += 1
            log.warning("ignoring endpoints value (revision %d), keeping the last good set: "
                        "%s", revision, error)
            return
        entry.exists = True
        entry.endpoint_set = endpoint_set
        entry.revision = revision
        entry.updates += 1
        entry.balancer.update(endpoint_set.endpoints, time.monotonic())
        log.info("endpoints %s: %d (revision %d)", entry.key,
                 len(endpoint_set.endpoints), revision)
