"""The proxy's fixed settings: one frozen ``ProxyConfig``, built once from flags and
``SHOAL_PROXY_*`` environment variables and passed in (live handles are in runtime.py).

Every flag has an environment variable named after it (``--outbound-port`` ->
``SHOAL_PROXY_OUTBOUND_PORT``); a flag wins over the variable. Repeatable flags
(``--upstream``, ``--static-endpoint``) take several values from their variable separated
by spaces or ``;``. The bus comes from ``--nats`` / ``SHOAL_NATS_URL`` (with
``SHOAL_NATS_USER``/``SHOAL_NATS_PASSWORD``) or from the bus file ``shoal up`` writes.
Every limit below is a named constant with the reason for its value; docs/proxy.md lists
them all.

Identity (mutual TLS between proxies) is on whenever there is a bus, unless
``--no-identity``: the name is ``<serviceaccount>.<namespace>.serviceaccount.identity.
<control-plane-namespace>.<trust-domain>`` (``--serviceaccount`` defaults to the
workload), and the bootstrap token comes from ``SHOAL_PROXY_IDENTITY_TOKEN`` (no flag on
purpose: command lines are visible to every user through ``ps``) or
``--identity-token-file`` (read at every renewal, so replacing the file rotates it).
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shoal.kernel import pki
from shoal.kernel.config import BusNotFound, BusSettings, resolve_bus
from shoal.schemas.names import is_dns_label

from .detect import DEFAULT_OPAQUE_PORTS, DETECT_TIMEOUT_SECONDS
from .discover import INBOUND_FAILFAST_SECONDS, OUTBOUND_FAILFAST_SECONDS
from .identity import MIN_REFRESH_SECONDS

ENV_PREFIX = "SHOAL_PROXY_"

# Ports: Linkerd's, so operators feel at home. 0 turns a listener off.
DEFAULT_OUTBOUND_PORT = 4140
DEFAULT_INBOUND_PORT = 4143
DEFAULT_ADMIN_PORT = 4191
DEFAULT_NAMESPACE = "default"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
# Kubernetes gives a pod without a service account the namespace's "default" one.
DEFAULT_SERVICEACCOUNT = "default"
IDENTITY_TOKEN_ENV = ENV_PREFIX + "IDENTITY_TOKEN"

# HTTP/1 limits.
# Request line + headers: 64 KiB, well above what browsers send (~8 KiB is nginx's
# large_client_header_buffers unit) and far below hyper's ~400 KiB buffer; beyond -> 431.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
# hyper (under linkerd2-proxy) refuses more than 100 header fields; so do we (431).
MAX_HEADERS = 100
# A request target longer than nginx's 8 KiB header buffer is refused with 414.
MAX_REQUEST_TARGET_BYTES = 8 * 1024
# The same bound for response heads from upstreams; beyond it the response is a 502.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
# Body bytes held per request while its upstream connection is being set up; beyond
# it reading pauses. One asyncio write-buffer high-water mark.
MAX_PENDING_BODY_BYTES = 64 * 1024

# HTTP/2 (proxy/http2/). What a peer may make the proxy hold is bounded by the windows we
# advertise: a stream's bytes wait in the proxy only while the other side cannot take them.
# Streams a peer may open at once per connection: RFC 9113 6.5.2 asks for at least 100;
# h2's default is 100 and nginx's 128. Also the most streams the proxy opens on one upstream
# connection before it opens another.
H2_MAX_CONCURRENT_STREAMS = 100
# Receive window per stream: the most one stream can make the proxy hold. 256 KiB keeps a
# loopback or LAN hop streaming at hundreds of MB/s with one WINDOW_UPDATE per 128 KiB
# (gRPC starts at 64 KiB and grows with its BDP estimate up to MBs).
H2_STREAM_WINDOW = 256 * 1024
# Receive window per connection: every stream's window at once, so a stalled stream never
# blocks the others on a shared connection; the most one connection can make us hold.
H2_CONNECTION_WINDOW = H2_MAX_CONCURRENT_STREAMS * H2_STREAM_WINDOW
# Largest frame we accept: four times the 16 KiB default, so a large body costs a quarter
# of the frames (each frame is several Python calls in the codec).
H2_MAX_FRAME_SIZE = 64 * 1024
# Header list (decoded): the HTTP/1 request head bound; h2 refuses more (ENHANCE_YOUR_CALM).
H2_MAX_HEADER_LIST_SIZE = MAX_REQUEST_HEAD_BYTES
# HTTP/2 connections to one endpoint (each carries up to H2_MAX_CONCURRENT_STREAMS); a
# request finding them all full is refused with 503 rather than queued without bound.
H2_MAX_CONNECTIONS_PER_ENDPOINT = 8
# An upstream HTTP/2 connection without streams this long is closed: below nginx's 75 s
# keepalive_timeout, the shortest common HTTP/2 server default, so we close first.
H2_POOL_IDLE_TIMEOUT_SECONDS = 30.0
# Bytes queued on a connection whose peer does not read. DATA is flow-controlled and stops
# at the write-buffer high-water mark, so only control frames (PING and SETTINGS acks,
# resets) grow past it; a peer that keeps sending those without reading is cut off
# (GOAWAY ENHANCE_YOUR_CALM) past this.
H2_MAX_WRITE_BACKLOG = 4 * 1024 * 1024

# Timeouts (seconds).
# Connecting to an endpoint: Linkerd's outbound 1 s and inbound 100 ms (the app is local).
OUTBOUND_CONNECT_TIMEOUT_SECONDS = 1.0
INBOUND_CONNECT_TIMEOUT_SECONDS = 0.1
# No endpoint available: Linkerd fails fast after 3 s outbound and 1 s inbound (503);
# OUTBOUND_FAILFAST_SECONDS and INBOUND_FAILFAST_SECONDS come from discover.py.
# From the first byte of a request to the end of its head (slow-loris bound; 408).
REQUEST_HEAD_TIMEOUT_SECONDS = 10.0
# From sending a request to its response head (504). Per-route timeouts come with
# policy; this default only ends requests nobody will ever answer. 0 turns it off.
RESPONSE_TIMEOUT_SECONDS = 60.0
# A client keep-alive connection with no request in progress (nginx uses 75 s, Node 5 s).
IDLE_TIMEOUT_SECONDS = 60.0
# No byte in either direction on a streaming body or a tunnel (WebSocket, CONNECT).
STREAM_IDLE_TIMEOUT_SECONDS = 600.0
# SIGTERM or POST /shutdown: in-flight requests get this long (as the control plane's).
DRAIN_TIMEOUT_SECONDS = 10.0
# After deregistering, keep serving this long so peers' proxies stop picking us first.
DEREGISTER_GRACE_SECONDS = 0.5

# Upstream connections.
# Idle keep-alive connections kept per endpoint: more than one client's usual concurrency
# (wrk -c50, a browser's 6 per host) so a steady load reconnects never; extra ones close.
POOL_MAX_IDLE_PER_ENDPOINT = 256
# Below Node.js's 5 s keepAliveTimeout, the shortest common server default, so the
# proxy seldom picks a connection the server is closing.
POOL_IDLE_TIMEOUT_SECONDS = 3.0
# The same for TLS connections to meshed endpoints: their server is a Shoal inbound
# proxy, which closes idle clients after IDLE_TIMEOUT_SECONDS (60 s), so half of that
# still closes first; and each new one costs a TLS handshake (~2.6 ms of CPU across both
# proxies with OpenSSL 3.0, measured in docs/proxy.md), worth keeping rare.
POOL_MESHED_IDLE_TIMEOUT_SECONDS = 30.0
# Endpoints tried when connecting fails before any request byte was sent.
MAX_CONNECT_ATTEMPTS = 3
# Accepted client connections per proxy; more are closed at once (a file-descriptor bound
# with headroom under the usual 65536 limit, each may hold an upstream and a pipe).
MAX_CONNECTIONS = 10_000
# How often time limits are checked: the resolution of every timeout above.
SWEEP_INTERVAL_SECONDS = 1.0


class ConfigError(ValueError):
    """A flag or environment variable has a value the proxy cannot use."""


@dataclass(frozen=True)
class Http1Settings:
    max_request_head_bytes: int = MAX_REQUEST_HEAD_BYTES
    max_headers: int = MAX_HEADERS
    max_request_target_bytes: int = MAX_REQUEST_TARGET_BYTES
    max_response_head_bytes: int = MAX_RESPONSE_HEAD_BYTES
    max_pending_body_bytes: int = MAX_PENDING_BODY_BYTES
    max_connect_attempts: int = MAX_CONNECT_ATTEMPTS
    request_head_timeout: float = REQUEST_HEAD_TIMEOUT_SECONDS
    response_timeout: float = RESPONSE_TIMEOUT_SECONDS
    idle_timeout: float = IDLE_TIMEOUT_SECONDS
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT_SECONDS


@dataclass(frozen=True)
class Http2Settings:
    max_concurrent_streams: int = H2_MAX_CONCURRENT_STREAMS
    stream_window: int = H2_STREAM_WINDOW
    connection_window: int = H2_CONNECTION_WINDOW
    max_frame_size: int = H2_MAX_FRAME_SIZE
    max_header_list_size: int = H2_MAX_HEADER_LIST_SIZE
    max_connections_per_endpoint: int = H2_MAX_CONNECTIONS_PER_ENDPOINT
    pool_idle_timeout: float = H2_POOL_IDLE_TIMEOUT_SECONDS
    max_write_backlog: int = H2_MAX_WRITE_BACKLOG


@dataclass(frozen=True)
class DirectionSettings:
    """Connecting to endpoints, per direction (Linkerd's outbound and inbound differ)."""

    connect_timeout: float
    failfast_timeout: float
    pool_max_idle: int = POOL_MAX_IDLE_PER_ENDPOINT
    pool_idle_timeout: float = POOL_IDLE_TIMEOUT_SECONDS
    pool_meshed_idle_timeout: float = POOL_MESHED_IDLE_TIMEOUT_SECONDS


@dataclass(frozen=True)
class ServiceName:
    namespace: str
    service: str

    def __str__(self) -> str:
        return f"{self.service}.{self.namespace}"


@dataclass(frozen=True)
class PortMapping:
    """``--upstream LOCALPORT=service.namespace[:PORT]``: a local port for one service."""

    local_port: int
    target: ServiceName
    port: int | None  # the service's port: decides opaque vs detected, labels metrics


@dataclass(frozen=True)
class StaticService:
    """``--static-endpoint service.namespace=HOST:PORT[@IDENTITY][,...]``: endpoints known
    without discovery (benchmarks, a proxy without a bus). ``@IDENTITY`` says the
    endpoint is a meshed proxy with that identity (mutual TLS to it)."""

    target: ServiceName
    endpoints: tuple[tuple[str, int], ...]
    identities: tuple[str, ...] = ()  # one per endpoint ("": none); empty: none at all


@dataclass(frozen=True)
class ProxyConfig:
    namespace: str = DEFAULT_NAMESPACE
    service: str = ""
    workload: str = ""
    pod: str = ""
    identity: str = ""  # this proxy's identity name; "" runs without identity (no TLS)
    serviceaccount: str = ""
    identity_token: str = field(default="", repr=False)  # a secret: kept out of reprs
    identity_token_file: str = ""
    identity_min_refresh: float = MIN_REFRESH_SECONDS
    listen_host: str = "127.0.0.1"
    inbound_host: str = "127.0.0.1"
    admin_host: str = "127.0.0.1"
    advertise_address: str = "127.0.0.1"
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    app_host: str = "127.0.0.1"
    app_port: int | None = None
    upstreams: tuple[PortMapping, ...] = ()
    static: tuple[StaticService, ...] = ()
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    bus: BusSettings | None = None
    register: bool = True
    http1: Http1Settings = field(default_factory=Http1Settings)
    http2: Http2Settings = field(default_factory=Http2Settings)
    outbound: DirectionSettings = field(default_factory=lambda: DirectionSettings(
        OUTBOUND_CONNECT_TIMEOUT_SECONDS, OUTBOUND_FAILFAST_SECONDS))
    inbound: DirectionSettings = field(default_factory=lambda: DirectionSettings(
        INBOUND_CONNECT_TIMEOUT_SECONDS, INBOUND_FAILFAST_SECONDS))
    detect_timeout: float = DETECT_TIMEOUT_SECONDS
    drain_timeout: float = DRAIN_TIMEOUT_SECONDS
    deregister_grace: float = DEREGISTER_GRACE_SECONDS
    max_connections: int = MAX_CONNECTIONS
    log_level: str = "info"

    @property
    def identity_enabled(self) -> bool:
        return bool(self.identity)

    @property
    def serves_inbound(self) -> bool:
        return self.inbound_port > 0 and self.app_port is not None

    @property
    def registers(self) -> bool:
        """Local mode: announce the inbound endpoint on the bus with heartbeats."""
        return (self.register and self.bus is not None and bool(self.service)
                and self.serves_inbound)


# -- parsing -----------------------------------------------------------------------------


def parse_service(text: str, default_namespace: str) -> ServiceName:
    """``svc`` or ``svc.ns`` (DNS labels)."""
    service, _, namespace = text.strip().lower().partition(".")
    namespace = namespace or default_namespace
    if not is_dns_label(service) or not is_dns_label(namespace):
        raise ConfigError(f"{text!r} is not service[.namespace] (DNS labels)")
    return ServiceName(namespace, service)


def _port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what}: {port} is not a port number (1-65535)")
    return port


def parse_upstream(text: str, default_namespace: str) -> PortMapping:
    local, sep, rest = text.partition("=")
    if not sep:
        raise ConfigError(f"--upstream {text!r}: expected LOCALPORT=service.namespace[:PORT]")
    name, _, port = rest.partition(":")
    return PortMapping(
        local_port=_port(local, f"--upstream {text!r}"),
        target=parse_service(name, default_namespace),
        port=_port(port, f"--upstream {text!r}") if port else None,
    )


def parse_static(text: str, default_namespace: str) -> StaticService:
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ConfigError(
            f"--static-endpoint {text!r}: expected service.namespace=HOST:PORT[,HOST:PORT]")
    endpoints = []
    identities = []
    for item in rest.split(","):
        address, _, identity = item.strip().partition("@")
        host, _, port = address.rpartition(":")
        if not host:
            raise ConfigError(f"--static-endpoint {text!r}: {item!r} is not HOST:PORT")
        if identity and not all(is_dns_label(label) for label in identity.lower().split(".")):
            raise ConfigError(f"--static-endpoint {text!r}: {identity!r} is not an identity "
                              "name (a DNS name)")
        endpoints.append((host.strip("[]"), _port(port, f"--static-endpoint {text!r}")))
        identities.append(identity.lower())
    return StaticService(parse_service(name, default_namespace), tuple(endpoints),
                         tuple(identities) if any(identities) else ())


def parse_ports(text: str) -> frozenset[int]:
    ports: set[int] = set()
    for item in text.replace(",", " ").split():
        low, _, high = item.partition("-")
        first = _port(low, "--opaque-ports")
        last = _port(high, "--opaque-ports") if high else first
        ports.update(range(first, last + 1))
    return frozenset(ports)


def _env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Flags with defaults from ``environ`` (SHOAL_PROXY_<FLAG>)."""
    parser = argparse.ArgumentParser(
        prog="shoal proxy",
        description="The Shoal proxy: outbound (authority-routed), inbound (to the local "
                    "app), port-mapped upstreams, and the admin server. Every flag can "
                    "also be set as SHOAL_PROXY_<FLAG> (e.g. SHOAL_PROXY_APP_PORT).")

    def env(dest: str, default: object) -> object:
        return environ.get(_env_name(dest), default)

    def add(flag: str, default: object, help_text: str, kind: type = str) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, dest=dest, type=kind, default=env(dest, default),
                            help=f"{help_text} (default: {default}; env {_env_name(dest)})")

    add("--namespace", DEFAULT_NAMESPACE, "namespace of this workload; also the default "
        "namespace of short service names")
    add("--service", "", "service this workload serves (local mode registers it)")
    add("--workload", "", "workload (deployment) name (default: the service)")
    add("--pod", "", "instance name (default: <workload>-<hostname>-<pid>)")
    add("--identity", "", "identity name (default: <serviceaccount>.<namespace>."
        "serviceaccount.identity.<control-plane-namespace>.<trust-domain>)")
    add("--serviceaccount", "", "service account the identity is named after (default: "
        "the workload)")
    add("--trust-domain", pki.DEFAULT_TRUST_DOMAIN, "identity trust domain")
    add("--control-plane-namespace", pki.DEFAULT_CONTROL_PLANE_NAMESPACE,
        "control-plane namespace in identity names")
    add("--identity-token-file", "", "file holding the bootstrap token, read at every "
        f"renewal (or the token itself in {IDENTITY_TOKEN_ENV})")
    add("--identity-min-refresh", MIN_REFRESH_SECONDS, "renew the certificate no sooner "
        "than this, s (Linkerd's 10 s; lower only for short-lived test leaves)", float)
    parser.add_argument("--no-identity", action="store_true",
                        default=environ.get(_env_name("no_identity"), "") not in
                        ("", "0", "false"),
                        help="no certificate and no mutual TLS: plaintext to every peer "
                             "(tests, benchmarks)")
    add("--listen-host", "127.0.0.1", "address of the outbound and port-mapped listeners")
    add("--inbound-host", "127.0.0.1", "address of the inbound listener")
    add("--admin-host", "127.0.0.1", "address of the admin listener")
    add("--advertise-address", "", "address registered for the inbound listener "
        "(default: the inbound host, or 127.0.0.1 when that is a wildcard)")
    add("--outbound-port", DEFAULT_OUTBOUND_PORT, "outbound port, 0: off", int)
    add("--inbound-port", DEFAULT_INBOUND_PORT, "inbound port, 0: off", int)
    add("--admin-port", DEFAULT_ADMIN_PORT, "admin port (/metrics /ready /live /shutdown), "
        "0: off", int)
    add("--app-host", "127.0.0.1", "the local application's address (inbound target)")
    add("--app-port", None, "the local application's port; inbound is off without it", int)
    parser.add_argument("--upstream", action="append", dest="upstream", default=None,
                        help="LOCALPORT=service.namespace[:PORT], repeatable: a local port "
                             "forwarding to one service (env SHOAL_PROXY_UPSTREAM)")
    parser.add_argument("--static-endpoint", action="append", dest="static_endpoint",
                        default=None,
                        help="service.namespace=HOST:PORT[,HOST:PORT], repeatable: endpoints "
                             "known without discovery (env SHOAL_PROXY_STATIC_ENDPOINT)")
    add("--opaque-ports", ",".join(str(p) for p in sorted(DEFAULT_OPAQUE_PORTS)),
        "ports whose traffic skips protocol detection (list and ranges)")
    add("--cluster-domain", DEFAULT_CLUSTER_DOMAIN, "cluster domain in service names")
    add("--nats", "", "bus URL (default: SHOAL_NATS_URL, else shoal up's bus file)")
    add("--state-dir", "", "where shoal up keeps bus.json (default: SHOAL_STATE_DIR)")
    parser.add_argument("--no-bus", action="store_true",
                        default=environ.get(_env_name("no_bus"), "") not in ("", "0", "false"),
                        help="run without the bus: static endpoints only")
    parser.add_argument("--no-register", action="store_true",
                        default=environ.get(_env_name("no_register"), "") not in
                        ("", "0", "false"),
                        help="do not register the inbound endpoint on the bus")
    add("--connect-timeout", OUTBOUND_CONNECT_TIMEOUT_SECONDS, "outbound connect timeout, s",
        float)
    add("--inbound-connect-timeout", INBOUND_CONNECT_TIMEOUT_SECONDS,
        "inbound connect timeout, s", float)
    add("--failfast-timeout", OUTBOUND_FAILFAST_SECONDS,
        "outbound: 503 after this long without endpoints, s", float)
    add("--inbound-failfast-timeout", INBOUND_FAILFAST_SECONDS, "inbound fail-fast, s", float)
    add("--response-timeout", RESPONSE_TIMEOUT_SECONDS, "request to response head, s; 0: off",
        float)
    add("--request-head-timeout", REQUEST_HEAD_TIMEOUT_SECONDS, "request head read, s", float)
    add("--idle-timeout", IDLE_TIMEOUT_SECONDS, "idle client keep-alive connection, s", float)
    add("--stream-idle-timeout", STREAM_IDLE_TIMEOUT_SECONDS,
        "stalled body or tunnel, s", float)
    add("--detect-timeout", DETECT_TIMEOUT_SECONDS, "protocol detection wait, s", float)
    add("--drain-timeout", DRAIN_TIMEOUT_SECONDS, "graceful shutdown bound, s", float)
    add("--max-request-head-bytes", MAX_REQUEST_HEAD_BYTES, "431 beyond", int)
    add("--max-headers", MAX_HEADERS, "431 beyond", int)
    add("--max-request-target-bytes", MAX_REQUEST_TARGET_BYTES, "414 beyond", int)
    add("--max-response-head-bytes", MAX_RESPONSE_HEAD_BYTES, "502 beyond", int)
    add("--max-pending-body-bytes", MAX_PENDING_BODY_BYTES, "body held while connecting",
        int)
    add("--pool-max-idle", POOL_MAX_IDLE_PER_ENDPOINT, "idle connections per endpoint", int)
    add("--pool-idle-timeout", POOL_IDLE_TIMEOUT_SECONDS, "idle upstream connection, s",
        float)
    add("--max-connect-attempts", MAX_CONNECT_ATTEMPTS, "endpoints tried per request", int)
    add("--max-connections", MAX_CONNECTIONS, "accepted connections", int)
    add("--log-level", os.environ.get("SHOAL_LOG_LEVEL", "info"), "log level")
    return parser


def _listed(values: Sequence[str] | None, env_value: str | None) -> list[str]:
    if values:
        return list(values)
    if env_value:
        return env_value.replace(";", " ").split()
    return []


def _positive(value: float, flag: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ProxyConfig:
    """Validate parsed flags into a ProxyConfig; ConfigError says what is wrong."""
    namespace = str(args.namespace).lower()
    if not is_dns_label(namespace):
        raise ConfigError(f"--namespace {namespace!r} is not a DNS label")
    service = str(args.service).lower()
    if service and not is_dns_label(service):
        raise ConfigError(f"--service {service!r} is not a DNS label")
    workload = args.workload or service
    pod = args.pod or f"{workload or 'proxy'}-{socket.gethostname()}-{os.getpid()}"
    for flag in ("outbound_port", "inbound_port", "admin_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535:
            raise ConfigError(f"--{flag.replace('_', '-')} {value} is not a port (0: off)")
    if args.app_port is not None:
        _port(str(args.app_port), "--app-port")
    upstreams = tuple(parse_upstream(item, namespace)
                      for item in _listed(args.upstream, environ.get(_env_name("upstream"))))
    static = tuple(parse_static(item, namespace) for item in
                   _listed(args.static_endpoint, environ.get(_env_name("static_endpoint"))))
    local_ports = [m.local_port for m in upstreams]
    if len(set(local_ports)) != len(local_ports):
        raise ConfigError("--upstream: the same local port twice")
    for name in ("connect_timeout", "inbound_connect_timeout", "failfast_timeout",
                 "inbound_failfast_timeout", "request_head_timeout", "idle_timeout",
                 "stream_idle_timeout", "detect_timeout", "drain_timeout", "pool_idle_timeout",
                 "max_request_head_bytes", "max_headers", "max_request_target_bytes",
                 "max_response_head_bytes", "max_pending_body_bytes", "pool_max_idle",
                 "max_connect_attempts", "max_connections"):
        _positive(getattr(args, name), "--" + name.replace("_", "-"))
    _positive(args.response_timeout, "--response-timeout", allow_zero=True)
    bus = None
    if not args.no_bus:
        try:
            bus = resolve_bus("proxy", url=args.nats or None,
                              state_dir=Path(args.state_dir) if args.state_dir else None)
        except BusNotFound as error:
            if not static:
                raise ConfigError(f"{error} (or run with --no-bus and --static-endpoint)") \
                    from None
    identity, token, token_file = _identity(args, environ, namespace, workload,
                                            enabled=bus is not None and not args.no_identity)
    _positive(args.identity_min_refresh, "--identity-min-refresh")
    advertise = args.advertise_address or (
        args.inbound_host if args.inbound_host not in ("0.0.0.0", "::", "") else "127.0.0.1")
    return ProxyConfig(
        namespace=namespace, service=service, workload=workload, pod=pod,
        identity=identity, serviceaccount=str(args.serviceaccount or workload or
                                              DEFAULT_SERVICEACCOUNT),
        identity_token=token, identity_token_file=token_file,
        identity_min_refresh=args.identity_min_refresh,
        listen_host=args.listen_host, inbound_host=args.inbound_host,
        admin_host=args.admin_host, advertise_address=advertise,
        outbound_port=args.outbound_port, inbound_port=args.inbound_port,
        admin_port=args.admin_port, app_host=args.app_host, app_port=args.app_port,
        upstreams=upstreams, static=static, opaque_ports=parse_ports(args.opaque_ports),
        cluster_domain=args.cluster_domain.strip(".").lower(), bus=bus,
        register=not args.no_register,
        http1=Http1Settings(
            max_request_head_bytes=args.max_request_head_bytes, max_headers=args.max_headers,
            max_request_target_bytes=args.max_request_target_bytes,
            max_response_head_bytes=args.max_response_head_bytes,
            max_pending_body_bytes=args.max_pending_body_bytes,
            max_connect_attempts=args.max_connect_attempts,
            request_head_timeout=args.request_head_timeout,
            response_timeout=args.response_timeout, idle_timeout=args.idle_timeout,
            stream_idle_timeout=args.stream_idle_timeout),
        outbound=DirectionSettings(args.connect_timeout, args.failfast_timeout,
                                   args.pool_max_idle, args.pool_idle_timeout),
        inbound=DirectionSettings(args.inbound_connect_timeout, args.inbound_failfast_timeout,
                                  args.pool_max_idle, args.pool_idle_timeout),
        detect_timeout=args.detect_timeout, drain_timeout=args.drain_timeout,
        max_connections=args.max_connections, log_level=args.log_level,
    )


def _identity(args: argparse.Namespace, environ: Mapping[str, str], namespace: str,
              workload: str, enabled: bool) -> tuple[str, str, str]:
    """(identity name, token, token file), or ("", "", "") when identity is off."""
    if not enabled:
        return "", "", ""
    try:
        scheme = pki.NameScheme(str(args.control_plane_namespace).lower(),
                                str(args.trust_domain).strip(".").lower())
        if args.identity:
            name = str(args.identity).lower()
            parsed = scheme.parse(name)
        else:
            serviceaccount = str(args.serviceaccount or workload or DEFAULT_SERVICEACCOUNT)
            name = scheme.identity(serviceaccount.lower(), namespace)
            parsed = scheme.parse(name)
    except pki.InvalidIdentityName as error:
        raise ConfigError(f"identity: {error}") from None
    token = environ.get(IDENTITY_TOKEN_ENV, "").strip()
    token_file = str(args.identity_token_file)
    if token_file:
        path = Path(token_file)
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(f"--identity-token-file {token_file}: not a readable file")
    elif not token:
        raise ConfigError(
            f"identity {name} needs a bootstrap token: set {IDENTITY_TOKEN_ENV} or "
            f"--identity-token-file (mint one with `shoal identity token -n "
            f"{parsed.namespace} -s {parsed.serviceaccount}`), or run with --no-identity")
    return name, token, token_file


def load(argv: Sequence[str] | None = None,
         environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """Flags + environment -> ProxyConfig; a bad value exits 2 with one clear line."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args, environ)
    except ConfigError as error:
        parser.error(str(error))
