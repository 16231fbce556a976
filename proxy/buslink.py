"""The proxy's one connection to the bus, as the ``proxy`` role.

A proxy must start and serve even when the bus is down (fail static), so ``start()``
returns at once and the connection is made in the background, retried forever;
nats-py then reconnects forever on its own. Whatever needs the bus (endpoint watches,
registration heartbeats) registers an ``on_connect`` callback, which runs after the first
connect and again after every reconnect, because watches and consumers do not survive a
server restart.

Concurrency contract: callbacks run one at a time, in registration order, in one
background task; a reconnect that happens while they run makes them run again once they
finish. Each callback is bounded by ``CALLBACK_TIMEOUT_SECONDS``, so it should only start
work (signal a task), not wait on the bus for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client

from shoal.kernel.bus import connect
from shoal.kernel.config import BusSettings

log = logging.getLogger("shoal.proxy.bus")

# After nats-py gives up on an initial connect attempt (it normally retries forever by
# itself), wait this long before the next one; kept short so a proxy started just before
# its bus joins it within a second.
RETRY_SECONDS = 0.5
# Bound on one on_connect callback; they only signal tasks, so this is generous.
CALLBACK_TIMEOUT_SECONDS = 5.0
# Bound on flushing buffered publishes at close (a last deregistration, for one).
CLOSE_FLUSH_TIMEOUT_SECONDS = 1.0
# Bound on waiting for the background tasks to end at close.
CLOSE_TIMEOUT_SECONDS = 2.0

OnConnect = Callable[[Client], Awaitable[None]]


class BusError(Exception):
    """A bus request failed; the subclass says why."""


class BusUnavailable(BusError):
    """Not connected to the bus right now (it is down or still being reached)."""


class BusTimeout(BusError):
    """No reply within the timeout."""


class BusLink:
    """The proxy's bus connection; see the module docstring."""

    def __init__(self, settings: BusSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self._nc: Client | None = None
        self._callbacks: list[OnConnect] = []
        self._connected = asyncio.Event()
        self._kick = asyncio.Event()  # the runner has work: see _all_due and _fresh
        self._all_due = False  # (re)connected: every callback runs
        self._fresh: list[OnConnect] = []  # registered while connected: run just these
        self._connect_task: asyncio.Task[None] | None = None
        self._runner_task: asyncio.Task[None] | None = None
        self._closing = False
        self.connects = 0  # first connect + reconnects, for /ready diagnostics and tests
        self.dropped_publishes = 0

    @property
    def client(self) -> Client | None:
        return self._nc

    @property
    def connected(self) -> bool:
        nc = self._nc
        return nc is not None and nc.is_connected

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._connect_task is not None:
            return
        self._connect_task = asyncio.create_task(self._connect_forever(),
                                                 name=f"buslink-connect-{self.name}")
        self._runner_task = asyncio.create_task(self._run_callbacks(),
                                                name=f"buslink-callbacks-{self.name}")

    async def wait_connected(self, timeout: float) -> bool:
        """True once connected; False if that did not happen within ``timeout``."""
        if self.connected:
            return True
        try:
            async with asyncio.timeout(timeout):
                while not self.connected:
                    self._connected.clear()
                    await self._connected.wait()
        except TimeoutError:
            return False
        return True

    def on_connect(self, callback: OnConnect) -> None:
        """Run ``callback(client)`` after every (re)connect; at once if connected now."""
        self._callbacks.append(callback)
        if self.connected:
            self._fresh.append(callback)
            self._kick.set()

    async def publish(self, subject: str, data: bytes) -> bool:
        """Publish if connected; otherwise drop the message and return False (a heartbeat
        or a metrics report is stale by the time the bus is back)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            self.dropped_publishes += 1
            return False
        try:
            await nc.publish(subject, data)
        except (nats.errors.Error, OSError) as error:
            log.debug("publish to %s dropped: %s", subject, error)
            self.dropped_publishes += 1
            return False
        return True

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        """One request/reply; raises BusUnavailable, BusTimeout or BusError."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise BusUnavailable(f"bus not connected ({self.settings.redacted()})")
        try:
            msg = await nc.request(subject, data, timeout=timeout)
        except nats.errors.TimeoutError:
            raise BusTimeout(f"no reply on {subject} within {timeout}s") from None
        except nats.errors.NoRespondersError:
            raise BusError(f"no service answers on {subject}") from None
        except (nats.errors.Error, OSError) as error:
            raise BusError(f"request on {subject} failed: {error}") from None
        return bytes(msg.data)

    async def flush(self, timeout: float) -> bool:
        """Wait until buffered publishes reached the server; False if not connected/timeout."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        try:
            await nc.flush(timeout=timeout)  # type: ignore[arg-type]
        except (nats.errors.Error, OSError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        self._kick.set()  # the runner checks _closing, should a cancel be lost in nats-py
        tasks = [task for task in (self._connect_task, self._runner_task) if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_SECONDS)
        nc = self._nc
        self._nc = None
        if nc is not None and not nc.is_closed:
            await self.flush_client(nc)
            with contextlib.suppress(Exception):
                await nc.close()

    @staticmethod
    async def flush_client(nc: Client) -> None:
        if nc.is_connected:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=CLOSE_FLUSH_TIMEOUT_SECONDS)  # type: ignore[arg-type]

    async def _connect_forever(self) -> None:
        while not self._closing:
            try:
                # nats-py keeps retrying an unreachable server inside connect() (reconnect
                # attempts are unlimited), so this normally returns only once connected.
                nc = await connect(self.settings, self.name,
                                   disconnected_cb=self._on_disconnected,
                                   reconnected_cb=self._on_reconnected)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("bus connect failed (%s): %s; retrying", self.name, error)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self._nc = nc
            log.info("bus connected (%s) to %s", self.name, self.settings.redacted())
            self._on_up()
            return

    def _on_up(self) -> None:
        self.connects += 1
        self._connected.set()
        self._all_due = True
        self._kick.set()

    async def _on_disconnected(self) -> None:
        self._connected.clear()

    async def _on_reconnected(self) -> None:
        self._on_up()

    async def _run_callbacks(self) -> None:
        while not self._closing:
            await self._kick.wait()
            self._kick.clear()
            if self._closing:
                return
            due = list(self._callbacks) if self._all_due else list(self._fresh)
            self._all_due = False
            self._fresh.clear()
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue  # the reconnect will set _all_due again
            for callback in due:
                try:
                    await asyncio.wait_for(callback(nc), CALLBACK_TIMEOUT_SECONDS)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("bus on_connect callback %r failed", callback)
