"""`shoal viz` as an operator runs it, against the real metrics and tap services on a
real bus found through the state directory: Linkerd's columns, the documented JSON keys,
tap lines, Ctrl-C closing the session, and clear errors with exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from shoal.cli import viz
from shoal.schemas.tap import Peer, TapResponseEnd
from shoal.services.metrics.service import MetricsService
from shoal.services.tap.service import TapService

from .conftest import Bus
from .services import REPO, in_process
from .test_metrics_service import _publish, _shape, _until_accepted
from .test_tap_bus import Proxy, _until

CLI_TIMEOUT_SECONDS = 30.0


def _env(bus: Bus) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update({"SHOAL_STATE_DIR": str(bus.state_dir), "NO_COLOR": "1", "COLUMNS": "250",
                "PYTHONUNBUFFERED": "1"})
    return env


async def _shoal(bus: Bus, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", *args, cwd=REPO, env=_env(bus),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_SECONDS)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def mesh(bus: Bus, operator: Client) -> AsyncIterator[str]:
    """The metrics service with 30 s of the known shape in a fresh namespace."""
    ns = f"viz-{uuid.uuid4().hex[:6]}"
    service = MetricsService("viz")
    proxy = await bus.client("proxy")
    try:
        async with in_process(bus, "metrics", service.install):
            before = service.aggregator.accepted
            reports = _shape(ns, time.time())
            await _publish(proxy, reports)
            await _until_accepted(service, before + len(reports))
            yield ns
    finally:
        await proxy.close()


async def test_stat_table_and_json(bus: Bus, mesh: str) -> None:
    code, out, err = await _shoal(bus, "viz", "stat", "deploy", "-n", mesh, "-t", "30s")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50",
                                "LATENCY_P95", "LATENCY_P99", "TCP_CONN"]
    web = next(line.split() for line in lines[1:] if line.startswith("web "))
    assert web[1] == "2/2" and web[2].endswith("%") and web[3].endswith("rps")
    assert abs(float(web[2][:-1]) - 90.0) <= 2 and abs(float(web[3][:-3]) - 100) <= 10
    assert web[4] == "5ms" and web[7] == "6"  # p50 in (4, 5]; 3 connections per pod

    code, out, err = await _shoal(bus, "viz", "stat", "deploy/web", "-n", mesh, "-t", "30s",
                                  "-o", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [list(r) for r in rows] == [list(viz.STAT_JSON_KEYS)]
    assert rows[0]["name"] == "web" and rows[0]["namespace"] == mesh
    assert 0.88 <= rows[0]["success_rate"] <= 0.92 and 90 <= rows[0]["rps"] <= 110

    code, out, err = await _shoal(bus, "viz", "stat", "deploy", "-A", "-o", "wide",
                                  "-t", "30s")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[0] == "NAMESPACE" and header[-2:] == ["READ_BYTES/SEC", "WRITE_BYTES/SEC"]
    assert any(line.split()[:2] == [mesh, "web"] for line in out.splitlines())


async def test_top_routes_edges(bus: Bus, mesh: str) -> None:
    code, out, err = await _shoal(bus, "viz", "top", "deploy/web", "-n", mesh)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["Source", "Destination", "Method", "Path", "Count",
                                           "Best", "Worst", "Last", "Success", "Rate"]
    vote = [line.split() for line in out.splitlines() if "/api/vote" in line]
    assert vote and all(cells[2] == "GET" for cells in vote)
    assert any(cells[-1] == "75.00%" and cells[6] == "49ms" for cells in vote)

    code, out, err = await _shoal(bus, "viz", "top", "deploy/web", "-n", mesh, "-o", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert set(rows[0]) == {"source", "destination", "method", "path", "count", "best_ms",
                            "worst_ms", "last_ms", "success_rate"}

    code, out, err = await _shoal(bus, "viz", "routes", "deploy/web", "-n", mesh)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["ROUTE", "SERVICE", "SUCCESS", "RPS", "LATENCY_P50",
                                           "LATENCY_P95", "LATENCY_P99"]
    assert any(line.startswith("GET /api/vote") and "75.00%" in line
               for line in out.splitlines())
    code, out, err = await _shoal(bus, "viz", "routes", "deploy/web", "-n", mesh, "-o", "json")
    assert set(json.loads(out)[0]) == {"route", "service", "success_rate", "rps",
                                       "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"}

    code, out, err = await _shoal(bus, "viz", "edges", "deploy", "-n", mesh, "-o", "wide")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SRC", "DST", "SRC_NS", "DST_NS", "SECURED", "CLIENT_ID",
                                "SERVER_ID"]
    assert lines[1].split()[:5] == ["vote-bot", "web", mesh, mesh, "√"]
    code, out, err = await _shoal(bus, "viz", "edges", "deploy", "-n", mesh, "-o", "json")
    assert set(json.loads(out)[0]) == {"src", "dst", "src_namespace", "dst_namespace",
                                       "secured", "no_tls_reason", "client_id", "server_id"}


async def test_no_traffic_and_unreachable_services(bus: Bus, mesh: str,
                                                   operator: Client) -> None:
    code, out, err = await _shoal(bus, "viz", "stat", "deploy", "-n", "nothing-here")
    assert code == 0 and out == "" and "No traffic found." in err
    code, out, err = await _shoal(bus, "viz", "stat", "deploy", "-t", "2s")
    assert code == 2 and "10s..1h" in err
    code, out, err = await _shoal(bus, "viz", "stat", "cronjob")
    assert code == 2 and "unknown resource kind" in err
    code, out, err = await _shoal(bus, "viz", "stat", "deploy", "--nats", "nats://127.0.0.1:1")
    assert code == 1 and "cannot reach the bus" in err and "Traceback" not in err


async def test_metrics_service_down_is_a_clear_error(bus: Bus, buckets: None) -> None:
    code, out, err = await _shoal(bus, "viz", "routes", "deploy/web")
    assert code == 1 and out == "" and "metrics service did not answer" in err
    assert "Traceback" not in err
    code, out, err = await _shoal(bus, "viz", "tap", "deploy/web")
    assert out == ""
    assert code == 1 and "tap service did not answer" in err and "Traceback" not in err


async def test_tap_prints_linkerd_lines_and_closes_on_ctrl_c(bus: Bus, operator: Client) -> None:
    ns = f"cli-{uuid.uuid4().hex[:6]}"
    nc = await bus.client("proxy")
    proxy = Proxy(nc, ns)
    proxy.start()
    try:
        async with in_process(bus, "tap", TapService().install):
            for output, check in (("", _check_lines), ("json", _check_json)):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "shoal.cli", "viz", "tap", "deploy/web", "-n", ns,
                    "--path", "/api/vote", *(["-o", output] if output else []), cwd=REPO,
                    env=_env(bus), stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
                assert proc.stdout is not None and proc.stderr is not None
                await _until(lambda: proxy.registry.active, CLI_TIMEOUT_SECONDS)
                assert proxy.serve(3, path="/api/list") == 0  # outside --path
                assert proxy.serve(2) == 2
                lines = [(await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
                         for _ in range(6)]
                check(lines)
                proc.send_signal(signal.SIGINT)
                assert await asyncio.wait_for(proc.wait(), 10) == 0
                # The CLI closed its session on the way out.
                await _until(lambda: not proxy.registry.active)
    finally:
        await proxy.close()
        await nc.close()


def _check_lines(lines: list[str]) -> None:
    req, rsp, end = lines[0].split(), lines[1].split(), lines[2].split()
    assert req[0] == "req" and req[1].startswith("id=7:")
    assert req[2:] == ["proxy=in", "src=127.0.0.1:40000", "dst=127.0.0.1:8080", "tls=true",
                       ":method=GET", ":authority=web-svc:8080", ":path=/api/vote"]
    assert rsp[0] == "rsp" and rsp[1] == req[1] and ":status=500" in rsp
    assert rsp[-1].startswith("latency=") and rsp[-1].endswith("µs")
    assert end[0] == "end" and end[1] == req[1] and "grpc-status=Unknown" in end
    assert end[-2].startswith("duration=") and end[-1] == "response-length=17B"


def _check_json(lines: list[str]) -> None:
    events = [json.loads(line) for line in lines]
    assert [e["type"] for e in events[:3]] == ["request_start", "response_start",
                                               "response_end"]
    assert events[0]["path"] == "/api/vote" and events[0]["headers"]["authorization"] == \
        "[REDACTED]"
    assert events[1]["status"] == 500 and events[2]["grpc_status"] == 2


def test_tap_line_format_for_resets_and_wide() -> None:
    event = TapResponseEnd(id="3:1", direction="outbound", tls=False, reset_error="CANCEL",
                           duration_us=1200, response_bytes=0,
                           source=Peer(address="10.0.0.1", port=1, namespace="a",
                                       workload="x"),
                           destination=Peer(workload="y", namespace="b"))
    assert viz.format_tap(event) == ("end id=3:1 proxy=out src=10.0.0.1:1 dst=y tls=false "
                                     "reset-error=CANCEL duration=1200µs response-length=0B")
    assert viz.format_tap(event, wide=True).endswith(
        "src_res=deploy/x src_ns=a dst_res=deploy/y dst_ns=b")


def test_windows_parse_like_linkerd() -> None:
    assert viz.parse_window("1m") == 60 and viz.parse_window("10s") == 10
    assert viz.parse_window("1h") == 3600 and viz.parse_window("90") == 90
