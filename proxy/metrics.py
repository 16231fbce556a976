"""The proxy's metrics: counted on the hot path as plain integers, exposed with Linkerd's
names and labels at scrape time, and snapshotted as deltas for metrics reports.

Hot path: the proxy looks up one ``RequestMetrics`` / ``TcpMetrics`` per label set
(once per connection or route, then keeps it) and each request costs a dict lookup, a
bisect over the latency bounds and a few integer additions: no prometheus-client
``inc()`` (a lock and a dict lookup per call, DESIGN.md "Performance notes").

Exposition (``collector()``, ``registry()``), as Linkerd's proxy does:
- ``request_total``; ``response_total`` with ``classification`` (success|failure),
  ``status_code`` (absent when there was no HTTP response) and ``grpc_status_code``
  (only for gRPC); ``response_latency_ms`` histogram by ``status_code`` with Linkerd's
  bucket bounds (``shoal.schemas.metrics.LATENCY_BUCKETS_MS``). The name keeps Linkerd's
  milliseconds, against Prometheus's base-unit rule, so existing dashboards work.
- ``tcp_open_total``, ``tcp_close_total`` (``classification``), ``tcp_open_connections``,
  ``tcp_read_bytes_total``, ``tcp_write_bytes_total``.
- ``identity_cert_expiration_timestamp_seconds`` (gauge) and ``identity_cert_refresh_count``
  (untyped: Linkerd's name has no ``_total``, which prometheus-client would append to a
  counter family), from the proxy's identity (``IdentityCollector``).
Each series carries ``direction`` plus the labels the caller gave (``authority``,
``dst_namespace``, ``dst_service``, ``dst_workload``, ``tls``, ``client_id``,
``server_id``, ``no_tls_reason``, ``route``, ``peer`` ...).

Cardinality: at most ``MAX_SERIES`` label sets per kind (request, TCP). Beyond that a
new label set is folded into one overflow series per direction and set of label names,
whose label values (all but ``direction``) are ``"other"``; the fold is counted in
``metrics_overflow_total{kind}``. Response keys within a series are bounded too: a
status code outside 100..599 counts as "no response" and an unknown gRPC status as 2
(UNKNOWN, as the gRPC spec says a client must read it). Series do not expire (Linkerd
drops idle ones after 10 minutes); the bound is what keeps memory in check.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, cast

from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.registry import Collector

from shoal.schemas.metrics import LATENCY_BUCKETS_MS, RequestRow, StatusClass, TcpRow

Direction = Literal["inbound", "outbound"]
DIRECTIONS: tuple[Direction, ...] = ("inbound", "outbound")

# Label sets per kind. Linkerd's proxy keeps one series per (authority, peer workload,
# tls, route) seen; 2,000 covers a workload that talks to a few hundred services with a
# handful of routes each, while bounding memory (~1 KiB per request series with its
# histogram) at a few MB when Host headers are junk.
MAX_SERIES = 2000
OVERFLOW_VALUE = "other"

# Well-known label names (Linkerd's).
AUTHORITY = "authority"
DST_NAMESPACE = "dst_namespace"
DST_SERVICE = "dst_service"
DST_WORKLOAD = "dst_workload"
SRC_NAMESPACE = "src_namespace"
SRC_WORKLOAD = "src_workload"
TLS = "tls"
CLIENT_ID = "client_id"
SERVER_ID = "server_id"
ROUTE = "route"

_BOUNDS: tuple[int, ...] = LATENCY_BUCKETS_MS
_BUCKETS = len(_BOUNDS) + 1  # the last one is +Inf
_LE = [str(bound) for bound in _BOUNDS] + ["+Inf"]
_GRPC_MAX = 16  # UNAUTHENTICATED, the highest code gRPC defines
_GRPC_UNKNOWN = 2

LabelKey = tuple[tuple[str, str], ...]


class _Responses:
    """Counts and a latency histogram for one (status, grpc status, success) key, and
    the best / worst / last latency since the previous snapshot (for ``viz top``)."""

    __slots__ = ("buckets", "count", "last_mono", "last_ms", "max_ms", "min_ms", "reported",
                 "reported_buckets", "reported_sum", "sum_ms")

    def __init__(self) -> None:
        self.count = 0
        self.sum_ms = 0.0
        self.buckets = [0] * _BUCKETS  # not cumulative; the collector sums them
        self.reported = 0
        self.reported_sum = 0.0
        self.reported_buckets = [0] * _BUCKETS
        self.min_ms = math.inf  # since the previous snapshot
        self.max_ms = 0.0
        self.last_ms = 0.0
        self.last_mono = 0.0  # monotonic seconds of the last response; 0: not given


ResponseKey = tuple[int, int | None, bool]  # status_code (0: none), grpc status, success


class RequestMetrics:
    """HTTP request and response counters for one label set."""

    __slots__ = ("_unobserved", "direction", "labels", "reported_requests", "requests",
                 "responses")

    def __init__(self, direction: Direction, labels: Mapping[str, str]) -> None:
        self.direction = direction
        self.labels = dict(labels)
        self.requests = 0
        self.reported_requests = 0
        self.responses: dict[ResponseKey, _Responses] = {}
        self._unobserved = 0  # request() calls not yet matched by observe()

    def request(self) -> None:
        """Count a request at its start (Linkerd counts request_total when it is sent)."""
        self.requests += 1
        self._unobserved += 1

    def observe(self, status_code: int, grpc_status: int | None, latency_ms: float,
                success: bool, now: float = 0.0) -> None:
        """Count a finished response; also counts the request unless ``request()`` did.

        ``status_code`` 0 means no HTTP response (a connect error, a reset). ``now``
        (monotonic seconds) dates the last latency for reports; without it the report's
        time stands in.
        """
        if self._unobserved > 0:
            self._unobserved -= 1
        else:
            self.requests += 1
        key = (status_code, grpc_status, success)
        responses = self.responses.get(key)
        if responses is None:
            responses = self._new_key(status_code, grpc_status, success)
        responses.count += 1
        responses.sum_ms += latency_ms
        responses.buckets[bisect_left(_BOUNDS, latency_ms)] += 1
        if latency_ms < responses.min_ms:
            responses.min_ms = latency_ms
        if latency_ms > responses.max_ms:
            responses.max_ms = latency_ms
        responses.last_ms = latency_ms
        responses.last_mono = now

    def _new_key(self, status_code: int, grpc_status: int | None,
                 success: bool) -> _Responses:
        if not 100 <= status_code <= 599:
            status_code = 0
        if grpc_status is not None and not 0 <= grpc_status <= _GRPC_MAX:
            grpc_status = _GRPC_UNKNOWN
        key = (status_code, grpc_status, success)
        responses = self.responses.get(key)
        if responses is None:
            responses = self.responses[key] = _Responses()
        return responses


class TcpMetrics:
    """TCP connection counters for one label set."""

    __slots__ = ("closes_error", "closes_ok", "direction", "labels", "opens", "read_bytes",
                 "reported", "write_bytes")

    def __init__(self, direction: Direction, labels: Mapping[str, str]) -> None:
        self.direction = direction
        self.labels = dict(labels)
        self.opens = 0
        self.closes_ok = 0
        self.closes_error = 0
        self.read_bytes = 0
        self.write_bytes = 0
        self.reported = (0, 0, 0, 0)  # opens, closes, read, write at the last snapshot

    def opened(self) -> None:
        self.opens += 1

    def closed(self, error: bool) -> None:
        if error:
            self.closes_error += 1
        else:
            self.closes_ok += 1

    def read(self, n: int) -> None:
        self.read_bytes += n

    def wrote(self, n: int) -> None:
        self.write_bytes += n

    @property
    def open_connections(self) -> int:
        return max(0, self.opens - self.closes_ok - self.closes_error)


def _label_key(direction: str, labels: Mapping[str, str]) -> LabelKey:
    return (("direction", direction), *sorted(labels.items()))


def _check_direction(direction: str) -> Direction:
    if direction == "inbound":
        return "inbound"
    if direction == "outbound":
        return "outbound"
    raise ValueError(f"direction must be inbound or outbound, not {direction!r}")


class ProxyMetrics:
    """All of one proxy's HTTP and TCP series; see the module docstring."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        self._requests: dict[LabelKey, RequestMetrics] = {}
        self._tcp: dict[LabelKey, TcpMetrics] = {}
        self._request_overflow: dict[LabelKey, RequestMetrics] = {}
        self._tcp_overflow: dict[LabelKey, TcpMetrics] = {}
        self.overflowed = {"request": 0, "tcp": 0}
        self._registry: CollectorRegistry | None = None
        self._extra: list[Collector] = []

    def add_collector(self, collector: Collector) -> None:
        """Expose another family set on the same ``/metrics`` (the identity's values)."""
        self._extra.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

    def request_metrics(self, direction: str, labels: Mapping[str, str]) -> RequestMetrics:
        """The series for a label set (cached; look it up once per connection/route)."""
        direction = _check_direction(direction)
        key = _label_key(direction, labels)
        series = self._requests.get(key)
        if series is not None:
            return series
        if len(self._requests) < self.max_series:
            series = self._requests[key] = RequestMetrics(direction, labels)
            return series
        self.overflowed["request"] += 1
        other = {name: OVERFLOW_VALUE for name in labels}
        okey = _label_key(direction, other)
        series = self._request_overflow.get(okey)
        if series is None:
            series = self._request_overflow[okey] = RequestMetrics(direction, other)
        return series

    def tcp_metrics(self, direction: str, labels: Mapping[str, str]) -> TcpMetrics:
        direction = _check_direction(direction)
        key = _label_key(direction, labels)
        series = self._tcp.get(key)
        if series is not None:
            return series
        if len(self._tcp) < self.max_series:
            series = self._tcp[key] = TcpMetrics(direction, labels)
            return series
        self.overflowed["tcp"] += 1
        other = {name: OVERFLOW_VALUE for name in labels}
        okey = _label_key(direction, other)
        series = self._tcp_overflow.get(okey)
        if series is None:
            series = self._tcp_overflow[okey] = TcpMetrics(direction, other)
        return series

    def request_series(self) -> list[RequestMetrics]:
        # list() of a dict's values is taken without releasing the GIL, so a scrape on
        # another thread never sees the dict change size under it.
        return list(self._requests.values()) + list(self._request_overflow.values())

    def tcp_series(self) -> list[TcpMetrics]:
        return list(self._tcp.values()) + list(self._tcp_overflow.values())

    def collector(self) -> Collector:
        return _ProxyCollector(self)

    def registry(self) -> CollectorRegistry:
        """A registry holding only this proxy's metrics, for the admin ``/metrics``."""
        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self.collector())
            for collector in self._extra:
                self._registry.register(collector)
        return self._registry

    def snapshot_deltas(self) -> tuple[list[RequestRow], list[TcpRow]]:
        """Rows of what changed since the previous call, for a metrics report.

        One ``RequestRow`` per (series, response key) with new responses; one ``TcpRow``
        per TCP series with changes or open connections. The caller folds rows beyond
        ``MAX_REPORT_ROWS``. Only the event loop may call this (it updates the marks).
        """
        request_rows: list[RequestRow] = []
        wall, mono = time.time(), time.monotonic()
        for series in self.request_series():
            for (status, grpc, success), responses in list(series.responses.items()):
                row = _request_row(series, status, grpc, success, responses, wall, mono)
                if row is not None:
                    request_rows.append(row)
            series.reported_requests = series.requests
        tcp_rows: list[TcpRow] = []
        for tcp in self.tcp_series():
            row_tcp = _tcp_row(tcp)
            if row_tcp is not None:
                tcp_rows.append(row_tcp)
        return request_rows, tcp_rows


def _status_class(status: int) -> StatusClass:
    if status == 0:
        return "error"
    return cast(StatusClass, f"{status // 100}xx")


def _peer(labels: Mapping[str, str], direction: Direction) -> tuple[str, str, str]:
    if direction == "outbound":
        return (labels.get(DST_NAMESPACE, ""), labels.get(DST_WORKLOAD, ""),
                labels.get(DST_SERVICE, ""))
    return labels.get(SRC_NAMESPACE, ""), labels.get(SRC_WORKLOAD, ""), ""


def _request_row(series: RequestMetrics, status: int, grpc: int | None, success: bool,
                 responses: _Responses, wall: float, mono: float) -> RequestRow | None:
    count = responses.count
    delta = count - responses.reported
    if delta <= 0:
        return None
    best, worst, last = responses.min_ms, responses.max_ms, responses.last_ms
    last_at = wall - max(0.0, mono - responses.last_mono) if responses.last_mono else wall
    responses.min_ms, responses.max_ms = math.inf, 0.0
    buckets = list(responses.buckets)
    sum_ms = responses.sum_ms
    counts = [now - before for now, before in zip(buckets, responses.reported_buckets,
                                                   strict=True)]
    delta_sum = sum_ms - responses.reported_sum
    responses.reported = count
    responses.reported_sum = sum_ms
    responses.reported_buckets = buckets
    labels = series.labels
    namespace, workload, service = _peer(labels, series.direction)
    return RequestRow(
        direction=series.direction, peer_namespace=namespace, peer_workload=workload,
        peer_service=service, authority=labels.get(AUTHORITY, ""),
        route=labels.get(ROUTE, ""), status_class=_status_class(status), status_code=status,
        grpc_status=grpc, success=success, tls=labels.get(TLS) == "true",
        client_id=labels.get(CLIENT_ID, ""), server_id=labels.get(SERVER_ID, ""),
        requests=delta, latency_counts=counts, latency_sum_ms=delta_sum,
        latency_min_ms=round(best, 3), latency_max_ms=round(worst, 3),
        latency_last_ms=round(last, 3), last_at=last_at)


def _tcp_row(tcp: TcpMetrics) -> TcpRow | None:
    now = (tcp.opens, tcp.closes_ok + tcp.closes_error, tcp.read_bytes, tcp.write_bytes)
    opens, closes, read, write = (a - b for a, b in zip(now, tcp.reported, strict=True))
    tcp.reported = now
    open_connections = tcp.open_connections
    if not (opens or closes or read or write or open_connections):
        return None
    namespace, workload, _ = _peer(tcp.labels, tcp.direction)
    return TcpRow(direction=tcp.direction, peer_namespace=namespace, peer_workload=workload,
                  tls=tcp.labels.get(TLS) == "true", opens=opens, closes=closes,
                  open_connections=open_connections, read_bytes=read, write_bytes=write)


class _ProxyCollector(Collector):
    """Turns the plain counters into Linkerd-named families at scrape time."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # unknown until scraped; keeps registration from calling collect()

    def collect(self) -> Iterator[Metric]:
        yield from self._http()
        yield from self._tcp()
        overflow = Metric("metrics_overflow", "Label sets folded into the overflow "
                          "series because MAX_SERIES was reached", "counter")
        for kind, value in self._metrics.overflowed.items():
            overflow.add_sample("metrics_overflow_total", {"kind": kind}, value)
        yield overflow

    def _http(self) -> Iterator[Metric]:
        requests = Metric("request", "Total count of HTTP requests", "counter")
        responses = Metric("response", "Total count of HTTP responses", "counter")
        latency = Metric("response_latency_ms", "Elapsed times between a request's "
                         "headers being received and its response stream completing",
                         "histogram")
        for series in self._metrics.request_series():
            base = {"direction": series.direction, **series.labels}
            requests.add_sample("request_total", base, series.requests)
            by_status: dict[int, tuple[list[int], float]] = {}
            for (status, grpc, success), item in list(series.responses.items()):
                labels = dict(base)
                labels["classification"] = "success" if success else "failure"
                if status:
                    labels["status_code"] = str(status)
                if grpc is not None:
                    labels["grpc_status_code"] = str(grpc)
                responses.add_sample("response_total", labels, item.count)
                buckets, total = by_status.get(status, ([0] * _BUCKETS, 0.0))
                by_status[status] = ([a + b for a, b in zip(buckets, item.buckets,
                                                             strict=True)],
                                     total + item.sum_ms)
            for status, (buckets, total) in by_status.items():
                labels = dict(base)
                if status:
                    labels["status_code"] = str(status)
                _add_histogram(latency, labels, buckets, total)
        yield requests
        yield responses
        yield latency

    def _tcp(self) -> Iterator[Metric]:
        opens = Metric("tcp_open", "Total count of opened connections", "counter")
        closes = Metric("tcp_close", "Total count of closed connections", "counter")
        current = Metric("tcp_open_connections", "Number of currently-open connections",
                         "gauge")
        read = Metric("tcp_read_bytes", "Total count of bytes read from peers", "counter")
        write = Metric("tcp_write_bytes", "Total count of bytes written to peers", "counter")
        for tcp in self._metrics.tcp_series():
            base = {"direction": tcp.direction, **tcp.labels}
            opens.add_sample("tcp_open_total", base, tcp.opens)
            closes.add_sample("tcp_close_total", {**base, "classification": "success"},
                              tcp.closes_ok)
            closes.add_sample("tcp_close_total", {**base, "classification": "failure"},
                              tcp.closes_error)
            current.add_sample("tcp_open_connections", base, tcp.open_connections)
            read.add_sample("tcp_read_bytes_total", base, tcp.read_bytes)
            write.add_sample("tcp_write_bytes_total", base, tcp.write_bytes)
        yield from (opens, closes, current, read, write)


def _add_histogram(metric: Metric, labels: dict[str, str], buckets: list[int],
                   total: float) -> None:
    cumulative = 0
    for le, count in zip(_LE, buckets, strict=True):
        cumulative += count
        metric.add_sample("response_latency_ms_bucket", {**labels, "le": le}, cumulative)
    metric.add_sample("response_latency_ms_count", labels, cumulative)
    metric.add_sample("response_latency_ms_sum", labels, total)


class IdentityCollector(Collector):
    """The proxy identity's values (``IdentityClient.metric_values``) at scrape time."""

    EXPIRATION = "identity_cert_expiration_timestamp_seconds"
    REFRESHES = "identity_cert_refresh_count"

    def __init__(self, values: Callable[[], Mapping[str, float]]) -> None:
        self._values = values

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        values = self._values()
        expiration = Metric(self.EXPIRATION, "The NotAfter of the proxy's current leaf "
                            "certificate, unix seconds (0 before the first)", "gauge")
        expiration.add_sample(self.EXPIRATION, {}, values.get(self.EXPIRATION, 0.0))
        # "unknown" is exposed as untyped: Linkerd's name, without a _total suffix.
        refreshes = Metric(self.REFRESHES, "Certificates renewed after the first one",
                           "unknown")
        refreshes.add_sample(self.REFRESHES, {}, values.get(self.REFRESHES, 0.0))
        yield expiration
        yield refreshes
