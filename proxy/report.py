"""Metrics reports: counter deltas turned into a bounded ``MetricsReport``, and the loop
that publishes one every few seconds on ``shoal.v1.metrics.<ns>.<workload>.<pod>``.

A report holds at most ``MAX_REPORT_ROWS`` rows, whatever the traffic: the busiest rows
are kept and the rest are folded into rows with empty peer and route (requests: one per
direction, status class and outcome, so totals and success rates stay exact; TCP: one
per direction), with ``dropped_rows`` saying how many were folded. What a folded row
loses is its peer, route, authority, status code, gRPC status and identities.

Every report carries the proxy's ``instance`` (random per start) and a ``seq`` that
grows by one per report, so the metrics service drops duplicates and a restart never
produces negative or doubled rates. Reports the bus did not take are kept (up to a
minute of them) and sent again, in order, when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from msgspec.structs import replace

from shoal.schemas import names
from shoal.schemas.codec import encode
from shoal.schemas.metrics import (
    LATENCY_BUCKETS_MS,
    MAX_REPORT_ROWS,
    MetricsReport,
    RequestRow,
    TcpRow,
)

log = logging.getLogger("shoal.proxy.report")

REPORT_INTERVAL_SECONDS = 5.0  # "every few seconds"; the metrics service's staleness is 3x
UNSENT_BACKLOG_LIMIT = 12  # a minute of reports kept while the bus is away
SEND_TIMEOUT_SECONDS = 2.0
MAX_LABEL_CHARS = 256  # routes and authorities longer than this are cut
N_BUCKETS = len(LATENCY_BUCKETS_MS) + 1
# Fold rows: 2 directions x 6 status classes x 2 outcomes, + 2 TCP directions.
FOLD_RESERVE = 2 * 6 * 2 + 2

Snapshot = Callable[[], tuple[Sequence[RequestRow], Sequence[TcpRow]]]
Send = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class ReportIdentity:
    namespace: str
    workload: str
    pod: str
    meshed: bool = True
    identity: str = ""


def _request_weight(row: RequestRow) -> int:
    return row.requests


def _tcp_weight(row: TcpRow) -> int:
    return row.opens + row.closes + row.open_connections + row.read_bytes + row.write_bytes


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS]


def _clean(row: RequestRow) -> RequestRow:
    counts = list(row.latency_counts[:N_BUCKETS])
    counts += [0] * (N_BUCKETS - len(counts))
    too_long = len(row.route) > MAX_LABEL_CHARS or len(row.authority) > MAX_LABEL_CHARS
    if too_long or len(row.latency_counts) != N_BUCKETS:
        return replace(row, route=_cut(row.route), authority=_cut(row.authority),
                       latency_counts=counts)
    return row


def _fold_requests(rows: Sequence[RequestRow]) -> list[RequestRow]:
    groups: dict[tuple[str, str, bool], list[RequestRow]] = {}
    for row in rows:
        groups.setdefault((row.direction, row.status_class, row.success), []).append(row)
    out = []
    for (direction, status_class, success), members in groups.items():
        counts = [0] * N_BUCKETS
        for row in members:
            for index, n in enumerate(row.latency_counts[:N_BUCKETS]):
                counts[index] += n
        mins = [r.latency_min_ms for r in members if r.latency_min_ms is not None]
        maxes = [r.latency_max_ms for r in members if r.latency_max_ms is not None]
        newest = max(members, key=lambda r: r.last_at)
        out.append(RequestRow(
            direction=direction,  # type: ignore[arg-type]
            status_class=status_class,  # type: ignore[arg-type]
            success=success, requests=sum(r.requests for r in members),
            latency_counts=counts, latency_sum_ms=sum(r.latency_sum_ms for r in members),
            latency_min_ms=min(mins) if mins else None,
            latency_max_ms=max(maxes) if maxes else None,
            latency_last_ms=newest.latency_last_ms, last_at=newest.last_at))
    return out


def _fold_tcp(rows: Sequence[TcpRow]) -> list[TcpRow]:
    groups: dict[str, list[TcpRow]] = {}
    for row in rows:
        groups.setdefault(row.direction, []).append(row)
    return [TcpRow(direction=direction,  # type: ignore[arg-type]
                   opens=sum(r.opens for r in members), closes=sum(r.closes for r in members),
                   open_connections=sum(r.open_connections for r in members),
                   read_bytes=sum(r.read_bytes for r in members),
                   write_bytes=sum(r.write_bytes for r in members))
            for direction, members in groups.items()]


def cap_rows(requests: Sequence[RequestRow], tcp: Sequence[TcpRow],
             limit: int = MAX_REPORT_ROWS) -> tuple[list[RequestRow], list[TcpRow], int]:
    """Idle rows dropped, then at most ``limit`` rows: (requests, tcp, rows folded)."""
    req = [_clean(r) for r in requests if r.requests > 0]
    con = [r for r in tcp if _tcp_weight(r) > 0]
    if len(req) + len(con) <= limit:
        return req, con, 0
    keep = max(0, limit - FOLD_RESERVE)
    keep_req = min(len(req), math.ceil(keep * len(req) / (len(req) + len(con))))
    keep_tcp = min(len(con), keep - keep_req)
    keep_req = min(len(req), keep - keep_tcp)
    req.sort(key=_request_weight, reverse=True)
    con.sort(key=_tcp_weight, reverse=True)
    folded_req, folded_tcp = req[keep_req:], con[keep_tcp:]
    dropped = len(folded_req) + len(folded_tcp)
    return (req[:keep_req] + _fold_requests(folded_req),
            con[:keep_tcp] + _fold_tcp(folded_tcp), dropped)


class ReportBuilder:
    """Numbers the reports of one proxy instance."""

    def __init__(self, who: ReportIdentity, *, instance: str | None = None,
                 started: float | None = None) -> None:
        self.who = who
        self.instance = instance or secrets.token_hex(8)
        self.seq = 0
        self.last_end = time.time() if started is None else started
        self.subject = names.metrics_subject(who.namespace, who.workload, who.pod)

    def build(self, requests: Sequence[RequestRow], tcp: Sequence[TcpRow],
              now: float | None = None) -> MetricsReport:
        end = time.time() if now is None else now
        kept_req, kept_tcp, dropped = cap_rows(requests, tcp)
        report = MetricsReport(
            namespace=self.who.namespace, workload=self.who.workload, pod=self.who.pod,
            instance=self.instance, seq=self.seq, interval_start=self.last_end,
            interval_end=max(end, self.last_end), meshed=self.who.meshed,
            identity=self.who.identity, requests=kept_req, tcp=kept_tcp,
            dropped_rows=dropped)
        self.seq += 1
        self.last_end = report.interval_end
        return report


class ReportPublisher:
    """Takes a snapshot of deltas every interval and sends it; keeps unsent reports."""

    def __init__(self, builder: ReportBuilder, snapshot: Snapshot, send: Send,
                 interval: float = REPORT_INTERVAL_SECONDS) -> None:
        self.builder = builder
        self.snapshot = snapshot
        self.send = send
        self.interval = interval
        self.backlog: deque[bytes] = deque(maxlen=UNSENT_BACKLOG_LIMIT)
        self.sent = 0
        self.lost = 0

    async def tick(self, now: float | None = None) -> None:
        """One report: build it from the snapshot, then send everything pending."""
        requests, tcp = self.snapshot()
        if len(self.backlog) == self.backlog.maxlen:
            self.lost += 1  # the oldest unsent report falls out
        self.backlog.append(encode(self.builder.build(requests, tcp, now)))
        while self.backlog:
            try:
                await asyncio.wait_for(self.send(self.builder.subject, self.backlog[0]),
                                       SEND_TIMEOUT_SECONDS)
            except Exception as error:
                log.debug("metrics report not sent (%s); %d pending", error, len(self.backlog))
                return
            self.backlog.popleft()
            self.sent += 1

    async def run(self, stopping: asyncio.Event) -> None:
        """Report every interval until ``stopping``, then once more (the last deltas)."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.interval)
            await self.tick()
