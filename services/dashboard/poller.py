"""The dashboard's heartbeat: every ``POLL_INTERVAL_SECONDS`` it asks the metrics service
for the namespace and workload tables and a short-window sample of every workload,
keeps the samples in ``History`` (so a page opened now shows the last minutes at once),
and wakes the streams waiting for the next tick.

It polls whether or not a browser is watching: three small queries every two seconds,
so that history exists before anyone looks. A failed poll keeps the last good snapshot
and records the error, which streams pass on to the browser as a banner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from shoal.schemas.metrics import StatAnswer, StatQuery

from .history import History
from .plane import MetricsClient, PlaneRefused, PlaneUnavailable
from .views import SAMPLE_WINDOW_SECONDS, TABLE_WINDOW_SECONDS

log = logging.getLogger("shoal.dashboard")

# Pages refresh this often (the "every ~2 s"; Linkerd's dashboard polls at 2 s).
POLL_INTERVAL_SECONDS = 2.0


@dataclass(frozen=True)
class Snapshot:
    """One tick's tables, as the metrics service answered them."""

    time: float
    namespaces: StatAnswer
    workloads: StatAnswer


class Poller:
    def __init__(self, metrics: MetricsClient, interval: float = POLL_INTERVAL_SECONDS,
                 history: History | None = None) -> None:
        self.metrics = metrics
        self.interval = interval
        self.history = history or History()
        self.snapshot: Snapshot | None = None
        self.error = ""  # why the last poll failed; empty when it worked
        self.generation = 0  # bumped on every tick, good or bad
        self._changed = asyncio.Event()

    async def poll_once(self) -> None:
        now = time.time()
        try:
            namespaces, workloads, samples = await asyncio.gather(
                self.metrics.ask(StatQuery(resource="namespace",
                                           window_seconds=TABLE_WINDOW_SECONDS)),
                self.metrics.ask(StatQuery(resource="deployment",
                                           window_seconds=TABLE_WINDOW_SECONDS)),
                self.metrics.ask(StatQuery(resource="deployment",
                                           window_seconds=SAMPLE_WINDOW_SECONDS)))
        except (PlaneUnavailable, PlaneRefused) as error:
            if str(error) != self.error:
                log.warning("dashboard: %s", error)
            self.error = str(error)
        else:
            assert isinstance(namespaces, StatAnswer)
            assert isinstance(workloads, StatAnswer)
            assert isinstance(samples, StatAnswer)
            if self.error:
                log.info("dashboard: the metrics service answers again")
            self.error = ""
            self.snapshot = Snapshot(now, namespaces, workloads)
            self.history.add(now, samples.rows)
        self._tick()

    def _tick(self) -> None:
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def next_tick(self, seen: int, timeout: float) -> int:
        """Wait until a tick newer than ``seen`` (or the timeout); the current generation."""
        if self.generation == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.generation

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll until ``stopping`` is set, one tick every interval (a slow poll does not
        make ticks pile up: the next starts one interval after the last started)."""
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            started = loop.time()
            try:
                await self.poll_once()
            except Exception:  # a bug: keep the dashboard up, say it once per tick
                log.exception("dashboard: poll failed")
            delay = max(0.0, self.interval - (loop.time() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
