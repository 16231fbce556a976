"""Metrics reports from the proxy side: bounded whatever the traffic (folded rows keep
totals and success rates exact), numbered per instance, re-sent after a bus outage."""

from __future__ import annotations

import asyncio

import pytest

from shoal.proxy.report import ReportBuilder, ReportIdentity, ReportPublisher, cap_rows
from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.metrics import MAX_REPORT_ROWS, MetricsReport, RequestRow, TcpRow

from .metrics_shapes import counts_at

WHO = ReportIdentity(namespace="demo", workload="web", pod="web-1", identity="web.demo")


def _row(i: int, requests: int = 1, success: bool = True) -> RequestRow:
    return RequestRow(direction="inbound" if i % 2 else "outbound", peer_workload=f"p{i}",
                      route=f"GET /item/{i}", status_class="2xx" if success else "5xx",
                      status_code=200 if success else 500, success=success,
                      requests=requests, latency_counts=counts_at(10, requests),
                      latency_sum_ms=7.0 * requests, latency_min_ms=6.0,
                      latency_max_ms=9.0, latency_last_ms=7.0, last_at=float(i))


def test_small_reports_are_untouched_and_idle_rows_dropped() -> None:
    rows = [_row(i) for i in range(10)] + [_row(99, requests=0)]
    tcp = [TcpRow(direction="inbound", opens=1), TcpRow(direction="outbound")]
    kept, kept_tcp, dropped = cap_rows(rows, tcp)
    assert len(kept) == 10 and len(kept_tcp) == 1 and dropped == 0


def test_a_flood_of_routes_is_capped_and_folded_exactly() -> None:
    rows = [_row(i, requests=1 + i % 7, success=i % 10 != 0) for i in range(5000)]
    tcp = [TcpRow(direction="outbound", peer_workload=f"p{i}", opens=1, read_bytes=i)
           for i in range(800)]
    kept, kept_tcp, dropped = cap_rows(rows, tcp)
    assert len(kept) + len(kept_tcp) <= MAX_REPORT_ROWS
    whole, whole_tcp = [r for r in kept if r.route], [r for r in kept_tcp if r.peer_workload]
    assert dropped == (5000 - len(whole)) + (800 - len(whole_tcp))
    assert sum(r.requests for r in kept) == sum(r.requests for r in rows)
    assert sum(r.requests for r in kept if r.success) == sum(
        r.requests for r in rows if r.success)
    assert sum(sum(r.latency_counts) for r in kept) == sum(r.requests for r in rows)
    assert sum(r.opens for r in kept_tcp) == 800
    folded = [r for r in kept if not r.route]
    assert folded and all(not r.peer_workload for r in folded)
    # The busiest rows are the ones kept whole.
    assert min(r.requests for r in whole) >= max(r.requests for r in rows) - 1
    size = len(encode(ReportBuilder(WHO).build(rows, tcp)))
    assert size < 1024 * 1024, size  # under NATS's default max payload


def test_reports_are_numbered_per_instance_and_contiguous() -> None:
    builder = ReportBuilder(WHO, started=100.0)
    first = builder.build([_row(1)], [], now=105.0)
    second = builder.build([], [], now=110.0)
    assert (first.seq, second.seq) == (0, 1) and first.instance == second.instance
    assert (first.interval_start, first.interval_end) == (100.0, 105.0)
    assert second.interval_start == first.interval_end
    assert builder.subject == names.metrics_subject("demo", "web", "web-1")
    assert ReportBuilder(WHO).instance != builder.instance  # a restart is a new instance


async def test_unsent_reports_are_kept_and_sent_in_order() -> None:
    sent: list[MetricsReport] = []
    up = False
    decoder: Decoder[MetricsReport] = Decoder(MetricsReport, "test")

    async def send(subject: str, payload: bytes) -> None:
        if not up:
            raise ConnectionError("bus away")
        sent.append(decoder.decode(payload))

    publisher = ReportPublisher(ReportBuilder(WHO), lambda: ([_row(1)], []), send)
    for _ in range(3):
        await publisher.tick()
    assert sent == [] and len(publisher.backlog) == 3
    up = True
    await publisher.tick()
    assert [r.seq for r in sent] == [0, 1, 2, 3] and not publisher.backlog


async def test_the_loop_reports_until_stopped() -> None:
    sent: list[bytes] = []

    async def send(subject: str, payload: bytes) -> None:
        sent.append(payload)

    stop = asyncio.Event()
    publisher = ReportPublisher(ReportBuilder(WHO), lambda: ([], []), send, interval=0.05)
    task = asyncio.create_task(publisher.run(stop))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert len(sent) >= 3


def test_report_schema_rejects_negative_counts() -> None:
    bad = encode(ReportBuilder(WHO).build([_row(1)], [])).replace(
        b'"requests":1,', b'"requests":-1,', 1)
    with pytest.raises(WireDecodeError):
        Decoder(MetricsReport, "test").decode(bad)
