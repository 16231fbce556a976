"""The metrics aggregation as plain code: windows, duplicates, restarts, late and missing
reports, percentiles from Linkerd's buckets, and the four views."""

from __future__ import annotations

import pytest

from shoal.schemas.metrics import (
    EdgesQuery,
    MetricsReport,
    RequestRow,
    RoutesQuery,
    StatQuery,
    StatRow,
    TopQuery,
)
from shoal.services.metrics import views
from shoal.services.metrics.aggregate import (
    RETENTION_SECONDS,
    STALE_AFTER_SECONDS,
    Aggregator,
    percentile,
)
from shoal.services.metrics.prom import PromTotals, render

from .metrics_shapes import N_BUCKETS, counts_at, series

T0 = 1_700_000_000.0
NS = "demo"


def _load(agg: Aggregator, reports: list[MetricsReport]) -> None:
    for report in reports:
        assert agg.add(report, report.interval_end) == "added"


def _web(agg: Aggregator, now: float, window: float = 60.0) -> StatRow:
    answer = views.stat(agg, StatQuery(namespace=NS, window_seconds=window), now)
    rows = [r for r in answer.rows if r.name == "web"]
    assert len(rows) == 1, answer.rows
    return rows[0]


def test_steady_traffic_gives_its_rate_and_success_rate() -> None:
    agg = Aggregator()
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=60, per_second=100,
                      interval=5))
    row = _web(agg, T0 + 61)
    assert row.rps == pytest.approx(100, rel=0.01)
    assert row.success_rate == pytest.approx(0.9, abs=0.005)
    assert row.meshed == "1/1" and row.tcp_conn == 3


@pytest.mark.parametrize("window", [10.0, 30.0, 60.0, 600.0, 3600.0])
def test_every_window_measures_the_same_steady_rate(window: float) -> None:
    agg = Aggregator()
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=3600,
                      per_second=20, interval=5))
    assert _web(agg, T0 + 3601, window).rps == pytest.approx(20, rel=0.01)


def test_a_window_edge_inside_a_report_takes_its_share() -> None:
    agg = Aggregator()
    # 10 s reports: a 15 s window takes one whole report and half of the one before.
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=60, per_second=10,
                      interval=10))
    row = _web(agg, T0 + 60, 15)
    assert row.rps == pytest.approx(10, rel=0.01)


def test_a_new_pod_has_its_rate_from_the_first_report() -> None:
    agg = Aggregator()
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=5, per_second=40,
                      interval=5))
    assert _web(agg, T0 + 6, 60).rps == pytest.approx(40, rel=0.01)


def test_duplicates_are_dropped_and_never_double_the_rate() -> None:
    agg = Aggregator()
    reports = series(NS, "web", "web-1", instance="a", start=T0, seconds=30, per_second=50)
    _load(agg, reports)
    for report in reports[::2]:  # replayed from the stream, re-sent after a reconnect...
        assert agg.add(report, report.interval_end + 1) == "duplicate"
    assert agg.duplicates == 15
    assert _web(agg, T0 + 30, 30).rps == pytest.approx(50, rel=0.01)


def test_a_restart_is_a_new_instance_neither_negative_nor_doubled() -> None:
    agg = Aggregator()
    # instance a runs 30 s, dies; b starts 4 s later with seq 0 again (same pod name).
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=30, per_second=100))
    _load(agg, series(NS, "web", "web-1", instance="b", start=T0 + 34, seconds=26,
                      per_second=100))
    row = _web(agg, T0 + 60, 60)
    # 56 s of traffic in a 60 s window: the gap is a dip, not a spike, not negative.
    assert 0 < row.rps <= 100
    assert row.rps == pytest.approx(100 * 56 / 60, rel=0.01)
    assert row.success_rate == pytest.approx(0.9, abs=0.005)


def test_late_and_missing_reports_are_tolerated() -> None:
    agg = Aggregator()
    reports = series(NS, "web", "web-1", instance="a", start=T0, seconds=60, per_second=100)
    missing = {10, 11, 12}
    late = reports[20:25]
    for i, report in enumerate(reports):
        if i not in missing and report not in late:
            agg.add(report, report.interval_end)
    for report in late:  # arrive at the end, out of order
        assert agg.add(report, T0 + 60) == "added"
    row = _web(agg, T0 + 60, 60)
    assert row.rps == pytest.approx(100 * 57 / 60, rel=0.01)
    old = series(NS, "web", "web-1", instance="z", start=T0 - 2 * RETENTION_SECONDS,
                 seconds=1, per_second=1)[0]
    assert agg.add(old, T0 + 60) == "too_late"


def test_a_dead_pod_decays_and_is_not_counted_live() -> None:
    agg = Aggregator()
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=60, per_second=100))
    row = _web(agg, T0 + 60 + STALE_AFTER_SECONDS + 15, 60)
    assert row.meshed == "0/1" and row.tcp_conn == 0
    assert row.rps == pytest.approx(100 * 30 / 60, rel=0.02)  # half the window is silence
    empty = views.stat(agg, StatQuery(namespace=NS, window_seconds=60), T0 + 200)
    assert empty.rows == []


def test_prune_forgets_what_is_older_than_the_retention() -> None:
    agg = Aggregator()
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=10, per_second=1))
    agg.prune(T0 + 2 * RETENTION_SECONDS)
    assert agg.pods == {}


def test_compaction_keeps_the_answers() -> None:
    agg = Aggregator()
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=1800,
                      per_second=100, interval=5))
    now = T0 + 1800
    queries = [StatQuery(namespace=NS, window_seconds=w) for w in (60, 600, 1800)]
    before = [views.stat(agg, q, now).rows[0] for q in queries]
    top_before = views.top(agg, TopQuery(name="web", namespace=NS, window_seconds=1800), now)
    agg.prune(now)
    entries = agg.pods[next(iter(agg.pods))].entries
    assert len(entries) == 27 + 12 + 24  # minute-long entries, then three minutes of 5 s
    after = [views.stat(agg, q, now).rows[0] for q in queries]
    for b, a in zip(before, after, strict=True):
        assert a.rps == pytest.approx(b.rps, rel=0.01)
        assert a.success_rate == pytest.approx(b.success_rate, abs=1e-9)
        assert a.latency_p99_ms == pytest.approx(b.latency_p99_ms, rel=0.01)
    top_after = views.top(agg, TopQuery(name="web", namespace=NS, window_seconds=1800), now)
    assert top_after == top_before
    # A report that arrives late, into the compacted past, still counts.
    late = series(NS, "web", "web-1", instance="late", start=T0 + 100, seconds=5,
                  per_second=1000, interval=5)[0]
    assert agg.add(late, now) == "added"
    rows = views.stat(agg, StatQuery(namespace=NS, window_seconds=1800), now).rows
    assert rows[0].rps == pytest.approx(after[2].rps + 5000 / 1800, rel=0.01)


def test_percentiles_interpolate_inside_linkerds_buckets() -> None:
    buckets = [0.0] * N_BUCKETS
    assert percentile(buckets, 0.5) is None
    buckets = [float(n) for n in counts_at(10, 100)]  # all in (5, 10]
    assert percentile(buckets, 0.5) == pytest.approx(7.5)
    assert percentile(buckets, 0.99) == pytest.approx(9.95)
    buckets = [float(a + b) for a, b in zip(counts_at(5, 90), counts_at(50, 10), strict=True)]
    assert percentile(buckets, 0.5) == pytest.approx(4 + 50 / 90)
    assert 40 < (percentile(buckets, 0.95) or 0) <= 50
    overflow = [0.0] * N_BUCKETS
    overflow[-1] = 5  # +Inf answers the last finite bound, as histogram_quantile does
    assert percentile(overflow, 0.5) == 50000


def test_stat_latencies_and_wide_bytes() -> None:
    agg = Aggregator()
    _load(agg, series(NS, "web", "web-1", instance="a", start=T0, seconds=60, per_second=100))
    row = _web(agg, T0 + 60)
    assert row.latency_p50_ms is not None and 4 < row.latency_p50_ms <= 5
    assert row.latency_p99_ms is not None and 40 < row.latency_p99_ms <= 50
    assert row.read_bytes_per_sec == pytest.approx(1000, rel=0.01)
    assert row.write_bytes_per_sec == pytest.approx(5000, rel=0.01)


def _mesh(agg: Aggregator) -> None:
    for pod in ("web-1", "web-2"):
        _load(agg, series(NS, "web", pod, instance=pod, start=T0, seconds=60, per_second=50))
    _load(agg, series(NS, "vote-bot", "vote-bot-1", instance="v", start=T0, seconds=60,
                      per_second=100, rows="bot"))


def test_stat_sums_pods_and_follows_to_and_from() -> None:
    agg = Aggregator()
    _mesh(agg)
    row = _web(agg, T0 + 60)
    assert row.meshed == "2/2" and row.rps == pytest.approx(100, rel=0.01)
    to = views.stat(agg, StatQuery(namespace=NS, name="vote-bot", to_resource="deploy/web"),
                    T0 + 60).rows
    assert [r.name for r in to] == ["vote-bot"] and to[0].rps == pytest.approx(100, rel=0.01)
    assert to[0].success_rate == pytest.approx(0.9, abs=0.005)
    source = views.stat(agg, StatQuery(namespace=NS, from_resource="deploy/vote-bot"),
                        T0 + 60).rows
    assert [r.name for r in source] == ["web"]
    assert source[0].rps == pytest.approx(100, rel=0.01) and source[0].meshed == "2/2"
    pods = views.stat(agg, StatQuery(resource="pod", namespace=NS), T0 + 60).rows
    assert {r.name for r in pods} == {"web-1", "web-2", "vote-bot-1"}
    namespaces = views.stat(agg, StatQuery(resource="namespace", name=NS), T0 + 60).rows
    assert [(r.name, r.meshed) for r in namespaces] == [(NS, "3/3")]
    services = views.stat(agg, StatQuery(resource="service", namespace=NS), T0 + 60).rows
    assert [(r.name, r.meshed) for r in services] == [("web-svc", "-")]
    other = views.stat(agg, StatQuery(namespace="elsewhere"), T0 + 60).rows
    assert other == []


def test_top_shows_the_failing_path_with_best_worst_last() -> None:
    agg = Aggregator()
    _mesh(agg)
    rows = views.top(agg, TopQuery(resource="deployment", name="web", namespace=NS),
                     T0 + 60).rows
    vote = [r for r in rows if r.path == "/api/vote"]
    assert vote and all(r.method == "GET" and r.source == "vote-bot" for r in vote)
    assert {r.destination for r in rows} == {"web-1", "web-2"}
    worst = max(vote, key=lambda r: r.worst_ms)
    assert worst.success_rate == pytest.approx(0.75, abs=0.01)
    assert worst.best_ms == 6.0 and worst.worst_ms == 49.0
    # The whole namespace: vote-bot's outbound rows are web's inbound rows, not twice.
    everything = views.top(agg, TopQuery(resource="namespace", name=NS), T0 + 60).rows
    assert sum(r.count for r in everything) == pytest.approx(6000, rel=0.01)


def test_edges_and_routes() -> None:
    agg = Aggregator()
    _mesh(agg)
    edges = views.edges(agg, EdgesQuery(namespace=NS), T0 + 60).rows
    assert [(e.src, e.dst, e.secured) for e in edges] == [("vote-bot", "web", True)]
    assert edges[0].client_id.startswith("vote-bot.") and edges[0].server_id.startswith("web.")
    routes = views.routes(agg, RoutesQuery(name="web", namespace=NS), T0 + 60).rows
    by_route = {r.route: r for r in routes}
    assert set(by_route) == {"GET /api/list", "GET /api/vote"}
    assert by_route["GET /api/list"].success_rate == 1.0
    assert by_route["GET /api/vote"].success_rate == pytest.approx(0.75, abs=0.01)
    assert by_route["GET /api/vote"].rps == pytest.approx(40, rel=0.01)
    assert {r.service for r in routes} == {"web-svc"}


def test_unsecured_edges_carry_linkerds_reason() -> None:
    agg = Aggregator()
    row = RequestRow(direction="outbound", peer_workload="legacy", route="GET /",
                     status_class="2xx", success=True, requests=5, tls=False)
    agg.add(MetricsReport(namespace=NS, workload="web", pod="web-1", instance="i", seq=0,
                          interval_start=T0, interval_end=T0 + 5, requests=[row]), T0 + 5)
    edges = views.edges(agg, EdgesQuery(namespace=NS), T0 + 5).rows
    assert [(e.secured, e.no_tls_reason) for e in edges] == [
        (False, views.NO_TLS_OUTBOUND)]


def test_bad_resources_are_named() -> None:
    with pytest.raises(views.BadResource, match="unknown resource kind"):
        views.parse_resource("cronjob/x")
    assert views.parse_resource("deploy/web") == views.Resource("deployment", "web")


def test_prometheus_text_counts_every_report_once() -> None:
    totals = PromTotals()
    reports = series(NS, "web", "web-1", instance="a", start=T0, seconds=10, per_second=100)
    for report in reports:
        totals.add(report, T0 + 10)
    text = render(totals).decode()
    lines = [line for line in text.splitlines() if line.startswith("request_total{")]
    assert len(lines) == 1 and lines[0].endswith(" 1000.0")
    assert 'deployment="web"' in lines[0] and 'src_deployment="vote-bot"' in lines[0]
    assert 'response_total{' in text and 'classification="failure"' in text
    assert 'response_latency_ms_bucket{' in text and 'le="+Inf"' in text
    assert "tcp_open_connections{" in text
    totals.expire(T0 + 10 + 3600)
    assert "request_total{" not in render(totals).decode()
