"""The dashboard's HTTP API and streams against the real metrics and tap services on a
real NATS: synthetic metrics reports published as the proxy role, tap events published
as a proxy would, and real HTTP clients (httpx, curl). Plus the plain cores (params,
history, SSE framing, Host check) and the service as a child process."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import pytest
from nats.aio.client import Client

from shoal.kernel.httpserve import chunk
from shoal.schemas import names
from shoal.schemas.metrics import StatRow
from shoal.services.dashboard import views
from shoal.services.dashboard.history import History, Sample, namespace_sample

from .conftest import Bus
from .dashboard_support import (
    Mesh,
    control_plane,
    open_sessions,
    publish,
    publish_tap,
    vote_doughnut,
)
from .services import REPO, start_process, wait_for_log

WAIT_SECONDS = 15.0


# ----- plain cores


def test_tap_filter_from_params_follows_viz_tap() -> None:
    f = views.tap_filter({"ns": "emojivoto", "workload": "web", "to": "voting",
                          "method": "post", "path": "/emojivoto.v1", "authority": "a:80"})
    assert (f.namespace, f.workload, f.to_namespace, f.to_workload) == (
        "emojivoto", "web", "emojivoto", "voting")
    assert (f.method, f.path_prefix, f.authority) == ("POST", "/emojivoto.v1", "a:80")
    assert views.tap_filter({"ns": "a", "to": "b", "to_ns": "c"}).to_namespace == "c"
    assert views.tap_filter({}) == views.tap_filter({"ns": ""})


@pytest.mark.parametrize("params, fragment", [
    ({"workload": "web"}, "needs its namespace"),
    ({"ns": "a b"}, "not a valid name"),
    ({"ns": "x", "workload": "web.>"}, "not a valid name"),
    ({"method": "GE T"}, "not an HTTP method"),
    ({"path": "api"}, "starting with '/'"),
    ({"authority": "a/b"}, "host[:port]"),
    ({"ns": "x" * 300}, "not a valid name"),
])
def test_tap_filter_refuses_bad_params(params: dict[str, str], fragment: str) -> None:
    with pytest.raises(views.BadParameter, match=fragment.replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.")):
        views.tap_filter(params)


def test_max_rps_param() -> None:
    assert views.max_rps_param({}) == 100.0
    assert views.max_rps_param({"max_rps": "5"}) == 5.0
    for bad in ("0", "-1", "10001", "lots"):
        with pytest.raises(views.BadParameter):
            views.max_rps_param({"max_rps": bad})


def test_host_check_allows_loopback_names_only_by_default() -> None:
    allowed = views.allowed_hosts("127.0.0.1")
    for host in ("127.0.0.1:8084", "localhost:8084", "localhost", "[::1]:8084"):
        assert views.host_allowed(host, allowed), host
    for host in ("evil.example:8084", "", "127.0.0.2:8084"):
        assert not views.host_allowed(host, allowed), host
    extra = views.allowed_hosts("0.0.0.0", ("dash.internal",))
    assert views.host_allowed("dash.internal:80", extra)
    assert not views.host_allowed("0.0.0.0:8084", extra)


def test_sse_framing() -> None:
    assert views.sse("tick", b'{"a":1}') == b'event: tick\ndata: {"a":1}\n\n'
    assert views.sse_comment("hi") == b": hi\n\n"
    with pytest.raises(ValueError):
        views.sse("tick", b"two\nlines")
    assert chunk(b"abc") == b"3\r\nabc\r\n" and chunk(b"") == b"0\r\n\r\n"


def _stat(ns: str, name: str, rps: float, sr: float | None) -> StatRow:
    return StatRow(name=name, namespace=ns, meshed="1/1", success_rate=sr, rps=rps,
                   latency_p50_ms=1.0, latency_p95_ms=5.0, latency_p99_ms=9.0, tcp_conn=1)


def test_history_ring_is_bounded_and_aligned() -> None:
    history = History(ticks=3)
    history.add(1.0, [_stat("a", "web", 10, 0.9)])
    history.add(2.0, [_stat("a", "web", 20, 1.0), _stat("a", "emoji", 5, 1.0)])
    history.add(2.0, [_stat("a", "web", 99, 0.1)])  # same time: ignored
    history.add(3.0, [_stat("a", "emoji", 6, 1.0), _stat("b", "x", 1, None)])
    history.add(4.0, [_stat("a", "web", 40, 0.5)])
    ring = history.workloads("a")
    assert ring["times"] == [2.0, 3.0, 4.0]
    series: Any = ring["series"]
    assert series["web"]["rps"] == [20, None, 40]
    assert series["emoji"]["sr"] == [1.0, 1.0, None]
    assert list(history.workloads("b")["series"]) == ["x"]  # type: ignore[call-overload]


def test_namespace_sample_weights_by_rate() -> None:
    sample = namespace_sample([Sample(90, 1.0, 10.0), Sample(10, 0.0, 100.0),
                               Sample(0, None, None)])
    assert sample.rps == 100
    assert sample.success == pytest.approx(0.9)
    assert sample.p95 == pytest.approx(19.0)


# ----- the API against the real services


async def _get(client: httpx.AsyncClient, path: str, **params: str) -> Any:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def _until(client: httpx.AsyncClient, path: str, check: Any, **params: str) -> Any:
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            data = await _get(client, path, **params)
            if check(data):
                return data
            await asyncio.sleep(0.1)


async def test_api_tables_come_from_the_metrics_service(bus: Bus, buckets: None) -> None:
    ns = f"dash-{uuid.uuid4().hex[:6]}"
    mesh = Mesh(ns)
    proxy = await bus.client("proxy")
    try:
        async with control_plane(bus) as stack:
            base = stack.metrics.aggregator.accepted
            reports = mesh.reports(time.time() - 20, 20)
            await publish(proxy, reports)
            await stack.until_accepted(base + len(reports))
            async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
                status = await _get(client, "/api/status")
                assert status["metrics"] == "ok" and status["bus_connected"]

                data = await _until(client, "/api/workloads",
                                    lambda d: len(d["rows"]) == 4, ns=ns)
                by_name = {r["name"]: r for r in data["rows"]}
                assert set(by_name) == {"web", "emoji", "voting", "vote-bot"}
                assert by_name["web"]["success_rate"] == pytest.approx(0.9, abs=0.01)
                assert by_name["emoji"]["success_rate"] == 1.0
                assert by_name["web"]["rps"] == pytest.approx(20, rel=0.1)
                assert by_name["web"]["meshed"] == "1/1"
                assert ns == data["namespace"] and data["window_seconds"] == 60
                # the sparkline history is there, aligned with its time axis
                times = data["history"]["times"]
                assert times and len(data["history"]["series"]["web"]["rps"]) == len(times)

                namespaces = await _get(client, "/api/namespaces")
                mine = [r for r in namespaces["rows"] if r["name"] == ns]
                assert mine and mine[0]["workloads"] == 4

                web = await _get(client, "/api/workload", ns=ns, name="web")
                assert web["stat"]["name"] == "web"
                assert {e["src"] for e in web["inbound"]} == {"vote-bot"}
                assert {e["dst"] for e in web["outbound"]} == {"emoji", "voting"}
                assert all(e["secured"] and e["server_id"] for e in web["outbound"])
                assert web["inbound"][0]["client_id"].startswith("vote-bot.")
                routes = {r["route"]: r for r in web["routes"]}
                assert routes["GET /api/vote"]["success_rate"] == pytest.approx(0.8, abs=0.01)
                assert routes["GET /api/list"]["success_rate"] == 1.0
                top = {(r["destination"], r["path"]): r for r in web["top"]}
                doughnut = top[("voting", "/emojivoto.v1.VotingService/VoteDoughnut")]
                assert doughnut["success_rate"] == 0.0
                assert list(web["history"]["series"]) == ["web"]
    finally:
        await proxy.close()


async def test_api_errors_are_json_with_the_right_status(bus: Bus, buckets: None) -> None:
    async with control_plane(bus) as stack, \
            httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
        cases = [
            ("/api/workloads", {}, 400, "missing parameter 'ns'"),
            ("/api/workload", {"ns": "x", "name": "a b"}, 400, "not a valid name"),
            ("/api/stream", {"view": "nope"}, 400, "view must be"),
            ("/api/tap", {"workload": "web"}, 400, "needs its namespace"),
            ("/api/nothing", {}, 404, "no such page"),
        ]
        for path, params, status, fragment in cases:
            response = await client.get(path, params=params)
            assert response.status_code == status, (path, response.text)
            assert fragment in response.json()["error"]
        response = await client.post("/api/status")
        assert response.status_code == 405
        response = await client.get("/api/status", headers={"Host": "evil.example"})
        assert response.status_code == 421  # DNS-rebinding guard
        page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert b'src="/static/app.js"' in page.content
        script = await client.get("/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        for asset in ("/static/app.js", "/static/app.css", "/"):
            text = (await client.get(asset)).text
            assert "https://" not in text and "//cdn" not in text  # nothing from elsewhere


async def test_metrics_service_down_is_a_503_and_a_banner(bus: Bus, buckets: None) -> None:
    from shoal.services.dashboard.service import DashboardService

    from .services import in_process

    dashboard = DashboardService(port=0, poll_interval=0.2)
    nc = await bus.client("operator")
    try:
        # only when no metrics replica is running anywhere on the bus can this be seen
        async with in_process(bus, "dashboard", dashboard.install), \
                httpx.AsyncClient(base_url=dashboard.url, timeout=10) as client:
            status = await _until(client, "/api/status", lambda d: d["error"] != "")
            if status["metrics"] == "ok":
                pytest.skip("another metrics replica answers on this bus")
            assert status["metrics"] == "unavailable"
            assert "metrics service did not answer" in status["error"]
            response = await client.get("/api/workload", params={"ns": "a", "name": "b"})
            assert response.status_code == 503
            assert "did not answer" in response.json()["error"]
            data = await _get(client, "/api/workloads", ns="a")
            assert data["waiting"] and data["error"]
    finally:
        await nc.close()


async def _sse_events(response: httpx.Response, wanted: int,
                      names_: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Read events from a server-sent event stream until ``wanted`` of ``names_``."""
    events: list[tuple[str, Any]] = []
    name = ""
    async with asyncio.timeout(WAIT_SECONDS):
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name in names_:
                events.append((name, json.loads(line[6:])))
                if len(events) >= wanted:
                    return events
    return events


async def test_stream_pushes_a_snapshot_then_ticks(bus: Bus, buckets: None) -> None:
    ns = f"dash-{uuid.uuid4().hex[:6]}"
    mesh = Mesh(ns)
    proxy = await bus.client("proxy")
    try:
        async with control_plane(bus, poll_interval=0.3) as stack:
            base = stack.metrics.aggregator.accepted
            reports = mesh.reports(time.time() - 10, 10)
            await publish(proxy, reports)
            await stack.until_accepted(base + len(reports))
            async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client, \
                    client.stream("GET", "/api/stream",
                                  params={"view": "workloads", "ns": ns}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["transfer-encoding"] == "chunked"
                events = await _sse_events(response, 4, ("snapshot", "tick"))
            assert [name for name, _ in events] == ["snapshot", "tick", "tick", "tick"]
            snapshot = events[0][1]
            assert "history" in snapshot and "sample" not in snapshot
            ticks = [data for _, data in events[1:]]
            assert all("sample" in t and "history" not in t for t in ticks)
            times = [t["sample"]["time"] for t in ticks]
            assert times == sorted(times) and len(set(times)) >= 2  # new samples arrive
            assert any({r["name"] for r in t["rows"]} == {"web", "emoji", "voting", "vote-bot"}
                       for t in ticks)
            # a real client program reads the same stream (curl, bounded in time)
            curl = await asyncio.create_subprocess_exec(
                "curl", "-sN", "--max-time", "2",
                f"{stack.url}api/stream?view=workload&ns={ns}&name=web",
                stdout=asyncio.subprocess.PIPE)
            out, _ = await curl.communicate()
            assert out.startswith(b"retry: ") and b"event: snapshot" in out
            assert b'"name":"web"' in out
    finally:
        await proxy.close()


async def test_tap_stream_opens_relays_and_closes_a_session(bus: Bus, operator: Client) -> None:
    ns = f"tap-{uuid.uuid4().hex[:6]}"
    kv = await operator.jetstream().key_value(names.BUCKET_TAP)
    proxy = await bus.client("proxy")
    try:
        async with control_plane(bus) as stack, \
                httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
            params = {"ns": ns, "workload": "voting", "path": "/emojivoto.v1", "max_rps": "50"}
            async with client.stream("GET", "/api/tap", params=params) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                hello = await _next_event(lines, "session")
                assert hello["filter"]["workload"] == "voting"
                assert hello["max_rps"] == 50
                sessions = await open_sessions(kv, ns, "voting")
                assert [s.id for s in sessions] == [hello["id"]]
                assert sessions[0].filter.path_prefix == "/emojivoto.v1"
                # a proxy publishes the events of a matching call; one for another
                # session (not ours) must not come through
                await publish_tap(proxy, ns, vote_doughnut(ns, "someone-else", n=1))
                await publish_tap(proxy, ns, vote_doughnut(ns, hello["id"], n=2))
                seen = [await _next_event(lines, "tap") for _ in range(3)]
            assert [e["type"] for e in seen] == ["request_start", "response_start",
                                                 "response_end"]
            assert {e["id"] for e in seen} == {"7:2"}
            assert seen[0]["path"] == "/emojivoto.v1.VotingService/VoteDoughnut"
            assert seen[2]["grpc_status"] == 2
            # the browser went away: the dashboard closes the session
            async with asyncio.timeout(WAIT_SECONDS):
                while stack.dashboard.api is not None and stack.dashboard.api.tap_streams:
                    await asyncio.sleep(0.05)
            with pytest.raises(TimeoutError):
                await open_sessions(kv, ns, "voting", timeout=0.5)
    finally:
        await proxy.close()


async def _next_event(lines: Any, wanted: str) -> Any:
    name = ""
    async with asyncio.timeout(WAIT_SECONDS):
        async for line in lines:
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == wanted:
                return json.loads(line[6:])
    raise AssertionError(f"stream ended before a {wanted} event")


# ----- the service as a process


async def test_dashboard_process_serves_and_stops_on_sigterm(bus: Bus, buckets: None) -> None:
    proc = start_process(bus, "dashboard", "--port", "0", "--log-level", "info")
    try:
        log = await wait_for_log(proc, b"dashboard on http://")
        url = log.decode().split("dashboard on ", 1)[1].split()[0]
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            response = await client.get("/api/status")
            assert response.status_code == 200 and "metrics" in response.json()
            page = await client.get("/")
            assert b"Shoal dashboard" in page.content
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dashboard_bad_port_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "shoal.services.dashboard", "--port",
                             "99999", "--nats", "nats://127.0.0.1:1"], cwd=REPO,
                            capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"not a port number" in result.stderr and b"Traceback" not in result.stderr
