"""The proxy's identity settings and the pieces of mutual TLS that need no processes:
flags and environment -> identity name and token, static endpoints with identities, which
SNI the inbound side terminates, the HTTP/1 pool over TLS (identity checked, pooled
connections kept per identity), the identity metrics' exposition, and the join token
minted from a state directory."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from shoal.kernel import identity_store as store
from shoal.kernel import pki, tokens
from shoal.proxy import tls
from shoal.proxy.config import load
from shoal.proxy.errors import IdentityUnavailable, UpstreamIdentityMismatch
from shoal.proxy.http1.client import Pool
from shoal.proxy.identity import IdentityError
from shoal.proxy.inbound import mesh_suffix
from shoal.proxy.metrics import IdentityCollector, ProxyMetrics

from .netutil import LOOPBACK, listener, port_of
from .test_tls_layer import SCHEME, Mesh

BUS = ["--nats", "nats://127.0.0.1:1"]  # resolved, never connected: config only
TOKEN_ENV = {"SHOAL_PROXY_IDENTITY_TOKEN": "shoal-jt1.x.y"}


# -- configuration ---------------------------------------------------------------------------


def test_identity_name_defaults_from_namespace_and_workload() -> None:
    config = load([*BUS, "--namespace", "emojivoto", "--service", "web", "--app-port", "80"],
                  TOKEN_ENV)
    assert config.identity == "web.emojivoto.serviceaccount.identity.shoal.cluster.local"
    assert config.identity_enabled and config.identity_token == "shoal-jt1.x.y"
    assert "shoal-jt1" not in repr(config)  # the token stays out of logs and reprs
    named = load([*BUS, "--namespace", "emojivoto", "--service", "web", "--serviceaccount",
                  "web-sa", "--trust-domain", "example.org", "--control-plane-namespace",
                  "mesh"], TOKEN_ENV)
    assert named.identity == "web-sa.emojivoto.serviceaccount.identity.mesh.example.org"
    workload = load([*BUS, "--service", "web", "--workload", "web-v2"], TOKEN_ENV)
    assert workload.identity.startswith("web-v2.default.")
    anonymous = load(BUS, TOKEN_ENV)  # no service, no workload: Kubernetes' default account
    assert anonymous.identity.startswith("default.default.")


def test_identity_off_without_a_bus_or_with_no_identity(tmp_path: Path) -> None:
    assert load(["--no-bus"], {}).identity == ""
    off = load([*BUS, "--service", "web", "--no-identity"], {})
    assert off.identity == "" and not off.identity_enabled
    token_file = tmp_path / "token"
    token_file.write_text("shoal-jt1.a.b\n")
    from_file = load([*BUS, "--identity-token-file", str(token_file)], {})
    assert from_file.identity_token_file == str(token_file) and from_file.identity_token == ""


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([*BUS, "--service", "web"], {}, "needs a bootstrap token"),
    ([*BUS, "--identity-token-file", "/nonexistent/token"], {}, "not a readable file"),
    ([*BUS, "--identity", "web.elsewhere.example"], TOKEN_ENV, "not an identity of this mesh"),
    ([*BUS, "--serviceaccount", "Bad_SA"], TOKEN_ENV, "identity:"),
    (["--no-bus", "--static-endpoint", "web.ns=127.0.0.1:80@bad_identity!"], {},
     "not an identity name"),
    ([*BUS, "--identity-min-refresh", "0"], TOKEN_ENV, "--identity-min-refresh"),
])
def test_bad_identity_settings_exit_2(argv: list[str], env: dict[str, str], message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        load(argv, env)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "bootstrap token" in message:  # the error says how to get one
        assert "shoal identity token -n default -s web" in err


def test_static_endpoints_carry_identities() -> None:
    identity = SCHEME.identity("nginx", "bench")
    config = load(["--no-bus", "--static-endpoint",
                   f"nginx.bench=127.0.0.1:80@{identity},127.0.0.2:81"], {})
    static = config.static[0]
    assert static.endpoints == (("127.0.0.1", 80), ("127.0.0.2", 81))
    assert static.identities == (identity, "")
    assert load(["--no-bus", "--static-endpoint", "a.b=127.0.0.1:1"], {}).static[0] \
        .identities == ()


# -- which TLS the inbound side terminates -----------------------------------------------------


def test_mesh_suffix() -> None:
    assert mesh_suffix("web.emojivoto.serviceaccount.identity.shoal.cluster.local") == \
        ".serviceaccount.identity.shoal.cluster.local"
    # A service account may contain dots; the suffix is still the mesh's.
    assert mesh_suffix("a.b.web.ns.serviceaccount.identity.mesh.example.org") == \
        ".serviceaccount.identity.mesh.example.org"


# -- the identity metrics -----------------------------------------------------------------------


def test_identity_metrics_keep_linkerds_names() -> None:
    metrics = ProxyMetrics()
    metrics.registry()  # a collector added after the registry exists is exposed too
    metrics.add_collector(IdentityCollector(lambda: {
        "identity_cert_expiration_timestamp_seconds": 1.7e9,
        "identity_cert_refresh_count": 3.0}))
    text = generate_latest(metrics.registry()).decode()
    assert "# TYPE identity_cert_expiration_timestamp_seconds gauge" in text
    assert "identity_cert_expiration_timestamp_seconds 1.7e+09" in text
    assert "# TYPE identity_cert_refresh_count untyped" in text
    assert "identity_cert_refresh_count 3.0" in text
    assert "identity_cert_refresh_count_total" not in text


# -- join tokens from code ---------------------------------------------------------------------


def test_mint_join_token_from_the_identity_directory(tmp_path: Path) -> None:
    identity_dir = tmp_path / "identity"
    store.init_identity(identity_dir, tmp_path / "anchor", store.IdentitySettings(), 1, 1,
                        dt.datetime.now(dt.UTC))
    minted = store.mint_join_token(identity_dir, "emojivoto", "web", 600, now=1000.0)
    assert minted.identity == "web.emojivoto.serviceaccount.identity.shoal.cluster.local"
    assert minted.expires_at == 1600.0
    material = store.load_service_material(identity_dir, dt.datetime.now(dt.UTC))
    claims = tokens.verify(minted.token, material.token_keys, 1100.0, "emojivoto", "web")
    assert isinstance(claims, tokens.JoinClaims)
    with pytest.raises(store.IdentityMaterialError):
        store.mint_join_token(tmp_path / "missing", "emojivoto", "web")
    with pytest.raises(pki.InvalidIdentityName):
        store.mint_join_token(identity_dir, "Bad_NS", "web")


# -- the HTTP/1 pool over TLS ---------------------------------------------------------------------


class Contexts:
    """A ClientTls: the test mesh's client context for "web", or not yet (None)."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.context = context

    def client_context(self, alpn: tuple[str, ...] | None = None) -> ssl.SSLContext:
        if self.context is None:
            raise IdentityError("not_ready", "no certificate yet")
        return self.context


async def _tls_server(context: ssl.SSLContext, seen: list[str | None]
                      ) -> tuple[socket.socket, asyncio.Task[None]]:
    """A listener whose connections get a TLS handshake with ``context``, and the ALPN
    each client offered recorded."""
    loop = asyncio.get_running_loop()
    server = listener()

    async def serve() -> None:
        while True:
            sock, _ = await loop.sock_accept(server)
            sock.setblocking(False)
            try:
                conn = await tls.terminate(loop, sock, context, b"")
            except (ssl.SSLError, OSError):
                seen.append(None)
                continue
            seen.append(conn.ssl_object.selected_alpn_protocol())
            conn.attach(asyncio.Protocol())

    return server, loop.create_task(serve())


async def test_pool_connects_over_tls_and_keeps_connections_per_identity() -> None:
    mesh = Mesh()
    voting, server_ctx, _ = mesh.contexts("voting")
    _, _, client_ctx = mesh.contexts("web", (tls.ALPN_HTTP1,))
    seen: list[str | None] = []
    server, serving = await _tls_server(server_ctx, seen)
    key = (LOOPBACK, port_of(server))
    pool = Pool(max_idle=4, idle_timeout=10, max_head_bytes=65536,
                tls_client=Contexts(client_ctx))
    try:
        conn = await pool.connect(key, 1.0, voting)
        assert conn.identity == voting and pool.handshakes == 1
        async with asyncio.timeout(5):  # TLS 1.3: the server finishes after the client
            while not seen:
                await asyncio.sleep(0.01)
        assert seen == [tls.ALPN_HTTP1]
        pool.put(conn, time.monotonic())
        # The endpoint's identity changed: the pooled connection is not handed out.
        assert pool.take(key, SCHEME.identity("emoji", "ns")) is None
        again = await pool.connect(key, 1.0, voting)
        pool.put(again, time.monotonic())
        assert pool.take(key, voting) is again
        # A server that is not who discovery said: refused before any request byte.
        with pytest.raises(UpstreamIdentityMismatch, match="Hostname mismatch"):
            await pool.connect(key, 1.0, SCHEME.identity("emoji", "ns"))
        # No certificate yet: a 503 that says so.
        waiting = Pool(max_idle=1, idle_timeout=1, max_head_bytes=1024,
                       tls_client=Contexts(None))
        with pytest.raises(IdentityUnavailable, match="no certificate yet"):
            await waiting.connect(key, 1.0, voting)
        # A pool without TLS ignores identities: plaintext, counted as such.
        plain = Pool(max_idle=1, idle_timeout=1, max_head_bytes=1024)
        bare = await plain.connect(key, 1.0, voting)
        assert bare.identity == ""
        bare.close()
    finally:
        pool.close_all()
        serving.cancel()
        server.close()
