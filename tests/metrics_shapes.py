"""Synthetic metrics reports with a known shape, as a proxy would publish them."""

from __future__ import annotations

from typing import Any

from shoal.schemas.metrics import LATENCY_BUCKETS_MS, Direction, MetricsReport, RequestRow, TcpRow

N_BUCKETS = len(LATENCY_BUCKETS_MS) + 1


def counts_at(bound_ms: int, n: int) -> list[int]:
    """A histogram with n requests in the bucket whose upper bound is bound_ms."""
    counts = [0] * N_BUCKETS
    counts[LATENCY_BUCKETS_MS.index(bound_ms)] = n
    return counts


def web_rows(per_second: float, seconds: float, peer: str = "vote-bot",
             tls: bool = True) -> list[RequestRow]:
    """Inbound traffic of `web`: 60% GET /api/list (200), 40% GET /api/vote of which a
    quarter fail with 500, so 10% of all requests fail, all on /api/vote."""
    total = round(per_second * seconds)
    listing = round(total * 0.6)
    failing = round(total * 0.1)
    voting = total - listing - failing
    common: dict[str, Any] = {
        "direction": "inbound", "peer_namespace": "", "peer_workload": peer,
        "authority": "web-svc.demo.svc.cluster.local:8080", "tls": tls,
        "client_id": f"{peer}.demo.serviceaccount.identity.shoal.cluster.local"}
    rows = [
        RequestRow(**common, route="GET /api/list", status_class="2xx", status_code=200,
                   success=True, requests=listing, latency_counts=counts_at(5, listing),
                   latency_sum_ms=4.0 * listing, latency_min_ms=3.5, latency_max_ms=4.8,
                   latency_last_ms=4.0),
        RequestRow(**common, route="GET /api/vote", status_class="2xx", status_code=200,
                   success=True, requests=voting, latency_counts=counts_at(10, voting),
                   latency_sum_ms=8.0 * voting, latency_min_ms=6.0, latency_max_ms=9.5,
                   latency_last_ms=7.0),
        RequestRow(**common, route="GET /api/vote", status_class="5xx", status_code=500,
                   success=False, requests=failing, latency_counts=counts_at(50, failing),
                   latency_sum_ms=45.0 * failing, latency_min_ms=41.0, latency_max_ms=49.0,
                   latency_last_ms=44.0),
    ]
    return [row for row in rows if row.requests]


def bot_rows(per_second: float, seconds: float, tls: bool = True) -> list[RequestRow]:
    """vote-bot's outbound side of the same traffic (one row per route, status)."""
    out = []
    for row in web_rows(per_second, seconds):
        out.append(RequestRow(
            direction="outbound", peer_workload="web", peer_service="web-svc",
            authority=row.authority, route=row.route, status_class=row.status_class,
            status_code=row.status_code, success=row.success, tls=tls,
            server_id="web.demo.serviceaccount.identity.shoal.cluster.local",
            requests=row.requests, latency_counts=row.latency_counts,
            latency_sum_ms=row.latency_sum_ms))
    return out


def series(namespace: str, workload: str, pod: str, *, instance: str, start: float,
           seconds: int, per_second: float, first_seq: int = 0, interval: float = 1.0,
           rows: str = "web", open_connections: int = 3) -> list[MetricsReport]:
    """Consecutive reports of one proxy instance, each `interval` seconds long."""
    reports = []
    for i in range(int(seconds / interval)):
        begin = start + i * interval
        direction: Direction = "inbound" if rows == "web" else "outbound"
        requests = web_rows(per_second, interval) if rows == "web" else bot_rows(
            per_second, interval)
        tcp = [TcpRow(direction=direction, peer_workload="vote-bot" if rows == "web" else "web",
                      tls=True, opens=1, closes=1, open_connections=open_connections,
                      read_bytes=int(1000 * interval), write_bytes=int(5000 * interval))]
        reports.append(MetricsReport(
            namespace=namespace, workload=workload, pod=pod, instance=instance,
            seq=first_seq + i, interval_start=begin, interval_end=begin + interval,
            identity=f"{workload}.{namespace}.serviceaccount.identity.shoal.cluster.local",
            requests=requests, tcp=tcp))
    return reports
