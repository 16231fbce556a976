"""Wires the aggregator to the bus: reports in from the ``SHOAL_METRICS`` stream, queries
answered on ``shoal.v1.metrics.query`` (queue group ``shoal-metrics``), and the aggregate
as Prometheus text on ``--prom-port``.

Every replica reads every report (it is not a queue-group subscriber): each holds the
whole picture, so any replica can answer any query. A replica that starts late replays
the stream (the last hour, as long as the longest window) before it joins the queue
group, so it never answers from half the data; after that, the same ordered consumer
delivers live reports. Duplicates (a report stored twice, or a proxy re-sending after a
reconnect) are dropped by ``(pod, instance, seq)``. Without the stream (a bus whose
operator did not create it) the service falls back to a plain subscription and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError
from shoal.schemas.metrics import MetricsAnswer, MetricsQuery, MetricsReport

from ..runtime import BadRequest, ServiceContext, ServiceRuntime
from . import views
from .aggregate import Aggregator
from .prom import PromTotals, render

log = logging.getLogger("shoal.metrics")

# Replay of the stream at start-up: a full hour of reports from a large mesh is a few
# hundred MB; on loopback JetStream delivers ~50 MB/s to Python, so allow a minute.
CATCH_UP_TIMEOUT_SECONDS = 60.0
# Client-side buffer of the consumer: beyond this nats-py reports a slow consumer and
# the ordered consumer restarts from the last sequence it handled (nothing lost).
PENDING_MESSAGES_LIMIT = 65_536
PENDING_BYTES_LIMIT = 128 * 1024 * 1024
PRUNE_INTERVAL_SECONDS = 10.0
PROM_READ_TIMEOUT_SECONDS = 2.0
PROM_HEAD_LIMIT = 8 * 1024  # a scrape request's head is a few hundred bytes


class MetricsService:
    def __init__(self, replica: str = "metrics", prom_port: int | None = None,
                 prom_host: str = "127.0.0.1") -> None:
        self.replica = replica
        self.prom_port = prom_port
        self.prom_host = prom_host
        self.aggregator = Aggregator()
        self.totals = PromTotals()
        self._reports: Decoder[MetricsReport] = Decoder(MetricsReport,
                                                        names.METRICS_REPORTS_ALL)
        self._subscription: Subscription | None = None
        self._prom_server: asyncio.Server | None = None
        self._handled_seq = 0
        self._caught_up = asyncio.Event()
        self._catch_up_target = 0
        self.replayed = 0

    def install(self, runtime: ServiceRuntime) -> None:
        runtime.on_setup(self._setup)
        runtime.add_request_handler("query", names.METRICS_QUERY, MetricsQuery,
                                    self.query, names.QUEUE_METRICS)
        runtime.add_task(self._maintain)

    # ----- reports

    def take(self, data: bytes, subject: str, received_at: float) -> str:
        """Decode and store one report (the plain core of both subscription paths)."""
        report = self._reports.decode(data, subject)
        result = self.aggregator.add(report, received_at)
        if result == "added":
            self.totals.add(report, received_at)
        return result

    async def _on_stream_message(self, msg: Msg) -> None:
        try:
            meta = msg.metadata
            received_at = meta.timestamp.timestamp()
            seq = meta.sequence.stream
        except Exception:  # not a JetStream message: the fallback subscription
            received_at, seq = time.time(), 0
        try:
            self.take(msg.data, msg.subject, min(received_at, time.time()))
        except WireDecodeError as error:
            log.warning("%s: dropped report: %s", self.replica, error)
        if seq:
            self._handled_seq = max(self._handled_seq, seq)
            if not self._caught_up.is_set():
                self.replayed += 1
                if self._handled_seq >= self._catch_up_target:
                    self._caught_up.set()

    async def _setup(self, ctx: ServiceContext) -> None:
        try:
            info = await ctx.js.stream_info(names.STREAM_METRICS)
        except NotFoundError:
            log.warning("%s: stream %s missing: live reports only, no catch-up (create it "
                        "with shoal.kernel.bus.ensure_streams)", self.replica,
                        names.STREAM_METRICS)
            self._subscription = await ctx.nc.subscribe(
                names.METRICS_REPORTS_ALL, cb=self._on_stream_message,
                pending_msgs_limit=PENDING_MESSAGES_LIMIT,
                pending_bytes_limit=PENDING_BYTES_LIMIT)
            self._caught_up.set()
        else:
            self._catch_up_target = info.state.last_seq
            if self._catch_up_target == 0 or info.state.messages == 0:
                self._caught_up.set()
            self._subscription = await ctx.js.subscribe(
                names.METRICS_REPORTS_ALL, stream=names.STREAM_METRICS,
                cb=self._on_stream_message, ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                pending_msgs_limit=PENDING_MESSAGES_LIMIT,
                pending_bytes_limit=PENDING_BYTES_LIMIT)
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._caught_up.wait(), CATCH_UP_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning("%s: replay reached %d of %d within %ss; serving anyway",
                            self.replica, self._handled_seq, self._catch_up_target,
                            CATCH_UP_TIMEOUT_SECONDS)
            log.info("%s: replayed %d reports in %.2fs (stream seq %d)", self.replica,
                     self.replayed, time.monotonic() - started, self._handled_seq)
            self.aggregator.prune(time.time())  # compact the replayed hour at once
        if self.prom_port is not None:
            self._prom_server = await asyncio.start_server(
                self._serve_prom, self.prom_host, self.prom_port, limit=PROM_HEAD_LIMIT)
            log.info("%s: Prometheus text on http://%s:%d/metrics", self.replica,
                     self.prom_host, self.prom_port)

    async def _maintain(self, ctx: ServiceContext) -> None:
        try:
            while not ctx.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.stopping.wait(), PRUNE_INTERVAL_SECONDS)
                now = time.time()
                self.aggregator.prune(now)
                self.totals.expire(now)
        finally:
            if self._subscription is not None:
                with contextlib.suppress(Exception):
                    await self._subscription.unsubscribe()
            if self._prom_server is not None:
                self._prom_server.close()

    # ----- queries

    async def query(self, query: MetricsQuery) -> MetricsAnswer:
        return self.answer(query, time.time())

    def answer(self, query: MetricsQuery, now: float) -> MetricsAnswer:
        try:
            return views.answer(self.aggregator, query, now)
        except views.BadResource as error:
            raise BadRequest(str(error)) from None

    # ----- Prometheus

    async def _serve_prom(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                          PROM_READ_TIMEOUT_SECONDS)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            path = parts[1] if len(parts) >= 3 else b""
            if path.split(b"?", 1)[0] == b"/metrics":
                status, ctype = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
                body = render(self.totals)
            else:
                status, ctype, body = b"404 Not Found", b"text/plain", b"not found\n"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype +
                         b"\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
