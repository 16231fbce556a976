"""HTTP/2 and gRPC end to end: real grpcio clients and servers, curl and h2load, through
client -> outbound proxy -> inbound proxy -> server, with discovery through a real NATS
(the session bus), the real destination service, and the inbound proxies registering
themselves, as tests/test_proxy_e2e.py does for HTTP/1.

Layout (every proxy a child process `python -m shoal.proxy`, namespace "h2"):
  out        outbound port (h2c and CONNECT), port-mapped upstream for grpc-echo
  echo-0..2  inbound -> grpcio backends of service grpc-echo (the balancing set)
  age        inbound -> a grpcio backend that sends GOAWAY after 300 ms of age
  web        inbound -> nginx speaking h2c
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from .apps import LOOPBACK, free_port
from .conftest import Bus
from .grpcapps import MESSAGE_OPTIONS, SERVICE, GrpcBackend, NginxH2c, nginx_binary
from .proxyproc import Child, ProxyProcess, destination, proxy_env

NS = "h2"
ROUTE_TIMEOUT_SECONDS = 20.0  # registration -> destination -> KV -> proxy watch, bounded
RPC_TIMEOUT = 20.0
BACKENDS = 3


@dataclass
class Mesh:
    out: ProxyProcess
    inbound: list[ProxyProcess]
    echo: list[GrpcBackend]
    age: GrpcBackend
    web: NginxH2c | None
    mapped_port: int
    children: list[Child]

    def channel(self, authority: str = f"grpc-echo.{NS}:8080",
                **options: object) -> grpc.Channel:
        opts = [("grpc.default_authority", authority), *MESSAGE_OPTIONS, *options.items()]
        return grpc.insecure_channel(f"{LOOPBACK}:{self.out.outbound_port}", options=opts)


def _wait_grpc(channel: grpc.Channel, backends: list[GrpcBackend]) -> None:
    """Until every backend has served a call (all endpoints registered and watched)."""
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    deadline = time.monotonic() + ROUTE_TIMEOUT_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        try:
            unary(b"ping", timeout=5)
            if all(backend.total() for backend in backends):
                return
        except grpc.RpcError as error:
            last = error
        time.sleep(0.05)
    raise AssertionError(f"backends never all reached: {last!r}")


@pytest.fixture(scope="module")
def mesh(bus: Bus, buckets: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("h2-logs")
    env = proxy_env(bus.env("proxy"))
    echo = [GrpcBackend(f"echo-{index}") for index in range(BACKENDS)]
    # GOAWAY after 300 ms of connection age, streams in flight get 10 s to finish.
    age = GrpcBackend("age", stream_gap=0.05, options=[
        ("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 10_000)])
    web = NginxH2c("web", tmp_path_factory.mktemp("nginx")).start() if nginx_binary() else None
    dest, dest_port = destination(proxy_env(bus.env("controller")), log_dir)
    mapped_port = free_port()
    out = ProxyProcess("out", env, log_dir, "--namespace", NS,
                       "--upstream", f"{mapped_port}=grpc-echo.{NS}:8080")
    inbound = [ProxyProcess(backend.name, env, log_dir, "--namespace", NS, "--service",
                            "grpc-echo", "--workload", backend.name, outbound=False,
                            app_port=backend.port) for backend in echo]
    inbound.append(ProxyProcess("age", env, log_dir, "--namespace", NS, "--service",
                                "grpc-age", outbound=False, app_port=age.port))
    if web is not None:
        inbound.append(ProxyProcess("web", env, log_dir, "--namespace", NS, "--service",
                                    "web", outbound=False, app_port=web.port))
    children: list[Child] = [dest, out, *inbound]
    result = Mesh(out, inbound, echo, age, web, mapped_port, children)
    try:
        for child in children:
            child.start()
        for backend in (*echo, age):  # after the forks (see GrpcBackend.start)
            backend.start()
        dest.wait_http_ok(dest_port, "/ready")
        for proxy in (out, *inbound):
            proxy.wait_ready()
        with result.channel() as channel:
            _wait_grpc(channel, echo)
        yield result
    finally:
        for child in reversed(children):
            child.stop()
        for backend in (*echo, age):
            backend.stop()
        if web is not None:
            web.stop()


@pytest.fixture(autouse=True)
def show_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    mesh = request.node.funcargs.get("mesh")
    if report is not None and report.failed and mesh is not None:
        for child in mesh.children:
            print(f"--- {child.name} ---\n{child.log()[-2000:]}")


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- gRPC through two proxies ---------------------------------------------------------------


def test_200_concurrent_rpcs_on_one_channel_spread_evenly(mesh: Mesh) -> None:
    """First in the file on purpose: peak-EWMA remembers a slow response head (a 10 MB
    upload, a call left to time out) for tens of seconds, as Linkerd's does, so this
    runs while the three endpoints' estimates are still alike."""
    before = [backend.calls["Sleep"] for backend in mesh.echo]
    with mesh.channel() as channel:
        sleep = channel.unary_unary(f"/{SERVICE}/Sleep")
        calls = [sleep.future(b"100", timeout=RPC_TIMEOUT) for _ in range(200)]
        assert all(call.result() == b"100" for call in calls)
    served = [backend.calls["Sleep"] - old for backend, old in zip(mesh.echo, before,
                                                                    strict=True)]
    assert sum(served) == 200
    even = 200 / BACKENDS
    assert all(abs(count - even) <= 0.2 * even for count in served), served


def test_unary_streaming_and_a_10mb_message(mesh: Mesh) -> None:
    with mesh.channel() as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        reply, call = unary.with_call(b"hello", timeout=RPC_TIMEOUT)
        assert reply == b"hello"
        assert dict(call.initial_metadata())["x-backend"].startswith("echo-")
        stream = list(channel.unary_stream(f"/{SERVICE}/ServerStream")(
            b"1000", timeout=RPC_TIMEOUT))
        assert stream == [b"message %d" % index for index in range(1000)]
        total = channel.stream_unary(f"/{SERVICE}/ClientStream")(
            iter([b"0123456789"] * 1000), timeout=RPC_TIMEOUT)
        assert total == b"10000"
        sent = [b"bidi %d" % index for index in range(1000)]
        echoed = list(channel.stream_stream(f"/{SERVICE}/Bidi")(iter(sent),
                                                                  timeout=RPC_TIMEOUT))
        assert echoed == sent
        big = bytes(range(256)) * (10 * 1024 * 1024 // 256)
        assert unary(big, timeout=RPC_TIMEOUT) == big


def test_bidi_interleaves_without_buffering(mesh: Mesh) -> None:
    """Each reply comes back before the next request is sent: nothing waits for the end
    of a stream (a proxy that buffered streams would deadlock here)."""
    requests: list[bytes] = []
    ready = threading.Event()

    def gen() -> Iterator[bytes]:
        for index in range(50):
            message = b"ping %d" % index
            requests.append(message)
            yield message
            assert ready.wait(RPC_TIMEOUT), "no reply before the next request"
            ready.clear()

    with mesh.channel() as channel:
        replies = []
        for reply in channel.stream_stream(f"/{SERVICE}/Bidi")(gen(), timeout=RPC_TIMEOUT):
            replies.append(reply)
            ready.set()
    assert replies == requests


def test_unknown_is_a_failure_in_metrics(mesh: Mesh) -> None:
    with mesh.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(f"/{SERVICE}/Fail")(b"doughnut", timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert "doughnut" in (caught.value.details() or "")
    outbound = mesh.out.metrics()
    assert _metric(outbound, "response_total", direction="outbound",
                   dst_service="grpc-echo", classification="failure",
                   grpc_status_code="2", status_code="200") >= 1
    assert _metric(outbound, "response_total", direction="outbound",
                   dst_service="grpc-echo", classification="success",
                   grpc_status_code="0") >= 1
    # The inbound proxy counts the stream when it ends there, which may be a moment after
    # the client has its answer (the request side closes last): bounded wait.
    deadline = time.monotonic() + 5.0
    while True:
        inbound = sum(_metric(proxy.metrics(), "response_total", direction="inbound",
                              classification="failure", grpc_status_code="2")
                      for proxy in mesh.inbound[:BACKENDS])
        if inbound >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert inbound >= 1, "\n".join(
        line for proxy in mesh.inbound for line in proxy.metrics().splitlines()
        if line.startswith(("response_total", "request_total")))


def test_expiring_deadline_reaches_the_client(mesh: Mesh) -> None:
    with mesh.channel(f"grpc-age.{NS}") as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(f"/{SERVICE}/Sleep")(b"3000", timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _raw_h2(port: int, headers: list[tuple[str, str]], body: bytes,
            timeout: float = 10.0) -> tuple[dict[str, str], dict[str, str], float]:
    """One request with the h2 library over a blocking socket (no client-side deadline
    logic): (response headers, trailers, seconds until the stream ended)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                 header_encoding="utf-8"))
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    started = time.monotonic()
    try:
        conn.initiate_connection()
        conn.send_headers(1, headers)
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        response: dict[str, str] = {}
        trailers: dict[str, str] = {}
        while True:
            data = sock.recv(65536)
            assert data, "connection closed before the stream ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    response = {str(k): str(v) for k, v in event.headers}
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = {str(k): str(v) for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {event.error_code}")
                if isinstance(event, h2.events.StreamEnded) or getattr(
                        event, "stream_ended", None):
                    return response, trailers, time.monotonic() - started
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()


def _grpc_headers(method: str, authority: str, timeout: str | None) -> list[tuple[str, str]]:
    headers = [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/{method}"),
               (":authority", authority), ("content-type", "application/grpc"),
               ("te", "trailers")]
    if timeout is not None:
        headers.append(("grpc-timeout", timeout))
    return headers


def test_proxy_enforces_grpc_timeout_itself(mesh: Mesh) -> None:
    """A client that leaves the deadline to the proxy: DEADLINE_EXCEEDED from the proxy
    (trailers-only), long before the handler's 3 s, counted as a failure."""
    message = b"\x00\x00\x00\x00\x043000"
    response, trailers, elapsed = _raw_h2(
        mesh.out.outbound_port, _grpc_headers("Sleep", f"grpc-age.{NS}", "200m"), message)
    status = trailers.get("grpc-status", response.get("grpc-status"))
    assert status == "4", (response, trailers)
    assert elapsed < 2.0
    assert _metric(mesh.out.metrics(), "response_total", direction="outbound",
                   classification="failure", grpc_status_code="4") >= 1


def test_unknown_service_is_unavailable(mesh: Mesh) -> None:
    response, _, _ = _raw_h2(
        mesh.out.outbound_port, _grpc_headers("Unary", f"nope.{NS}", None),
        b"\x00\x00\x00\x00\x00")
    assert response[":status"] == "200"
    assert response.get("grpc-status") == "14"  # UNAVAILABLE, trailers-only
    assert "nope" in response.get("shoal-proxy-error", "")


def test_server_goaway_mid_stream(mesh: Mesh) -> None:
    """The backend sends GOAWAY 300 ms into its connection while a 2 s stream runs: the
    stream finishes whole, and calls after it go over a new connection."""
    with mesh.channel(f"grpc-age.{NS}") as channel:
        stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
        messages = list(stream(b"40", timeout=RPC_TIMEOUT))  # 40 x 50 ms
        assert len(messages) == 40
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        for index in range(5):
            assert unary(b"after %d" % index, timeout=RPC_TIMEOUT) == b"after %d" % index
            time.sleep(0.1)
        messages = list(stream(b"20", timeout=RPC_TIMEOUT))
        assert len(messages) == 20
    assert mesh.age.calls["ServerStream"] >= 2


def test_grpc_proxy_connect_balances_per_request(mesh: Mesh) -> None:
    """grpcio with a proxy configured sends CONNECT grpc-echo.h2:8080 to the outbound port
    and speaks HTTP/2 in the tunnel; the proxy balances the tunnel's requests."""
    before = [backend.calls["Unary"] for backend in mesh.echo]
    proxy = f"http://{LOOPBACK}:{mesh.out.outbound_port}"
    options = [("grpc.http_proxy", proxy), *MESSAGE_OPTIONS]
    with grpc.insecure_channel(f"grpc-echo.{NS}:8080", options=options) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        for index in range(60):
            assert unary(b"via connect %d" % index, timeout=RPC_TIMEOUT) == (
                b"via connect %d" % index)
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(f"/{SERVICE}/Fail")(b"x", timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNKNOWN
    served = [backend.calls["Unary"] - old for backend, old in zip(mesh.echo, before,
                                                                    strict=True)]
    assert sum(served) == 60
    # Per-connection balancing would send all 60 to one endpoint. (Not all three: the one
    # that took the 10 MB upload keeps a high latency estimate for a while, see above.)
    assert sum(1 for count in served if count) >= 2, served


def test_port_mapped_upstream_serves_grpc(mesh: Mesh) -> None:
    options = MESSAGE_OPTIONS
    with grpc.insecure_channel(f"{LOOPBACK}:{mesh.mapped_port}", options=options) as channel:
        counts: Counter[str] = Counter()
        for _ in range(30):
            _, call = channel.unary_unary(f"/{SERVICE}/Unary").with_call(
                b"mapped", timeout=RPC_TIMEOUT)
            counts[dict(call.initial_metadata())["x-backend"]] += 1
    assert len(counts) >= 2, counts


# -- HTTP/2 clients: curl and h2load -----------------------------------------------------------


def test_curl_http2_prior_knowledge(mesh: Mesh) -> None:
    if mesh.web is None:
        pytest.skip("nginx is not installed")
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--http2-prior-knowledge", "-H",
         f"Host: web.{NS}", "-D", "-", f"http://{LOOPBACK}:{mesh.out.outbound_port}/"],
        capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("HTTP/2 200"), text
    assert "x-backend: web" in text
    assert text.endswith("hello from web\n")


def test_h2load_through_the_proxy(mesh: Mesh) -> None:
    if mesh.web is None:
        pytest.skip("nginx is not installed")
    result = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10", "-H", f":authority: web.{NS}",
         f"http://{LOOPBACK}:{mesh.out.outbound_port}/"],
        capture_output=True, timeout=60, check=False)
    text = result.stdout.decode()
    assert result.returncode == 0, text
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded", text), \
        text
    assert re.search(r"status codes: 2000 2xx", text), text


def test_drain_finishes_the_stream_in_flight(mesh: Mesh) -> None:
    """Last on purpose (it stops the age service's proxy): SIGTERM while a 2 s stream
    runs through it: GOAWAY to the client side, the stream still ends whole, exit 0."""
    proxy = next(child for child in mesh.inbound if child.name == "age")
    with mesh.channel(f"grpc-age.{NS}") as channel:
        stream = channel.unary_stream(f"/{SERVICE}/ServerStream")(b"40", timeout=RPC_TIMEOUT)
        first = next(stream)
        proxy.signal(signal.SIGTERM)
        rest = list(stream)
    assert [first, *rest] == [b"message %d" % index for index in range(40)]
    assert proxy.wait(30) == 0
    assert "drain timeout" not in proxy.log()
