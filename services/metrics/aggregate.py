"""Keeps the last hour of metrics reports per pod and sums them over rolling windows.

Plain code over plain values: ``Aggregator.add(report, received_at)`` stores a report once
(duplicates by ``(pod, instance, seq)`` are dropped, so a replayed or re-sent report never
counts twice), and ``Aggregator.window(pod, window, now)`` says which stretch of that pod's
reports a query covers. The views (stat, top, edges, routes) live in ``views.py``.

How a window is measured, per pod (as Prometheus's ``rate()`` measures each series):
the window ends at the pod's last reported ``interval_end`` while the pod is fresh (it
reported within ``STALE_AFTER_SECONDS``), else at ``now``; it starts ``window`` seconds
earlier, or at the start of the pod's oldest report inside it if that is later. Counts of
reports that straddle an edge are taken in proportion to the overlap. So a new pod's rate
is right from its first report, a report not yet sent does not dilute the rate, and a
dead pod's rate decays to zero over the window. A proxy restart starts a new
``instance`` whose deltas begin at zero: the restart leaves a gap, never a negative or
doubled count.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from msgspec.structs import replace

from shoal.schemas.metrics import (
    LATENCY_BUCKETS_MS,
    MAX_REPORT_ROWS,
    MetricsReport,
    RequestRow,
    TcpRow,
)

# The longest window `viz -t` accepts (schemas.metrics.Window le=3600).
RETENTION_SECONDS = 3600.0
# Reports older than the retention by this much are refused as too late to matter.
LATE_SLACK_SECONDS = 60.0
# A pod that has not reported for three 5 s report intervals is no longer live.
STALE_AFTER_SECONDS = 15.0
# Bounds on memory whatever the proxies send: pods tracked at once, and reports kept per
# pod (one a second for an hour; proxies report every few seconds).
MAX_PODS = 10_000
MAX_ENTRIES_PER_POD = 3600
N_BUCKETS = len(LATENCY_BUCKETS_MS) + 1  # + the +Inf bucket
# Reports older than this are merged into entries of about a minute each (rows with the
# same labels summed), so an hour-long window reads ~60 entries per pod, not ~720; short
# windows (up to two minutes) still see every report. A window edge inside a merged
# entry takes its share in proportion, as with any report.
COMPACT_AFTER_SECONDS = 120.0
COMPACT_SPAN_SECONDS = 60.0


@dataclass(frozen=True, order=True)
class PodKey:
    namespace: str
    workload: str
    pod: str


@dataclass(frozen=True)
class Entry:
    """One accepted report of one pod: its interval (the proxy's clock) and rows."""

    start: float
    end: float
    requests: tuple[RequestRow, ...]
    tcp: tuple[TcpRow, ...]
    compacted: bool = False


@dataclass
class PodState:
    key: PodKey
    meshed: bool = True
    identity: str = ""
    entries: list[Entry] = field(default_factory=list)  # sorted by end
    ends: list[float] = field(default_factory=list)  # entries' ends, for bisect
    seen: dict[tuple[str, int], float] = field(default_factory=dict)  # -> interval end
    last_received: float = 0.0  # the bus's clock (stream timestamp) or ours
    last_end: float = 0.0  # the proxy's clock
    last_tcp: tuple[TcpRow, ...] = ()  # TCP rows of the newest report (open gauges)


@dataclass(frozen=True)
class Span:
    """The stretch of one pod's reports a query covers."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


AddResult = str  # "added" | "duplicate" | "too_late" | "full"


def percentile(buckets: Sequence[float], q: float) -> float | None:
    """Prometheus's ``histogram_quantile`` over Linkerd's buckets: linear inside the
    bucket holding the rank; a rank in +Inf answers the last finite bound."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    lower = 0.0
    for index, count in enumerate(buckets):
        if index >= len(LATENCY_BUCKETS_MS):
            return float(LATENCY_BUCKETS_MS[-1])
        upper = float(LATENCY_BUCKETS_MS[index])
        if count > 0 and cumulative + count >= rank:
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
        lower = upper
    return float(LATENCY_BUCKETS_MS[-1])


def bucket_bounds(counts: Sequence[int]) -> tuple[float, float] | None:
    """Lowest and highest bucket bounds that hold a request: best and worst when a row
    carries no per-request samples."""
    used = [i for i, count in enumerate(counts) if count > 0]
    if not used:
        return None
    bounds = (0.0, *map(float, LATENCY_BUCKETS_MS))
    low = bounds[min(used)]
    high = bounds[min(max(used) + 1, len(bounds) - 1)]
    return low, high


def normalised_counts(counts: Sequence[int]) -> list[int]:
    """A row's histogram with exactly ``N_BUCKETS`` counts (a short list is padded, the
    excess of a long one is added to +Inf)."""
    out = list(counts[:N_BUCKETS]) + [0] * max(0, N_BUCKETS - len(counts))
    if len(counts) > N_BUCKETS:
        out[-1] += sum(counts[N_BUCKETS:])
    return out


class Aggregator:
    """Reports in, windows out. One per metrics replica; not thread-safe (one event loop)."""

    def __init__(self) -> None:
        self.pods: dict[PodKey, PodState] = {}
        self.accepted = 0
        self.duplicates = 0
        self.too_late = 0
        self.refused_full = 0

    def add(self, report: MetricsReport, received_at: float) -> AddResult:
        key = PodKey(report.namespace, report.workload, report.pod)
        pod = self.pods.get(key)
        if pod is None:
            if len(self.pods) >= MAX_PODS:
                self.refused_full += 1
                return "full"
            pod = self.pods[key] = PodState(key)
        marker = (report.instance, report.seq)
        if marker in pod.seen:
            self.duplicates += 1
            return "duplicate"
        if report.interval_end < received_at - RETENTION_SECONDS - LATE_SLACK_SECONDS:
            self.too_late += 1
            if not pod.entries:
                del self.pods[key]
            return "too_late"
        pod.seen[marker] = report.interval_end
        start = min(report.interval_start, report.interval_end)
        requests = tuple(
            row if len(row.latency_counts) == N_BUCKETS
            else replace(row, latency_counts=normalised_counts(row.latency_counts))
            for row in report.requests[:MAX_REPORT_ROWS])
        entry = Entry(start, report.interval_end, requests,
                      tuple(report.tcp[:MAX_REPORT_ROWS]))
        index = bisect.bisect_right(pod.ends, entry.end)
        pod.entries.insert(index, entry)
        pod.ends.insert(index, entry.end)
        if len(pod.entries) > MAX_ENTRIES_PER_POD:
            del pod.entries[0], pod.ends[0]
        if entry.end >= pod.last_end:  # a late report does not replace the newest state
            pod.last_end = entry.end
            pod.meshed = report.meshed
            pod.identity = report.identity
            pod.last_tcp = entry.tcp
        pod.last_received = max(pod.last_received, received_at)
        self.accepted += 1
        return "added"

    def prune(self, now: float) -> None:
        """Forget reports older than the retention, and pods left with none; merge
        reports older than ``COMPACT_AFTER_SECONDS`` into minute-long entries."""
        horizon = now - RETENTION_SECONDS - LATE_SLACK_SECONDS
        for key in list(self.pods):
            pod = self.pods[key]
            cut = bisect.bisect_left(pod.ends, horizon)
            if cut:
                del pod.entries[:cut], pod.ends[:cut]
                pod.seen = {m: end for m, end in pod.seen.items() if end >= horizon}
            if not pod.entries:
                del self.pods[key]
                continue
            _compact(pod, now - COMPACT_AFTER_SECONDS)

    def fresh(self, pod: PodState, now: float) -> bool:
        return now - pod.last_received <= STALE_AFTER_SECONDS

    def span(self, pod: PodState, window: float, now: float) -> Span | None:
        """The stretch of ``pod``'s reports that a ``window``-second query covers."""
        if not pod.entries:
            return None
        end = pod.last_end if self.fresh(pod, now) else now
        earliest = end - window
        first = bisect.bisect_right(pod.ends, earliest)
        if first >= len(pod.entries):
            return None
        start = max(earliest, pod.entries[first].start)
        if end <= start:
            return None
        return Span(start, end)

    def entries_in(self, pod: PodState, span: Span) -> Iterator[tuple[Entry, float]]:
        """Each report overlapping ``span`` with the fraction of it inside."""
        index = bisect.bisect_right(pod.ends, span.start)
        while index < len(pod.entries):
            entry = pod.entries[index]
            index += 1
            if entry.start >= span.end:
                # entries are sorted by end, not start: a long report may start earlier
                continue
            length = entry.end - entry.start
            if length <= 0:
                yield entry, 1.0
                continue
            inside = min(entry.end, span.end) - max(entry.start, span.start)
            if inside > 0:
                yield entry, min(1.0, inside / length)

    def selected(self, namespace: str, now: float) -> Iterator[PodState]:
        for pod in self.pods.values():
            if not namespace or pod.key.namespace == namespace:
                yield pod


_RowKey = tuple[object, ...]


def _request_key(row: RequestRow) -> _RowKey:
    return (row.direction, row.peer_namespace, row.peer_workload, row.peer_service,
            row.authority, row.route, row.status_class, row.status_code, row.grpc_status,
            row.success, row.tls, row.client_id, row.server_id)


def _merge_requests(rows: list[RequestRow]) -> RequestRow:
    first = rows[0]
    counts = first.latency_counts
    for row in rows[1:]:
        counts = list(map(operator.add, counts, row.latency_counts))
    mins = [r.latency_min_ms for r in rows if r.latency_min_ms is not None]
    maxes = [r.latency_max_ms for r in rows if r.latency_max_ms is not None]
    newest = max(rows, key=lambda r: r.last_at)
    return replace(first, requests=sum(r.requests for r in rows), latency_counts=counts,
                   latency_sum_ms=sum(r.latency_sum_ms for r in rows),
                   latency_min_ms=min(mins) if mins else None,
                   latency_max_ms=max(maxes) if maxes else None,
                   latency_last_ms=newest.latency_last_ms, last_at=newest.last_at)


def _merge_tcp(rows: list[TcpRow]) -> TcpRow:
    return replace(rows[-1], opens=sum(r.opens for r in rows),
                   closes=sum(r.closes for r in rows),
                   read_bytes=sum(r.read_bytes for r in rows),
                   write_bytes=sum(r.write_bytes for r in rows))  # the newest gauge


def _merge(entries: list[Entry]) -> Entry:
    requests: dict[_RowKey, list[RequestRow]] = {}
    tcp: dict[_RowKey, list[TcpRow]] = {}
    for entry in entries:  # in time order, so the last TCP row holds the newest gauge
        for row in entry.requests:
            requests.setdefault(_request_key(row), []).append(row)
        for tcp_row in entry.tcp:
            key = (tcp_row.direction, tcp_row.peer_namespace, tcp_row.peer_workload,
                   tcp_row.tls)
            tcp.setdefault(key, []).append(tcp_row)
    return Entry(min(e.start for e in entries), max(e.end for e in entries),
                 tuple(_merge_requests(rows) for rows in requests.values()),
                 tuple(_merge_tcp(rows) for rows in tcp.values()), compacted=True)


def _compact(pod: PodState, before: float) -> None:
    """Merge runs of not-yet-compacted entries that end before ``before`` into entries of
    about ``COMPACT_SPAN_SECONDS``; a run shorter than that waits for more."""
    out: list[Entry] = []
    run: list[Entry] = []
    changed = False
    for entry in pod.entries:
        if entry.compacted or entry.end >= before:
            if len(run) > 1 and run[-1].end - run[0].start >= COMPACT_SPAN_SECONDS:
                out.append(_merge(run))
                changed = True
            else:
                out.extend(run)
            run = []
            out.append(entry)
            continue
        run.append(entry)
        if run[-1].end - run[0].start >= COMPACT_SPAN_SECONDS:
            out.append(_merge(run) if len(run) > 1 else run[0])
            changed = changed or len(run) > 1
            run = []
    out.extend(run)
    if changed:
        out.sort(key=lambda e: e.end)
        pod.entries = out
        pod.ends = [e.end for e in out]


@dataclass
class RequestTotals:
    """Requests summed over pods and reports: counts, a rate, a histogram, samples."""

    requests: float = 0.0
    successes: float = 0.0
    rate: float = 0.0
    buckets: list[float] = field(default_factory=lambda: [0.0] * N_BUCKETS)
    best_ms: float = math.inf
    worst_ms: float = 0.0
    last_ms: float = 0.0
    last_at: float = -math.inf
    samples: bool = False  # best / worst / last: only `top` needs them

    def add(self, row: RequestRow, fraction: float, span: Span, entry_end: float) -> None:
        count = row.requests * fraction
        self.requests += count
        if row.success:
            self.successes += count
        self.rate += count / span.seconds
        counts = row.latency_counts
        if len(counts) != N_BUCKETS:
            counts = normalised_counts(counts)
        if fraction == 1.0:
            self.buckets = list(map(operator.add, self.buckets, counts))
        else:
            self.buckets = [b + c * fraction for b, c in zip(self.buckets, counts, strict=True)]
        if self.samples and row.requests:
            self._samples(row, entry_end)

    def _samples(self, row: RequestRow, entry_end: float) -> None:
        best, worst, last = row.latency_min_ms, row.latency_max_ms, row.latency_last_ms
        if best is None or worst is None:
            bounds = bucket_bounds(row.latency_counts)
            if bounds is None and row.requests:
                mean = row.latency_sum_ms / row.requests
                bounds = (mean, mean)
            if bounds is None:
                return
            best, worst = bounds
        self.best_ms = min(self.best_ms, best)
        self.worst_ms = max(self.worst_ms, worst)
        at = row.last_at or entry_end
        if at >= self.last_at:
            self.last_at = at
            self.last_ms = worst if last is None else last

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.requests if self.requests > 0 else None

    def latency(self, q: float) -> float | None:
        return percentile(self.buckets, q)


@dataclass
class TcpTotals:
    read_rate: float = 0.0
    write_rate: float = 0.0
    open_connections: int = 0

    def add(self, row: TcpRow, fraction: float, span: Span) -> None:
        self.read_rate += row.read_bytes * fraction / span.seconds
        self.write_rate += row.write_bytes * fraction / span.seconds
