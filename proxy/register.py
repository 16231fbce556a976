"""Local-mode registration: tells the destination service that this proxy's workload
serves a port, with heartbeats on ``shoal.v1.register``, and takes it back first on stop.

Timing: a heartbeat every ``REGISTER_INTERVAL_SECONDS`` (2 s) and a TTL of
``REGISTER_TTL_SECONDS`` (6 s) on the registration, so the destination drops an instance
about three missed heartbeats after its proxy died (a crash cannot deregister). A
heartbeat also goes out at once after every (re)connect, so a restarted bus relearns the
instance without waiting an interval. Heartbeats are idempotent at the destination.

Stop order: heartbeats stop first (none may follow the deregistration and register the
instance again), then the ``Deregistration`` is published and flushed, so clients stop
sending here before the proxy stops serving. If the bus is away at that moment the
deregistration is lost and the TTL removes the instance instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client

from shoal.schemas import names
from shoal.schemas.codec import encode
from shoal.schemas.endpoints import Deregistration, Registration

from .buslink import BusLink

log = logging.getLogger("shoal.proxy.register")

REGISTER_INTERVAL_SECONDS = 2.0
# Three heartbeats: one lost message or a short stall does not drop the instance.
REGISTER_TTL_SECONDS = 3 * REGISTER_INTERVAL_SECONDS
# Bound on pushing the deregistration out before stop() returns.
DEREGISTER_FLUSH_TIMEOUT_SECONDS = 1.0


class Registrar:
    """Heartbeats one ``Registration`` until ``stop()``; see the module docstring.

    Pass ``ttl_seconds=REGISTER_TTL_SECONDS`` in the registration (the schema's default
    TTL is longer, for writers that heartbeat less often).
    """

    def __init__(self, link: BusLink, registration: Registration,
                 interval_s: float = REGISTER_INTERVAL_SECONDS) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if registration.ttl_seconds < 2 * interval_s:
            log.warning("registration TTL %.1fs is under two heartbeat intervals (%.1fs): "
                        "one late heartbeat will drop the instance",
                        registration.ttl_seconds, interval_s)
        self.link = link
        self.registration = registration
        self.interval_s = interval_s
        self.sent = 0  # heartbeats that reached the connection
        self._payload = encode(registration)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        link.on_connect(self._on_connect)

    async def start(self) -> None:
        if self._task is None and not self._stopped:
            self._task = asyncio.create_task(self._heartbeat(), name="registrar")

    async def stop(self) -> None:
        """Stop heartbeats, then deregister (published and flushed, bounded)."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._wake.set()  # the loop checks _stopped too
            self._task.cancel()
            await asyncio.wait([self._task], timeout=DEREGISTER_FLUSH_TIMEOUT_SECONDS)
        reg = self.registration
        dereg = Deregistration(namespace=reg.namespace, service=reg.service, pod=reg.pod,
                               address=reg.address, port=reg.port)
        if await self.link.publish(names.REGISTER, encode(dereg)):
            await self.link.flush(DEREGISTER_FLUSH_TIMEOUT_SECONDS)
            log.info("deregistered %s.%s %s:%d", reg.namespace, reg.service, reg.address,
                     reg.port)
        else:
            log.warning("bus away: could not deregister; the destination drops this "
                        "instance after %.0fs", reg.ttl_seconds)

    async def _on_connect(self, nc: Client) -> None:
        self._wake.set()

    async def _heartbeat(self) -> None:
        while not self._stopped:
            if await self.link.publish(names.REGISTER, self._payload):
                self.sent += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
