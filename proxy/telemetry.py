"""The proxy's telemetry over the bus: the tap registry following ``shoal_tap``, the
queue that publishes tap events, and the metrics report every ``report_interval``
seconds on ``shoal.v1.metrics.<ns>.<workload>.<pod>``.

Lifecycle and concurrency:
- ``start()`` begins the report loop at once: a report goes out every interval whether
  or not the bus is up (ReportPublisher keeps a minute of unsent reports and sends them
  in order when the bus returns).
- On every bus (re)connect (``BusLink.on_connect``) the bucket watch is restarted, since
  watches do not survive a server restart; the restarted watch delivers the current
  sessions, and sessions deleted meanwhile are dropped (``TapRegistry.watch``). Sessions
  known before keep working while the bus is away, until their own expiry.
- ``stop()``, once the proxy has drained its connections: the report loop sends one last
  report (the deltas of the drained requests), the tap tasks end, and buffered publishes
  are flushed, each step bounded, before the bus link closes.
Everything runs on the proxy's event loop; the hot path only reads ``registry.active``
and appends to the tap queue (never blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client

from .buslink import BusLink, BusUnavailable
from .metrics import ProxyMetrics
from .observe import TAP_OFF, TapSwitch
from .report import ReportBuilder, ReportIdentity, ReportPublisher
from .tap import LocalProxy, TapPublisher, TapRegistry

log = logging.getLogger("shoal.proxy.telemetry")

# The last report on drain: one send (report.SEND_TIMEOUT_SECONDS is 2 s) and a flush.
FINAL_REPORT_TIMEOUT_SECONDS = 3.0
# Bound on a watch or publisher task ending after it was told to.
TASK_STOP_TIMEOUT_SECONDS = 1.0
# Bound on pushing buffered publishes (the last report, tap events) out at stop.
FLUSH_TIMEOUT_SECONDS = 1.0


class Telemetry:
    """See the module docstring."""

    def __init__(self, link: BusLink, metrics: ProxyMetrics, who: ReportIdentity, *,
                 tap: bool = True, report_interval: float) -> None:
        self.link = link
        self.local = LocalProxy(who.namespace, who.workload, who.pod)
        self.publisher = TapPublisher()
        self.registry = TapRegistry(self.local, self.publisher.emit) if tap else None
        self.reports = ReportPublisher(ReportBuilder(who), metrics.snapshot_deltas,
                                       self._send, interval=report_interval)
        self._reports_stop = asyncio.Event()
        self._tap_stop = asyncio.Event()
        self._report_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        self.watch_starts = 0  # for tests: one per (re)connect
        link.on_connect(self._on_connect)

    @property
    def tap(self) -> TapSwitch:
        return self.registry if self.registry is not None else TAP_OFF

    def start(self) -> None:
        if self._report_task is None:
            self._report_task = asyncio.create_task(self.reports.run(self._reports_stop),
                                                    name="metrics-reports")

    async def _send(self, subject: str, payload: bytes) -> None:
        if not await self.link.publish(subject, payload):
            raise BusUnavailable("bus not connected")  # the report stays in the backlog

    async def _on_connect(self, nc: Client) -> None:
        if self.registry is None or self._tap_stop.is_set():
            return
        old = self._watch_task
        if old is not None:
            old.cancel()
            await asyncio.wait([old], timeout=TASK_STOP_TIMEOUT_SECONDS)
        self.watch_starts += 1
        self._watch_task = asyncio.create_task(self.registry.watch(nc, self._tap_stop),
                                               name="tap-watch")
        if self._publish_task is None:  # nats-py keeps one Client across reconnects
            self._publish_task = asyncio.create_task(self.publisher.run(nc, self._tap_stop),
                                                     name="tap-publish")

    async def stop(self) -> None:
        """The last report, then the tap tasks; see the module docstring."""
        self._reports_stop.set()
        if self._report_task is not None:
            done, _ = await asyncio.wait([self._report_task],
                                         timeout=FINAL_REPORT_TIMEOUT_SECONDS)
            if not done:
                log.warning("the last metrics report was not sent within %gs",
                            FINAL_REPORT_TIMEOUT_SECONDS)
                self._report_task.cancel()
        self._tap_stop.set()
        tasks = [t for t in (self._watch_task, self._publish_task) if t is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=TASK_STOP_TIMEOUT_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=TASK_STOP_TIMEOUT_SECONDS)
        with contextlib.suppress(Exception):
            await self.link.flush(FLUSH_TIMEOUT_SECONDS)
