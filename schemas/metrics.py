"""Metrics: the reports proxies publish and the queries the metrics service answers.

A report carries counter deltas since the previous report from the same proxy instance
(``instance`` changes when the proxy restarts; ``seq`` orders reports and lets the
metrics service drop duplicates). Latency buckets use Linkerd's bounds, in ms.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# Linkerd's response_latency_ms bucket upper bounds; the last bucket is +Inf.
LATENCY_BUCKETS_MS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000,
    4000, 5000, 10000, 20000, 30000, 40000, 50000,
)

# A report holds at most this many request and TCP rows together; the rest are folded
# into rows with empty peer and route, one per direction, status class and outcome for
# requests and one per direction for TCP (the number folded is `dropped_rows`). 512 rows
# of ~450 bytes of JSON keep a report near 230 KB, under NATS's 1 MB default payload.
MAX_REPORT_ROWS = 512

Direction = Literal["inbound", "outbound"]
StatusClass = Literal["1xx", "2xx", "3xx", "4xx", "5xx", "error"]


class RequestRow(msgspec.Struct, frozen=True, kw_only=True, array_like=False):
    direction: Direction
    peer_namespace: str = ""
    peer_workload: str = ""
    peer_service: str = ""
    authority: str = ""
    route: str = ""  # "GET /api/vote" or a gRPC "/pkg.Service/Method"
    status_class: StatusClass
    status_code: int = 0
    grpc_status: int | None = None
    success: bool
    tls: bool = False
    client_id: str = ""
    server_id: str = ""
    requests: Annotated[int, msgspec.Meta(ge=0)] = 0
    latency_counts: list[int] = msgspec.field(default_factory=list)  # len 26 (+Inf)
    latency_sum_ms: float = 0.0
    # Per-request samples for `viz top` (best / worst / last), optional: a reader that
    # finds them missing falls back to the histogram's bucket bounds.
    latency_min_ms: float | None = None
    latency_max_ms: float | None = None
    latency_last_ms: float | None = None
    last_at: float = 0.0  # unix seconds of the last request counted in this row


class TcpRow(msgspec.Struct, frozen=True, kw_only=True):
    direction: Direction
    peer_namespace: str = ""
    peer_workload: str = ""
    tls: bool = False
    opens: Annotated[int, msgspec.Meta(ge=0)] = 0
    closes: Annotated[int, msgspec.Meta(ge=0)] = 0
    open_connections: Annotated[int, msgspec.Meta(ge=0)] = 0  # a gauge, not a delta
    read_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    write_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0


class MetricsReport(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str
    workload: str
    pod: str
    instance: str  # random per proxy start
    seq: Annotated[int, msgspec.Meta(ge=0)]
    interval_start: float
    interval_end: float
    meshed: bool = True
    identity: str = ""
    requests: list[RequestRow] = msgspec.field(default_factory=list)
    tcp: list[TcpRow] = msgspec.field(default_factory=list)
    dropped_rows: int = 0


ResourceKind = Literal["namespace", "deployment", "pod", "service"]
Window = Annotated[float, msgspec.Meta(ge=10, le=3600)]


class StatQuery(msgspec.Struct, frozen=True, kw_only=True, tag="stat"):
    resource: ResourceKind = "deployment"
    name: str = ""
    namespace: str = ""  # empty: all namespaces
    window_seconds: Window = 60.0
    from_resource: str = ""  # "deploy/web" or "ns/emojivoto"
    to_resource: str = ""


class TopQuery(msgspec.Struct, frozen=True, kw_only=True, tag="top"):
    resource: ResourceKind = "deployment"
    name: str = ""
    namespace: str = ""
    window_seconds: Window = 60.0
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


class EdgesQuery(msgspec.Struct, frozen=True, kw_only=True, tag="edges"):
    resource: ResourceKind = "deployment"
    namespace: str = ""
    window_seconds: Window = 60.0


class RoutesQuery(msgspec.Struct, frozen=True, kw_only=True, tag="routes"):
    resource: ResourceKind = "deployment"
    name: str = ""
    namespace: str = ""
    window_seconds: Window = 60.0


MetricsQuery = StatQuery | TopQuery | EdgesQuery | RoutesQuery


class StatRow(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    meshed: str  # "2/2"
    success_rate: float | None  # 0..1, None when no requests
    rps: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    tcp_conn: int
    read_bytes_per_sec: float = 0.0
    write_bytes_per_sec: float = 0.0


class TopRow(msgspec.Struct, frozen=True, kw_only=True):
    source: str
    destination: str
    method: str
    path: str
    count: int
    best_ms: float
    worst_ms: float
    last_ms: float
    success_rate: float


class EdgeRow(msgspec.Struct, frozen=True, kw_only=True):
    src: str
    dst: str
    src_namespace: str
    dst_namespace: str
    secured: bool
    no_tls_reason: str = ""
    client_id: str = ""
    server_id: str = ""


class RouteRow(msgspec.Struct, frozen=True, kw_only=True):
    route: str
    service: str
    success_rate: float | None
    rps: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None


class StatAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="stat"):
    rows: list[StatRow]
    window_seconds: float


class TopAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="top"):
    rows: list[TopRow]
    window_seconds: float


class EdgesAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="edges"):
    rows: list[EdgeRow]
    window_seconds: float


class RoutesAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="routes"):
    rows: list[RouteRow]
    window_seconds: float


MetricsAnswer = StatAnswer | TopAnswer | EdgesAnswer | RoutesAnswer
