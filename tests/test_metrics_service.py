"""The metrics service over a real NATS: reports published as the proxy role, queries as
an operator; a known traffic shape comes back within tolerance; replicas agree; a
replica that starts late replays the stream and agrees too; duplicates and a restart do
not double or negate rates; a real scraper reads the Prometheus text."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid

import pytest
from nats.aio.client import Client

from shoal.proxy.metrics import ProxyMetrics
from shoal.proxy.report import ReportBuilder, ReportIdentity, ReportPublisher
from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.errors import ErrorReply
from shoal.schemas.metrics import (
    MetricsAnswer,
    MetricsReport,
    StatAnswer,
    StatQuery,
    TopAnswer,
    TopQuery,
)
from shoal.services.metrics.service import MetricsService

from .conftest import Bus
from .metrics_shapes import series
from .services import in_process

ANSWERS: Decoder[MetricsAnswer] = Decoder(MetricsAnswer, names.METRICS_QUERY)
WAIT_SECONDS = 10.0


async def _publish(nc: Client, reports: list[MetricsReport]) -> None:
    for report in reports:
        await nc.publish(names.metrics_subject(report.namespace, report.workload, report.pod),
                         encode(report))
    await nc.flush()


def _shape(ns: str, now: float, seconds: int = 30) -> list[MetricsReport]:
    """100 req/s into `web` (two pods at 50/s), 10% failing on /api/vote; 1 s reports."""
    start = now - seconds
    out = []
    for pod in ("web-1", "web-2"):
        out += series(ns, "web", pod, instance=f"{pod}-a", start=start, seconds=seconds,
                      per_second=50)
    out += series(ns, "vote-bot", "vote-bot-1", instance="v", start=start, seconds=seconds,
                  per_second=100, rows="bot")
    return out


async def _query(nc: Client, query: object) -> MetricsAnswer:
    msg = await nc.request(names.METRICS_QUERY, encode(query), timeout=2.0)  # type: ignore[arg-type]
    return ANSWERS.decode(msg.data)


async def _until_accepted(service: MetricsService, count: int) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while service.aggregator.accepted < count:
            await asyncio.sleep(0.02)


async def test_known_shape_two_replicas_and_a_late_one(bus: Bus, operator: Client) -> None:
    ns = f"shape-{uuid.uuid4().hex[:6]}"
    first, second, late = MetricsService("m1"), MetricsService("m2"), MetricsService("m3")
    proxy = await bus.client("proxy")
    try:
        async with in_process(bus, "metrics", first.install), \
                in_process(bus, "metrics", second.install):
            base = (first.aggregator.accepted, second.aggregator.accepted)
            reports = _shape(ns, time.time())
            await _publish(proxy, reports)
            await _until_accepted(first, base[0] + len(reports))
            await _until_accepted(second, base[1] + len(reports))
            query = StatQuery(namespace=ns, window_seconds=30)
            answers = [await _query(operator, query) for _ in range(6)]  # both replicas
            stat = answers[0]
            assert isinstance(stat, StatAnswer)
            web = next(r for r in stat.rows if r.name == "web")
            assert web.rps == pytest.approx(100, rel=0.10)
            assert web.success_rate is not None and abs(web.success_rate - 0.90) <= 0.02
            assert web.meshed == "2/2"
            assert all(a == stat for a in answers), "replicas disagree"
            now = time.time()
            for q in (query, TopQuery(name="web", namespace=ns)):
                assert first.answer(q, now) == second.answer(q, now)
            top = await _query(operator, TopQuery(name="web", namespace=ns))
            assert isinstance(top, TopAnswer)
            failing = [r for r in top.rows if r.path == "/api/vote" and r.success_rate < 1]
            assert failing and failing[0].worst_ms == 49.0
            # A replica started now replays the stream before it answers.
            async with in_process(bus, "metrics", late.install):
                assert late.replayed >= len(reports)
                now = time.time()
                assert late.answer(query, now) == first.answer(query, now)
    finally:
        await proxy.close()


async def test_duplicates_and_a_restart_over_the_bus(bus: Bus, operator: Client) -> None:
    ns = f"restart-{uuid.uuid4().hex[:6]}"
    service = MetricsService("m")
    proxy = await bus.client("proxy")
    try:
        async with in_process(bus, "metrics", service.install):
            now = time.time()
            before = service.aggregator.accepted
            first = series(ns, "web", "web-1", instance="a", start=now - 30, seconds=14,
                           per_second=100)
            # killed at -16 s, back at -14 s with a new instance and seq from 0 again
            second = series(ns, "web", "web-1", instance="b", start=now - 14, seconds=14,
                            per_second=100)
            await _publish(proxy, first + first[:5] + second + second[-5:])  # + duplicates
            await _until_accepted(service, before + len(first) + len(second))
            await asyncio.sleep(0.2)
            assert service.aggregator.accepted == before + len(first) + len(second)
            stat = await _query(operator, StatQuery(namespace=ns, window_seconds=30))
            assert isinstance(stat, StatAnswer)
            web = stat.rows[0]
            assert 0 < web.rps <= 100 and web.rps == pytest.approx(100 * 28 / 30, rel=0.05)
    finally:
        await proxy.close()


async def test_bad_queries_get_a_named_error(bus: Bus, operator: Client) -> None:
    async with in_process(bus, "metrics", MetricsService("m").install):
        msg = await operator.request(names.METRICS_QUERY, encode(
            StatQuery(to_resource="cronjob/x")), timeout=2.0)
        assert msg.headers and msg.headers.get("Nats-Service-Error-Code") == "400"
        error: ErrorReply = Decoder(ErrorReply, "").decode(msg.data)
        assert "unknown resource kind" in error.message
        msg = await operator.request(names.METRICS_QUERY, b'{"type": "stat", '
                                     b'"window_seconds": 1}', timeout=2.0)
        assert msg.headers and msg.headers.get("Nats-Service-Error-Code") == "400"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_prometheus_scrapes_the_aggregate(bus: Bus, operator: Client) -> None:
    ns = f"prom-{uuid.uuid4().hex[:6]}"
    port = _free_port()
    service = MetricsService("m", prom_port=port)
    proxy = await bus.client("proxy")
    try:
        async with in_process(bus, "metrics", service.install):
            before = service.aggregator.accepted
            reports = series(ns, "web", "web-1", instance="a", start=time.time() - 10,
                             seconds=10, per_second=100)
            await _publish(proxy, reports)
            await _until_accepted(service, before + len(reports))
            scrape = await asyncio.to_thread(subprocess.run, [
                "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/metrics"],
                capture_output=True, text=True, timeout=10)
            assert scrape.returncode == 0, scrape.stderr
            ours = [line for line in scrape.stdout.splitlines()
                    if line.startswith("request_total{") and f'namespace="{ns}"' in line]
            assert len(ours) == 1 and ours[0].endswith(" 1000.0"), ours
            assert 'response_total{' in scrape.stdout
            if shutil.which("promtool"):
                lint = await asyncio.to_thread(subprocess.run, ["promtool", "check", "metrics"],
                                               input=scrape.stdout, capture_output=True,
                                               text=True, timeout=10)
                # Linkerd's response_latency_ms breaks the base-unit rule on purpose.
                problems = [line for line in (lint.stdout + lint.stderr).splitlines()
                            if line.strip() and "response_latency_ms" not in line]
                assert not problems, problems
    finally:
        await proxy.close()


async def test_proxy_counters_through_reports_to_stat(bus: Bus, operator: Client) -> None:
    """The proxy's own counters (proxy/metrics.py) -> report publisher -> stat; a restart
    (new counters, new instance) adds on, never subtracts."""
    ns = f"counters-{uuid.uuid4().hex[:6]}"
    service = MetricsService("m")
    proxy_nc = await bus.client("proxy")
    who = ReportIdentity(namespace=ns, workload="web", pod="web-1")
    try:
        async with in_process(bus, "metrics", service.install):
            before = service.aggregator.accepted
            sent = 0
            for _life in range(2):  # the second life is the proxy restarted
                counters = ProxyMetrics()
                route = counters.request_metrics("inbound", {"route": "GET /api/vote",
                                                             "src_workload": "vote-bot"})
                publisher = ReportPublisher(ReportBuilder(who), counters.snapshot_deltas,
                                            proxy_nc.publish)
                for _tick in range(3):
                    for i in range(100):
                        route.request()
                        failed = i % 10 == 0
                        route.observe(500 if failed else 200, None, 3.0, not failed)
                    await publisher.tick()
                    sent += 1
            await proxy_nc.flush()
            await _until_accepted(service, before + sent)
            stat = await _query(operator, StatQuery(namespace=ns, window_seconds=60))
            assert isinstance(stat, StatAnswer)
            web = stat.rows[0]
            assert web.success_rate == pytest.approx(0.9)
            assert web.latency_p50_ms is not None and 2 < web.latency_p50_ms <= 3
            top = await _query(operator, TopQuery(name="web", namespace=ns))
            assert isinstance(top, TopAnswer)
            assert [(r.source, r.path, r.count) for r in top.rows] == [
                ("vote-bot", "/api/vote", 600)]
    finally:
        await proxy_nc.close()
