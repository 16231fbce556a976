"""Mutual TLS between real proxies: the identity service, the destination service and
four proxies as child processes on the session's NATS, each proxy certified with a join
token, clients that are real programs and libraries (curl, httpx, raw sockets).

Layout (namespace "mtls"; every leaf lives 6 s, so every proxy renews every ~4 s the
whole time these tests run, and the load tests see several renewals):
  out    outbound port; port-mapped echo.mtls:7000, spyecho.mtls:7000
  web    inbound -> HttpApp "web"            echo   inbound -> TCP echo
A recording relay (``Spy``) sits between the out proxy and the web / echo proxies for
the services ``spied`` and ``spyecho``: the endpoints registered for them point at it,
with the real proxies' identities, so what crosses the wire between proxies can be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from shoal.kernel import identity_store as store
from shoal.kernel import pki
from shoal.proxy import tls
from shoal.proxy.admin import ProxyIdentityInfo
from shoal.schemas import names
from shoal.schemas.codec import encode
from shoal.schemas.endpoints import Deregistration, Registration

from .apps import LOOPBACK, HttpApp, TcpEcho, free_port, free_ports
from .conftest import REPO, Bus
from .identity_support import clear_trust_bundle
from .proxyproc import Child, ProxyProcess, destination, proxy_env

NS = "mtls"
SCHEME = pki.NameScheme()
LEAF_LIFETIME = "6s"  # the brief's fallback: a 30 s leaf needs minutes for several cycles
ROUTE_TIMEOUT_SECONDS = 15.0
ROTATION_STEP_TIMEOUT_SECONDS = 20.0  # reload (2 s poll) + a renewal (~4 s) + slack
LOAD_RATE = 100  # operations per second: HTTP requests and new opaque connections
IO_TIMEOUT_SECONDS = 10.0


def identity(serviceaccount: str) -> str:
    return SCHEME.identity(serviceaccount, NS)


class Spy:
    """A TCP relay that records every byte in both directions, per connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream: list[bytearray] = []  # client -> server, one per connection
        self.downstream: list[bytearray] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> Spy:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up, down = bytearray(), bytearray()
        self.upstream.append(up)
        self.downstream.append(down)
        try:
            async with asyncio.timeout(60):
                target_reader, target_writer = await asyncio.open_connection(
                    LOOPBACK, self.target_port)
                await asyncio.gather(_pump(reader, target_writer, up),
                                     _pump(target_reader, writer, down))
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                record: bytearray) -> None:
    try:
        while data := await reader.read(65536):
            record += data
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


@dataclass
class Mesh:
    bus: Bus
    identity_dir: Path
    anchor_dir: Path
    out: ProxyProcess
    web_proxy: ProxyProcess
    echo_proxy: ProxyProcess
    web: HttpApp
    echo_port: int  # the out proxy's port-mapped upstream for echo.mtls
    spyecho_port: int  # ... and for spyecho.mtls (through the echo spy)
    spy: Spy  # in front of the web proxy's inbound port
    echo_spy: Spy  # in front of the echo proxy's inbound port
    children: list[Child]
    log_dir: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.out.outbound_port}"

    @property
    def proxies(self) -> tuple[ProxyProcess, ...]:
        return (self.out, self.web_proxy, self.echo_proxy)


def _wait_routed(port: int, host: str) -> None:
    deadline = time.monotonic() + ROUTE_TIMEOUT_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"http://{LOOPBACK}:{port}/", headers={"Host": host}, timeout=5)
            if last.status_code < 500:
                return
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.1)
    raise AssertionError(f"{host} never routed: {last!r}")


async def _publish(bus: Bus, *messages: Registration | Deregistration) -> None:
    nc = await bus.client("controller")
    try:
        for message in messages:
            await nc.publish(names.REGISTER, encode(message))
        await nc.flush()
    finally:
        await nc.close()


def _registration(service: str, port: int, identity_name: str) -> Registration:
    return Registration(namespace=NS, service=service, workload=service, pod=f"{service}-0",
                        address=LOOPBACK, port=port, identity=identity_name,
                        ttl_seconds=3600)


@pytest.fixture(scope="module")
async def mesh(bus: Bus, buckets: None, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[Mesh]:
    await clear_trust_bundle(bus)
    tmp = tmp_path_factory.mktemp("mtls")
    log_dir = tmp / "logs"
    log_dir.mkdir()
    identity_dir, anchor_dir = tmp / "identity", tmp / "identity-anchor"
    store.init_identity(identity_dir, anchor_dir, store.IdentitySettings(), 365, 365,
                        store_now())
    controller_env = proxy_env(bus.env("controller"))
    health = free_port()
    identity_service = Child("identity", [
        sys.executable, "-m", "shoal.services.identity", "--identity-dir", str(identity_dir),
        "--leaf-lifetime", LEAF_LIFETIME, "--health-port", str(health)],
        controller_env, log_dir)
    dest, dest_port = destination(controller_env, log_dir)
    web, echo = HttpApp("web").start(), TcpEcho()

    def env(serviceaccount: str) -> dict[str, str]:
        token = store.mint_join_token(identity_dir, NS, serviceaccount, 3600).token
        return {**proxy_env(bus.env("proxy")), "SHOAL_PROXY_IDENTITY_TOKEN": token}

    fast = ("--identity-min-refresh", "0.5", "--namespace", NS)
    echo_local, spyecho_local = free_ports(2)
    out = ProxyProcess("out", env("client"), log_dir, *fast, "--service", "client",
                       "--failfast-timeout", "2", "--upstream", f"{echo_local}=echo.{NS}:7000",
                       "--upstream", f"{spyecho_local}=spyecho.{NS}:7000", identity=True)
    web_proxy = ProxyProcess("web", env("web"), log_dir, *fast, "--service", "web",
                             outbound=False, app_port=web.port, identity=True)
    echo_proxy = ProxyProcess("echo", env("echo"), log_dir, *fast, "--service", "echo",
                              outbound=False, app_port=echo.port, identity=True)
    children: list[Child] = [identity_service, dest, out, web_proxy, echo_proxy]
    spy = echo_spy = None
    try:
        for child in children:
            child.start()
        await asyncio.to_thread(identity_service.wait_http_ok, health, "/ready")
        await asyncio.to_thread(dest.wait_http_ok, dest_port, "/ready")
        for proxy in (out, web_proxy, echo_proxy):
            await asyncio.to_thread(proxy.wait_ready)
        spy = await Spy(web_proxy.inbound_port).start()
        echo_spy = await Spy(echo_proxy.inbound_port).start()
        await _publish(bus, _registration("spied", spy.port, identity("web")),
                       _registration("spyecho", echo_spy.port, identity("echo")))
        for host in (f"web.{NS}", f"spied.{NS}"):
            await asyncio.to_thread(_wait_routed, out.outbound_port, host)
        yield Mesh(bus, identity_dir, anchor_dir, out, web_proxy, echo_proxy, web,
                   echo_local, spyecho_local, spy, echo_spy, children, log_dir)
    finally:
        for child in reversed(children):
            child.stop()
        for relay in (spy, echo_spy):
            if relay is not None:
                await relay.close()
        web.stop()
        echo.stop()
        await clear_trust_bundle(bus)


def store_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def show_logs(mesh: Mesh, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for child in mesh.children:
            print(f"--- {child.name} ---\n{child.log()[-3000:]}")


async def _identity_info(proxy: ProxyProcess) -> ProxyIdentityInfo:
    import msgspec

    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://{LOOPBACK}:{proxy.admin_port}/identity")
    assert response.status_code == 200, response.text
    return msgspec.json.decode(response.content, type=ProxyIdentityInfo)


async def _opaque_echo(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # the echo answers, then half-closes after the last byte
        return await reader.read(-1)
    finally:
        writer.close()


# -- on the wire ---------------------------------------------------------------------------


async def test_traffic_between_proxies_is_tls_with_alpn(mesh: Mesh) -> None:
    secret_path, secret_body = "/echo?secret-path-7f3a", b"secret-body-0c91" * 64
    before = sum(len(record) for record in mesh.spy.upstream)
    async with httpx.AsyncClient(timeout=IO_TIMEOUT_SECONDS) as client:
        response = await client.post(f"{mesh.url}{secret_path}", content=secret_body,
                                     headers={"Host": f"spied.{NS}"})
    assert response.status_code == 200, response.headers
    assert response.json()["sha256"] == hashlib.sha256(secret_body).hexdigest()
    after = sum(len(record) for record in mesh.spy.upstream)
    assert after - before > len(secret_body), "the request did not cross the spy"
    # Every connection between the proxies opened with a TLS ClientHello for the web
    # proxy's identity offering the HTTP/1 transport (pooled: the test's request may
    # travel on a connection opened earlier) ...
    for record in mesh.spy.upstream:
        hello = tls.parse_client_hello(bytes(record))
        assert hello == tls.ClientHello(server_name=identity("web"), alpn=(tls.ALPN_HTTP1,))
    # ... and nothing readable either way: no request line, body, header or answer.
    wire = b"".join(bytes(r) for r in (*mesh.spy.upstream, *mesh.spy.downstream))
    for plaintext in (b"secret-path", b"secret-body", b"POST ", b"HTTP/1.1", b"x-backend",
                      response.json()["sha256"].encode()):
        assert plaintext not in wire, plaintext
    # Opaque TCP to a meshed endpoint: TLS with the opaque transport, half-close kept.
    payload = b"opaque-secret-5d2e" + os.urandom(200_000)
    async with asyncio.timeout(IO_TIMEOUT_SECONDS):
        echoed = await _opaque_echo(mesh.spyecho_port, payload)
    assert echoed == payload
    opaque_up = bytes(mesh.echo_spy.upstream[-1])
    assert tls.parse_client_hello(opaque_up) == tls.ClientHello(
        server_name=identity("echo"), alpn=(tls.ALPN_OPAQUE,))
    assert b"opaque-secret" not in opaque_up
    assert b"opaque-secret" not in mesh.echo_spy.downstream[-1]


async def test_connect_tunnel_to_a_meshed_endpoint(mesh: Mesh) -> None:
    """CONNECT (what clients honouring http_proxy send for https and WebSocket): the
    tunnel to the peer proxy is TLS offering no protocol, and the peer detects what is
    inside (here HTTP/1, sent by curl through the tunnel)."""
    before = mesh.web.requests
    result = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--max-time", "10", "-p", "-x", mesh.url, f"http://web.{NS}/tunneled"],
        capture_output=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from web\n"
    assert mesh.web.requests == before + 1 and mesh.web.paths[-1] == "/tunneled"


async def test_server_identity_mismatch_is_refused_with_502(mesh: Mesh, show_logs: None
                                                            ) -> None:
    # Discovery says the endpoint is "voting", but the proxy there proves "web".
    await _publish(mesh.bus, _registration("impostor", mesh.web_proxy.inbound_port,
                                           identity("voting")))
    requests_before = mesh.web.requests
    deadline = time.monotonic() + ROUTE_TIMEOUT_SECONDS
    async with httpx.AsyncClient(timeout=IO_TIMEOUT_SECONDS) as client:
        while True:
            response = await client.get(f"{mesh.url}/must-not-arrive",
                                        headers={"Host": f"impostor.{NS}"})
            if response.status_code != 503 or time.monotonic() > deadline:
                break  # 503 until the endpoint is discovered
            await asyncio.sleep(0.1)
    assert response.status_code == 502
    reason = response.headers["shoal-proxy-error"]
    assert f"is not {identity('voting')}" in reason and "Hostname mismatch" in reason
    assert response.headers["l5d-proxy-error"] == reason
    assert mesh.web.requests == requests_before
    assert "/must-not-arrive" not in mesh.web.paths
    await _publish(mesh.bus, Deregistration(namespace=NS, service="impostor", pod="impostor-0",
                                            address=LOOPBACK, port=mesh.web_proxy.inbound_port))


async def test_non_meshed_client_still_reaches_the_inbound_port(mesh: Mesh) -> None:
    result = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--max-time", "10", f"http://{LOOPBACK}:{mesh.web_proxy.inbound_port}/"],
        capture_output=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from web\n"
    # A TLS client that is not a mesh proxy (no certificate, another SNI) is the app's
    # business: relayed untouched, so a plaintext app sees garbage and answers 400.
    plain_tls = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "-k", "--max-time", "10",
        f"https://{LOOPBACK}:{mesh.web_proxy.inbound_port}/"],
        capture_output=True, timeout=20, check=False)
    assert plain_tls.returncode != 0  # an HTTP app does not speak TLS
    text = await asyncio.to_thread(mesh.web_proxy.metrics)
    assert 'no_tls_reason="no_tls_from_remote"' in text
    assert 'tls="opaque"' in text  # the passthrough connection


async def test_metrics_have_tls_labels_and_identity_metrics(mesh: Mesh) -> None:
    async with httpx.AsyncClient(timeout=IO_TIMEOUT_SECONDS) as client:
        assert (await client.get(f"{mesh.url}/", headers={"Host": f"web.{NS}"})
                ).status_code == 200
    async with asyncio.timeout(IO_TIMEOUT_SECONDS):
        assert await _opaque_echo(mesh.echo_port, b"ping") == b"ping"
    out = await asyncio.to_thread(mesh.out.metrics)
    server = f'server_id="{identity("web")}"'
    assert any("request_total{" in line and server in line and 'tls="true"' in line
               and 'direction="outbound"' in line for line in out.splitlines()), out
    assert any(line.startswith("tcp_open_total{") and 'peer="dst"' in line and server in line
               for line in out.splitlines())
    assert any(line.startswith("tcp_open_total{") and 'protocol="opaque"' in line
               and f'server_id="{identity("echo")}"' in line for line in out.splitlines())
    assert 'no_tls_reason="loopback"' in out  # the app's own connections to its proxy
    assert "# TYPE identity_cert_refresh_count untyped" in out
    assert "identity_cert_refresh_count_total" not in out
    expiry = _sample(out, "identity_cert_expiration_timestamp_seconds")
    assert time.time() < expiry < time.time() + 30  # a 6 s leaf
    inbound = await asyncio.to_thread(mesh.web_proxy.metrics)
    client_id = f'client_id="{identity("client")}"'
    assert any("request_total{" in line and client_id in line and 'direction="inbound"' in line
               and 'tls="true"' in line for line in inbound.splitlines()), inbound
    echo = await asyncio.to_thread(mesh.echo_proxy.metrics)
    assert any(line.startswith("tcp_open_total{") and 'protocol="opaque"' in line
               and client_id in line for line in echo.splitlines()), echo


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the exposition")


async def test_identity_show_prints_a_proxys_identity(mesh: Mesh) -> None:
    address = f"{LOOPBACK}:{mesh.web_proxy.admin_port}"
    before = await _identity_info(mesh.web_proxy)
    shown = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "shoal.cli", "identity", "show", "--admin", address],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    after = await _identity_info(mesh.web_proxy)
    assert shown.returncode == 0, shown.stderr
    assert identity("web") in shown.stdout
    assert "ready      yes" in shown.stdout and "trust anchors: 1" in shown.stdout
    # The leaves live 6 s: the proxy may have renewed while the command ran.
    serial = next(line.split()[1] for line in shown.stdout.splitlines()
                  if line.strip().startswith("serial"))
    assert serial in (before.serial, after.serial)
    as_json = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "shoal.cli", "identity", "show", "--admin", address, "-o",
        "json"], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert json.loads(as_json.stdout)["identity"] == identity("web")
    # A proxy without identity, and nothing listening: clear errors, exit 1.
    gone = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "shoal.cli", "identity", "show", "--admin",
        f"{LOOPBACK}:{free_port()}"], capture_output=True, text=True, cwd=REPO, timeout=60,
        check=False)
    assert gone.returncode == 1 and "cannot reach" in gone.stderr


# -- renewals and rotations under load ---------------------------------------------------------


@dataclass
class Load:
    """LOAD_RATE operations a second until stopped: even ones an HTTP request through the
    outbound port (pooled TLS connections), odd ones a new opaque connection through a
    port-mapped upstream (a new TLS handshake every time)."""

    mesh: Mesh
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    opaque_ok: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / LOAD_RATE
        tasks: set[asyncio.Task[None]] = set()
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(timeout=IO_TIMEOUT_SECONDS, limits=limits) as client:
            due = loop.time()
            n = 0
            while not self.stop.is_set():
                task = loop.create_task(self._http(client) if n % 2 == 0 else self._opaque(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
                due += interval
                await asyncio.sleep(max(0.0, due - loop.time()))
            if tasks:
                await asyncio.wait(tasks, timeout=IO_TIMEOUT_SECONDS * 2)

    async def _http(self, client: httpx.AsyncClient) -> None:
        try:
            response = await client.get(f"{self.mesh.url}/", headers={"Host": f"web.{NS}"})
            if response.status_code == 200 and response.text == "hello from web\n":
                self.ok += 1
            else:
                self.failures.append(f"http {response.status_code} "
                                     f"{response.headers.get('shoal-proxy-error')}")
        except httpx.HTTPError as error:
            self.failures.append(f"http {type(error).__name__}: {error}")

    async def _opaque(self, n: int) -> None:
        payload = f"opaque {n} ".encode() * 50
        try:
            async with asyncio.timeout(IO_TIMEOUT_SECONDS):
                echoed = await _opaque_echo(self.mesh.echo_port, payload)
            if echoed == payload:
                self.ok += 1
                self.opaque_ok += 1
            else:
                self.failures.append(f"opaque {n}: {len(echoed)} of {len(payload)} bytes")
        except (OSError, TimeoutError) as error:
            self.failures.append(f"opaque {n}: {type(error).__name__}: {error}")


@contextlib.asynccontextmanager
async def under_load(mesh: Mesh) -> AsyncIterator[Load]:
    load = Load(mesh)
    task = asyncio.create_task(load.run())
    try:
        yield load
    finally:
        load.stop.set()
        await asyncio.wait_for(task, IO_TIMEOUT_SECONDS * 3)


async def test_short_leaves_renewed_for_several_cycles_under_load(mesh: Mesh,
                                                                 show_logs: None) -> None:
    before = {proxy.name: (await _identity_info(proxy)) for proxy in mesh.proxies}
    async with under_load(mesh) as load:
        await asyncio.sleep(20.0)
    after = {proxy.name: (await _identity_info(proxy)) for proxy in mesh.proxies}
    assert load.failures == [], load.failures[:5]
    assert load.ok >= 20.0 * LOAD_RATE * 0.8, load.ok  # the rate was really held
    assert load.opaque_ok >= 20.0 * LOAD_RATE * 0.4  # each one a new TLS handshake
    for name, info in after.items():
        # 20 s of 6 s leaves renewed at 70%: four renewals, at least three seen here.
        assert info.refresh_count - before[name].refresh_count >= 3, (name, info)
        assert info.ready and info.not_after > time.time()


async def _wait_all(mesh: Mesh, check: str, predicate: object) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + ROTATION_STEP_TIMEOUT_SECONDS
    while True:
        infos = [await _identity_info(proxy) for proxy in mesh.proxies]
        if all(predicate(info) for info in infos):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{check} not reached: {infos}")
        await asyncio.sleep(0.2)


def _key_id(cert_path: Path) -> str:
    cert = pki.certs_from_pem(cert_path.read_bytes())[0]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return ski.value.digest.hex()


def _fingerprints(info: ProxyIdentityInfo) -> set[str]:
    return {anchor.fingerprint for anchor in info.trust_anchors}


async def test_issuer_and_anchor_rotation_under_load(mesh: Mesh, show_logs: None) -> None:
    ident, anchor_dir = mesh.identity_dir, mesh.anchor_dir
    old_anchor = pki.fingerprint(store.read_bundle(ident)[0])
    async with under_load(mesh) as load:
        await asyncio.sleep(1.0)
        # The issuer: a new one under the same anchor; proxies move as they renew.
        store.rotate_issuer(ident, anchor_dir, 365, store_now())
        new_issuer = _key_id(ident / store.ISSUER_CERT_FILE)
        await _wait_all(mesh, "leaves from the new issuer",
                        lambda info: info.issuer_key_id == new_issuer)
        # The anchor, step 1: the new anchor is trusted beside the old one.
        added = store.rotate_anchor_add(ident, anchor_dir, 365, store_now())
        await _wait_all(mesh, "both anchors trusted",
                        lambda info: _fingerprints(info) == {old_anchor, added.fingerprint})
        # Step 2: leaves from an issuer under the new anchor.
        store.rotate_anchor_issuer(ident, anchor_dir, 365, store_now())
        next_issuer = _key_id(ident / store.ISSUER_CERT_FILE)
        await _wait_all(mesh, "leaves under the new anchor",
                        lambda info: info.issuer_key_id == next_issuer)
        # Step 3 (forced: the leaves are 6 s, every proxy has renewed): the old anchor goes.
        store.rotate_anchor_remove(ident, anchor_dir, store_now(), force=True)
        await _wait_all(mesh, "only the new anchor trusted",
                        lambda info: _fingerprints(info) == {added.fingerprint})
        handshakes_before = load.opaque_ok
        await asyncio.sleep(2.0)  # new handshakes under the new anchor alone
    assert load.failures == [], load.failures[:5]
    assert load.opaque_ok - handshakes_before >= LOAD_RATE * 0.5
    assert load.ok > 0
