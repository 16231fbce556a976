"""The mesh-wide aggregate as Prometheus text, for a real Prometheus to scrape.

Counters are sums of every accepted report's deltas since this replica started (so they
only grow: a proxy restart starts a new instance whose deltas add on, never a reset), with
Linkerd's metric names and labels so existing dashboards and queries work:
``request_total``, ``response_total`` (``classification``, ``status_code``,
``grpc_status_code``), ``response_latency_ms`` (Linkerd's buckets; the name breaks
Prometheus's base-unit rule on purpose, to match Linkerd), ``tcp_open_total``,
``tcp_close_total``, ``tcp_open_connections``, ``tcp_read_bytes_total``,
``tcp_write_bytes_total``. Each series carries the reporting pod's ``namespace``,
``deployment``, ``pod`` and ``direction``; the peer is ``dst_*`` on outbound series and
``src_*`` on inbound ones. Routes are not labels here (they are in ``viz routes``), to keep
the series count bounded. Series idle for 10 minutes are dropped, as Linkerd's proxy does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from shoal.schemas.metrics import LATENCY_BUCKETS_MS, MetricsReport, RequestRow, TcpRow

from .aggregate import N_BUCKETS, normalised_counts

IDLE_SERIES_SECONDS = 600.0  # Linkerd expires idle series after 10 minutes
MAX_SERIES = 50_000  # beyond this, new series are not created (counted in `refused`)

Labels = tuple[tuple[str, str], ...]


@dataclass
class _RequestSeries:
    requests: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)
    latency_sum: float = 0.0
    touched: float = 0.0


@dataclass
class _Counter:
    value: float = 0.0
    touched: float = 0.0


@dataclass
class _TcpSeries:
    opens: int = 0
    closes: int = 0
    open_connections: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    touched: float = 0.0


def _base(report: MetricsReport, row: RequestRow | TcpRow) -> list[tuple[str, str]]:
    side = "dst" if row.direction == "outbound" else "src"
    labels = [("namespace", report.namespace), ("deployment", report.workload),
              ("pod", report.pod), ("direction", row.direction)]
    peer_ns = row.peer_namespace or (report.namespace if row.peer_workload else "")
    if peer_ns:
        labels.append((f"{side}_namespace", peer_ns))
    if row.peer_workload:
        labels.append((f"{side}_deployment", row.peer_workload))
    if isinstance(row, RequestRow):
        if row.peer_service:
            labels.append((f"{side}_service", row.peer_service))
        if row.authority:
            labels.append(("authority", row.authority))
    if row.tls:
        labels.append(("tls", "true"))
        if isinstance(row, RequestRow):
            outbound = row.direction == "outbound"
            peer_id = row.server_id if outbound else row.client_id
            if peer_id:
                labels.append(("server_id" if outbound else "client_id", peer_id))
    else:
        labels.append(("tls", "no_identity"))
        labels.append(("no_tls_reason", "not_provided_by_remote"))
    return labels


class PromTotals:
    """Cumulative series fed with every accepted report; rendered at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[Labels, _RequestSeries] = {}
        self.responses: dict[Labels, _Counter] = {}
        self.tcp: dict[Labels, _TcpSeries] = {}
        self.refused = 0

    def _room(self) -> bool:
        if len(self.requests) + len(self.responses) + len(self.tcp) < MAX_SERIES:
            return True
        self.refused += 1
        return False

    def add(self, report: MetricsReport, now: float) -> None:
        for row in report.requests:
            base = _base(report, row)
            key = tuple(base)
            series = self.requests.get(key)
            if series is None:
                if not self._room():
                    continue
                series = self.requests[key] = _RequestSeries()
            series.requests += row.requests
            series.latency_sum += row.latency_sum_ms
            for index, count in enumerate(normalised_counts(row.latency_counts)):
                series.buckets[index] += count
            series.touched = now
            grpc = "" if row.grpc_status is None else str(row.grpc_status)
            status_key = (*base, ("classification", "success" if row.success else "failure"),
                          ("status_code", str(row.status_code) if row.status_code else ""),
                          ("grpc_status_code", grpc))
            counter = self.responses.get(status_key)
            if counter is None:
                if not self._room():
                    continue
                counter = self.responses[status_key] = _Counter()
            counter.value += row.requests
            counter.touched = now
        for tcp_row in report.tcp:
            key = tuple(_base(report, tcp_row))
            tcp = self.tcp.get(key)
            if tcp is None:
                if not self._room():
                    continue
                tcp = self.tcp[key] = _TcpSeries()
            tcp.opens += tcp_row.opens
            tcp.closes += tcp_row.closes
            tcp.read_bytes += tcp_row.read_bytes
            tcp.write_bytes += tcp_row.write_bytes
            tcp.open_connections = tcp_row.open_connections
            tcp.touched = now

    def expire(self, now: float) -> None:
        for table in (self.requests, self.responses, self.tcp):
            for key in [k for k, v in table.items() if now - v.touched > IDLE_SERIES_SECONDS]:
                del table[key]


class _Collector(Collector):
    def __init__(self, totals: PromTotals) -> None:
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._tcp()

    def _requests(self) -> Iterator[Metric]:
        t = self.totals
        request_total = CounterMetricFamily("request_total", "requests reported by proxies",
                                            labels=_all_labels(t.requests))
        latency = HistogramMetricFamily("response_latency_ms", "response latency (ms)",
                                        labels=_all_labels(t.requests))
        for key, series in t.requests.items():
            values = _values(key, _all_labels(t.requests))
            request_total.add_metric(values, series.requests)
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS_MS, "+Inf"), series.buckets,
                                    strict=True):
                cumulative += count
                buckets.append((str(bound), cumulative))
            latency.add_metric(values, buckets, series.latency_sum)
        response_total = CounterMetricFamily("response_total", "responses by classification",
                                             labels=_all_labels(t.responses))
        for key, counter in t.responses.items():
            response_total.add_metric(_values(key, _all_labels(t.responses)), counter.value)
        yield from (request_total, response_total, latency)

    def _tcp(self) -> Iterator[Metric]:
        t = self.totals
        labels = _all_labels(t.tcp)
        families = {
            "opens": CounterMetricFamily("tcp_open_total", "connections opened", labels=labels),
            "closes": CounterMetricFamily("tcp_close_total", "connections closed",
                                          labels=labels),
            "read_bytes": CounterMetricFamily("tcp_read_bytes_total", "bytes read",
                                              labels=labels),
            "write_bytes": CounterMetricFamily("tcp_write_bytes_total", "bytes written",
                                               labels=labels),
        }
        gauge = GaugeMetricFamily("tcp_open_connections", "connections open", labels=labels)
        for key, series in t.tcp.items():
            values = _values(key, labels)
            for attribute, family in families.items():
                family.add_metric(values, getattr(series, attribute))
            gauge.add_metric(values, series.open_connections)
        yield from (*families.values(), gauge)


def _all_labels(table: Mapping[Labels, object]) -> list[str]:
    """The union of label names of a table's series (missing ones render empty, which
    Prometheus treats as absent)."""
    seen: dict[str, None] = {}
    for key in table:
        for name, _ in key:
            seen.setdefault(name)
    return list(seen)


def _values(key: Labels, names: list[str]) -> list[str]:
    given = dict(key)
    return [given.get(name, "") for name in names]


def render(totals: PromTotals) -> bytes:
    """The exposition text of ``totals`` (text format 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(totals))
    return bytes(generate_latest(registry))
