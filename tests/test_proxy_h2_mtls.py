"""gRPC between two proxies over mutual TLS (ALPN h2): client -> outbound proxy =mTLS=>
inbound proxy -> grpcio server, each proxy certified by the real identity service (a
child process) with a join token, discovery through the session bus and the real
destination service."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shoal.proxy.config import IDENTITY_TOKEN_ENV

from .apps import LOOPBACK, free_port
from .conftest import Bus
from .grpcapps import MESSAGE_OPTIONS, SERVICE, GrpcBackend
from .identity_support import SCHEME, clear_trust_bundle, join_token, make_material
from .proxyproc import Child, ProxyProcess, destination, proxy_env

NS = "h2tls"
ROUTE_TIMEOUT_SECONDS = 30.0  # certify, register, destination, watch: bounded
RPC_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def mesh(bus: Bus, buckets: None, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[ProxyProcess, ProxyProcess, GrpcBackend]]:
    asyncio.run(clear_trust_bundle(bus))
    tmp = tmp_path_factory.mktemp("h2tls")
    identity_dir, _ = make_material(tmp)
    log_dir = tmp / "logs"
    log_dir.mkdir()
    health = free_port()
    identity = Child("identity", [sys.executable, "-m", "shoal.services.identity",
                                  "--identity-dir", str(identity_dir), "--health-port",
                                  str(health), "--log-level", "warning"],
                     proxy_env(bus.env("controller")), log_dir)
    dest, dest_port = destination(proxy_env(bus.env("controller")), log_dir)
    backend = GrpcBackend("sec")
    env = proxy_env(bus.env("proxy"))
    out = ProxyProcess("out", {**env, IDENTITY_TOKEN_ENV: join_token(identity_dir, NS, "client")},
                       log_dir, "--namespace", NS, "--serviceaccount", "client", identity=True)
    inbound = ProxyProcess(
        "sec", {**env, IDENTITY_TOKEN_ENV: join_token(identity_dir, NS, "grpc-sec")}, log_dir,
        "--namespace", NS, "--service", "grpc-sec", outbound=False, app_port=backend.port,
        identity=True)
    children = [identity, dest, out, inbound]
    try:
        for child in children:
            child.start()
        backend.start()
        identity.wait_http_ok(health, "/ready")
        dest.wait_http_ok(dest_port, "/ready")
        out.wait_ready()
        inbound.wait_ready()
        yield out, inbound, backend
    except BaseException:
        for child in children:
            print(f"--- {child.name} ---\n{child.log()[-2000:]}")
        raise
    finally:
        for child in reversed(children):
            child.stop()
        backend.stop()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            if all(found.get(key) == value for key, value in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_grpc_over_mutual_tls_between_proxies(
        mesh: tuple[ProxyProcess, ProxyProcess, GrpcBackend], tmp_path: Path) -> None:
    out, inbound, backend = mesh
    options = [("grpc.default_authority", f"grpc-sec.{NS}:8080"), *MESSAGE_OPTIONS]
    with grpc.insecure_channel(f"{LOOPBACK}:{out.outbound_port}", options=options) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        deadline = time.monotonic() + ROUTE_TIMEOUT_SECONDS
        while True:
            try:
                assert unary(b"secret", timeout=5) == b"secret"
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        sent = [b"tls %d" % index for index in range(200)]
        assert list(channel.stream_stream(f"/{SERVICE}/Bidi")(iter(sent),
                                                                timeout=RPC_TIMEOUT)) == sent
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(f"/{SERVICE}/Fail")(b"x", timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNKNOWN
    server_id = SCHEME.identity("grpc-sec", NS)
    client_id = SCHEME.identity("client", NS)
    outbound = out.metrics()
    assert _metric(outbound, "response_total", direction="outbound", tls="true",
                   server_id=server_id, grpc_status_code="0") >= 2
    assert _metric(outbound, "response_total", direction="outbound", tls="true",
                   server_id=server_id, grpc_status_code="2",
                   classification="failure") >= 1
    assert _metric(inbound.metrics(), "response_total", direction="inbound", tls="true",
                   client_id=client_id, grpc_status_code="0") >= 2
    assert backend.calls["Bidi"] == 1
