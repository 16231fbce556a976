"""Wires the registry to the bus: registrations in, ``shoal_endpoints`` out.

Every replica subscribes to all registrations (no queue group: each must know every
instance to compute whole sets) and writes a set only when it differs from the stored
one, so replicas that agree write nothing twice and a duplicate heartbeat costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.endpoints import EndpointSet, RegisterMessage, Registration
from shoal.schemas.events import EndpointsChanged

from ..runtime import ServiceContext, ServiceRuntime
from .registry import Registry, same_endpoints

log = logging.getLogger("shoal.destination")

SWEEP_INTERVAL_SECONDS = 0.5  # how often heartbeat expiry is checked


class DestinationService:
    def __init__(self, replica: str = "destination") -> None:
        self.registry = Registry()
        self.replica = replica
        self._register_decoder: Decoder[RegisterMessage] = Decoder(
            RegisterMessage, names.REGISTER)
        self._set_decoder: Decoder[EndpointSet] = Decoder(EndpointSet, names.BUCKET_ENDPOINTS)
        self._kv: KeyValue | None = None
        self._ctx: ServiceContext | None = None
        self._lock = asyncio.Lock()

    def install(self, runtime: ServiceRuntime) -> None:
        runtime.on_setup(self._setup)
        runtime.add_subscription(names.REGISTER, self._on_register)
        runtime.add_task(self._sweep)

    async def _setup(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._kv = await ctx.js.key_value(names.BUCKET_ENDPOINTS)
        now = time.time()
        for key in await self._stored_keys():
            entry = await self._kv.get(key)
            if entry.value:
                try:
                    self.registry.adopt(self._set_decoder.decode(entry.value), now)
                except ValueError as error:
                    log.warning("ignoring stored %s: %s", key, error)

    async def _stored_keys(self) -> list[str]:
        assert self._kv is not None
        try:
            return list(await self._kv.keys())
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            return []

    async def _on_register(self, msg: Msg) -> None:
        message = self._register_decoder.decode(msg.data, msg.subject)
        if isinstance(message, Registration):
            changed = self.registry.register(message, time.time())
        else:
            changed = self.registry.deregister(message)
        await self._publish(changed)

    async def _sweep(self, ctx: ServiceContext) -> None:
        while not ctx.stopping.is_set():
            try:
                await asyncio.wait_for(ctx.stopping.wait(), SWEEP_INTERVAL_SECONDS)
            except TimeoutError:
                pass
            await self._publish(self.registry.expire(time.time()))

    async def _publish(self, keys: list[str]) -> None:
        if not keys or self._kv is None:
            return
        async with self._lock:
            for key in keys:
                await self._write(key)

    async def _write(self, key: str) -> None:
        assert self._kv is not None and self._ctx is not None
        now = time.time()
        fresh = self.registry.endpoint_set(key, now)
        previous: EndpointSet | None = None
        try:
            entry = await self._kv.get(key)
            if entry.value:
                previous = self._set_decoder.decode(entry.value)
        except KeyNotFoundError:
            pass
        except ValueError as error:
            log.warning("overwriting malformed %s: %s", key, error)
        if previous is not None and same_endpoints(previous, fresh):
            return
        try:
            await self._kv.put(key, encode(fresh))
        except Exception as error:  # bus away: the next heartbeat or sweep retries
            log.warning("could not write endpoints of %s: %s", key, error)
            return
        before = {f"{e.address}:{e.port}" for e in previous.endpoints} if previous else set()
        after = {f"{e.address}:{e.port}" for e in fresh.endpoints}
        event = EndpointsChanged(
            at=now, source=self.replica, namespace=fresh.namespace, service=fresh.service,
            count=len(fresh.endpoints), added=sorted(after - before),
            removed=sorted(before - after))
        log.info("endpoints %s: %d (+%d -%d)", key, event.count, len(event.added),
                 len(event.removed))
        await self._ctx.nc.publish(names.event_subject("endpoints"), encode(event))
