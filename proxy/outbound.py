"""Outbound: the app's requests to other services, routed by authority.

Path: authority (Host, absolute-form target or CONNECT) -> service name -> the service's
discovery entry and balancer -> an endpoint -> the HTTP/1 engine's pool. Port-mapped
upstreams skip the first step: their listener names the service.

Authorities accepted (``parse_authority``): ``svc``, ``svc.ns``, ``svc.ns.svc`` and
``svc.ns.svc.<cluster-domain>``, each with or without ``:port``; a short name is in the
proxy's own namespace. In local mode every endpoint is the peer's inbound proxy, which
forwards to its one app port, so the authority's port selects nothing; it is kept in the
``authority`` metric label (as Linkerd's). Anything else (an IP literal, a name outside
the cluster domain) is not a service: ``UnknownService`` (503), except a malformed
authority (400).

Answers the app sees: unknown service (the bucket has no entry) -> 503 at once; a known
service without an available endpoint -> wait up to the fail-fast timeout (Linkerd: 3 s)
for one, then 503; connection refused on every endpoint tried -> 502; connect timeout ->
504 (errors.py renders them all).

Mutual TLS: an endpoint whose entry carries an identity is a meshed proxy; with the
proxy's own identity, connections to it are TLS (the HTTP/1 pool's, and opaque relays
from port-mapped upstreams with ALPN ``shoal.opaque``), and its certificate must be for
exactly that identity, or the request gets a 502 saying so before any byte of it is
sent. Endpoints without an identity get plaintext (``no_tls_reason`` says why).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from shoal.schemas.endpoints import LABEL_POD, LABEL_WORKLOAD, Endpoint, EndpointSet
from shoal.schemas.names import is_dns_label
from shoal.schemas.tap import Peer

from . import metrics as m
from . import tls
from .accept import classify, connect_tcp
from .balance import Balancer, EndpointState
from .config import DirectionSettings, PortMapping, ProxyConfig, ServiceName
from .dial import handshake_errors
from .discover import Discovery
from .errors import (
    BadAuthority,
    IdentityUnavailable,
    NoEndpoints,
    ProxyError,
    UnknownService,
    UpstreamRefused,
)
from .http1.client import Pool
from .http1.framing import RequestHead, split_absolute_form
from .http1.server import ServerContext
from .http2.client import H2Pool
from .http2.server import FixedH2Router, H2Context, adopt_server, serve_http2
from .identity import IdentityError
from .listen import adopt, serve_http1
from .metrics import ProxyMetrics, RequestMetrics, TcpMetrics
from .opaque import forward_opaque
from .relay import Relay
from .route import EndpointKey, EndpointRef, FixedRouter, RequestCounter, Target
from .runtime import Runtime

log = logging.getLogger("shoal.proxy.outbound")

# How often a request waiting for endpoints (fail-fast window) looks again. Discovery has
# no change notification; 20 ms adds at most that to the first request after an endpoint
# appears, and costs nothing when no request waits.
ENDPOINT_POLL_SECONDS = 0.02
# Authorities remembered per router (Host header spellings -> target). Host headers are
# client input, so the cache is bounded; the oldest spelling is forgotten first.
MAX_ROUTE_CACHE = 4096
# Per-endpoint-and-route metric series kept per target before the cache is rebuilt
# (endpoints come and go; the metrics themselves are bounded by metrics.MAX_SERIES).
MAX_ENDPOINT_SERIES = 4096
# Opaque connections' series kept per port-mapped upstream (one per endpoint identity).
MAX_OPAQUE_SERIES = 1024
# What a client proxy offers in ALPN on an opaque connection to a peer proxy.
OPAQUE_ALPN = (tls.ALPN_OPAQUE,)


class Entry(Protocol):
    """What a target needs from discovery (discover.ServiceEntry, or a static one)."""

    namespace: str
    service: str
    balancer: Balancer
    known: asyncio.Event
    exists: bool


class StaticEntry:
    """A service whose endpoints were given on the command line (no discovery)."""

    def __init__(self, name: ServiceName, endpoints: Collection[tuple[str, int]],
                 identities: Sequence[str] = ()) -> None:
        self.namespace = name.namespace
        self.service = name.service
        self.balancer = Balancer()
        named = list(identities) or [""] * len(endpoints)
        self.endpoint_set = EndpointSet(
            namespace=name.namespace, service=name.service,
            endpoints=[Endpoint(address=host, port=port, identity=identity)
                       for (host, port), identity in zip(endpoints, named, strict=True)])
        self.balancer.update(self.endpoint_set.endpoints, time.monotonic())
        self.known = asyncio.Event()
        self.known.set()
        self.exists = True


def parse_authority(authority: bytes, default_namespace: str,
                    cluster_domain: str) -> tuple[ServiceName, int | None]:
    """``svc[.ns[.svc[.cluster.local]]][:port]`` -> (service name, port)."""
    try:
        text = authority.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        raise BadAuthority("authority is not ASCII") from None
    host, port = text, None
    if text.startswith("["):
        raise UnknownService(f"{text} is an IP address, not a service name")
    if ":" in text:
        host, _, port_text = text.rpartition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BadAuthority(f"invalid port in authority {text!r}")
        port = int(port_text)
    host = host.rstrip(".")
    labels = host.split(".")
    if not all(labels):
        raise BadAuthority(f"invalid authority {text!r}")
    suffix = ["svc", *cluster_domain.split(".")] if cluster_domain else ["svc"]
    if len(labels) == 1:
        service, namespace = labels[0], default_namespace
    elif len(labels) == 2:
        service, namespace = labels
    elif labels[2:] == suffix[: len(labels) - 2]:
        service, namespace = labels[0], labels[1]
    elif all(label.isdigit() for label in labels):
        raise UnknownService(f"{host} is an IP address, not a service name")
    else:
        raise UnknownService(f"{host} is not a service name in {cluster_domain}")
    if not (is_dns_label(service) and is_dns_label(namespace)):
        raise BadAuthority(f"invalid service name in authority {text!r}")
    return ServiceName(namespace, service), port


def canonical_authority(name: ServiceName, port: int | None, cluster_domain: str) -> str:
    fqdn = f"{name.service}.{name.namespace}.svc.{cluster_domain}"
    return f"{fqdn}:{port}" if port else fqdn


class BalancedTarget:
    """One service (and port): endpoints from its entry, chosen by its balancer."""

    def __init__(self, entry: Entry, authority: str, pool: Pool, metrics: ProxyMetrics,
                 settings: DirectionSettings, direction: str = "outbound") -> None:
        self.entry = entry
        self.balancer = entry.balancer
        self.authority = authority.encode()
        self.pool = pool
        self.connect_timeout = settings.connect_timeout
        self.failfast_timeout = settings.failfast_timeout
        self._metrics = metrics
        self._direction = direction
        self._labels = {m.AUTHORITY: authority, m.DST_NAMESPACE: entry.namespace,
                        m.DST_SERVICE: entry.service}
        # endpoint (None: the proxy answered before choosing one) -> (the identity its
        # series were made for, route -> series); nested: no key tuple per request.
        self._series: dict[EndpointKey | None, tuple[str, dict[str, RequestMetrics]]] = {}
        self._cached = 0
        self.name = f"{entry.service}.{entry.namespace}"

    def pick(self, now: float, exclude: Collection[EndpointKey]) -> EndpointRef | None:
        state = self.balancer.pick(now, exclude)
        if state is None and not exclude and not self.entry.exists and self.entry.known.is_set():
            raise UnknownService(f"unknown service {self.name}")
        return state

    async def wait_pick(self, exclude: Collection[EndpointKey]) -> EndpointRef:
        entry = self.entry
        try:
            async with asyncio.timeout(self.failfast_timeout):
                await entry.known.wait()
                while True:
                    state = self.balancer.pick(time.monotonic(), exclude)
                    if state is not None:
                        return state
                    if not entry.exists:
                        raise UnknownService(f"unknown service {self.name}")
                    await asyncio.sleep(ENDPOINT_POLL_SECONDS)
        except TimeoutError:
            pass
        if not entry.known.is_set():
            raise NoEndpoints(f"service discovery did not answer for {self.name} within "
                              f"{self.failfast_timeout:g}s (fail-fast)")
        if len(self.balancer):
            raise NoEndpoints(f"every endpoint of {self.name} is failing "
                              f"(fail-fast after {self.failfast_timeout:g}s)")
        raise NoEndpoints(f"no endpoints for {self.name} "
                          f"(fail-fast after {self.failfast_timeout:g}s)")

    def labels(self, endpoint_identity: str) -> dict[str, str]:
        """This target's metric labels for a connection to an endpoint with this identity."""
        return {**self._labels,
                **tls.outbound_labels(endpoint_identity, self.pool.tls is not None)}

    def request_metrics(self, endpoint: EndpointRef | None, route: str = "",
                        client: bytes | None = None) -> RequestCounter:
        """Per endpoint (and the identity it has now) and route (the caller is this
        proxy's own workload)."""
        if endpoint is None:
            key, identity = None, ""
        else:
            key, identity = endpoint.key, endpoint.identity
        cached = self._series.get(key)
        if cached is not None and cached[0] == identity:
            series = cached[1].get(route)
            if series is not None:
                return series
        return self._new_series(endpoint, key, identity, route)

    def _new_series(self, endpoint: EndpointRef | None, key: EndpointKey | None,
                    identity: str, route: str) -> RequestMetrics:
        if self._cached >= MAX_ENDPOINT_SERIES:
            self._series.clear()
            self._cached = 0
        labels = self.labels(identity)
        if route:
            labels[m.ROUTE] = route
        if isinstance(endpoint, EndpointState):  # Linkerd's dst_* labels, where known
            endpoint_labels = endpoint.endpoint.labels
            if endpoint_labels.get(LABEL_WORKLOAD):
                labels[m.DST_WORKLOAD] = endpoint_labels[LABEL_WORKLOAD]
            if endpoint_labels.get(LABEL_POD):
                labels["dst_pod"] = endpoint_labels[LABEL_POD]
        series = self._metrics.request_metrics(self._direction, labels)
        cached = self._series.get(key)
        if cached is None or cached[0] != identity:
            cached = self._series[key] = (identity, {})
        cached[1][route] = series
        self._cached += 1
        return series

    def destination(self, endpoint: EndpointRef | None) -> Peer:
        """The endpoint as tap shows it: address, and workload, pod and identity from
        discovery where known."""
        if endpoint is None:
            return Peer(namespace=self.entry.namespace)
        address, port = endpoint.key
        if not isinstance(endpoint, EndpointState):
            return Peer(address=address, port=port, namespace=self.entry.namespace)
        known = endpoint.endpoint
        return Peer(address=address, port=port, namespace=self.entry.namespace,
                    workload=known.labels.get(LABEL_WORKLOAD, ""),
                    pod=known.labels.get(LABEL_POD, ""), identity=known.identity)

    def on_dispatch(self, endpoint: EndpointRef, now: float) -> None:
        assert isinstance(endpoint, EndpointState)
        self.balancer.on_dispatch(endpoint, now)

    def on_complete(self, endpoint: EndpointRef, now: float, rtt_s: float,
                    success: bool) -> None:
        assert isinstance(endpoint, EndpointState)
        self.balancer.on_complete(endpoint, now, rtt_s, success)

    def on_connect_error(self, endpoint: EndpointRef, now: float) -> None:
        assert isinstance(endpoint, EndpointState)
        self.balancer.on_connect_error(endpoint, now)


class Services:
    """Service name (+ port) -> BalancedTarget, from static endpoints or discovery."""

    def __init__(self, *, discovery: Discovery | None, static: Mapping[ServiceName, StaticEntry],
                 pool: Pool, metrics: ProxyMetrics, settings: DirectionSettings,
                 cluster_domain: str) -> None:
        self.discovery = discovery
        self.static = static
        self.pool = pool
        self.metrics = metrics
        self.settings = settings
        self.cluster_domain = cluster_domain
        self._targets: dict[tuple[ServiceName, int | None], BalancedTarget] = {}

    def target(self, name: ServiceName, port: int | None) -> BalancedTarget:
        key = (name, port)
        target = self._targets.get(key)
        if target is not None:
            return target
        entry: Entry
        static = self.static.get(name)
        if static is not None:
            entry = static
        elif self.discovery is not None:
            entry = self.discovery.lookup(name.namespace, name.service)
        else:
            raise UnknownService(f"unknown service {name} (no bus: static endpoints only)")
        target = BalancedTarget(entry, canonical_authority(name, port, self.cluster_domain),
                                self.pool, self.metrics, self.settings)
        if len(self._targets) >= MAX_ROUTE_CACHE:
            self._targets.pop(next(iter(self._targets)))
        self._targets[key] = target
        return target


class OutboundRouter:
    """Routes by the request's authority (the HTTP/1 engine's Router)."""

    def __init__(self, services: Services, default_namespace: str) -> None:
        self.services = services
        self.default_namespace = default_namespace
        self._cache: dict[bytes, BalancedTarget] = {}

    def route(self, head: RequestHead) -> Target:
        target_form = head.target
        if target_form[:1] == b"/" and head.host is not None:  # origin-form: the Host
            authority = head.host
        elif head.method == b"CONNECT":
            authority = target_form
        else:
            split = split_absolute_form(target_form)
            if split is not None:
                authority, head.target = split
                head.host = authority
                head.rewrite_host = True
            elif head.host is not None:
                authority = head.host
            else:
                raise BadAuthority("no Host header: cannot tell which service to call")
        target = self._cache.get(authority)
        if target is None:
            target = self._resolve(authority)
        return target

    def route_authority(self, authority: bytes | None) -> Target:
        """HTTP/2's rule: ``:authority`` (or ``host``) as HTTP/1 uses Host."""
        if authority is None:
            raise BadAuthority("no :authority: cannot tell which service to call")
        target = self._cache.get(authority)
        if target is None:
            target = self._resolve(authority)
        return target

    def _resolve(self, authority: bytes) -> BalancedTarget:
        name, port = parse_authority(authority, self.default_namespace,
                                     self.services.cluster_domain)
        target = self.services.target(name, port)
        if len(self._cache) >= MAX_ROUTE_CACHE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[authority] = target
        return target


class Outbound:
    """The outbound port: HTTP/1 and HTTP/2 routed by authority (HTTP/2 per request); a
    CONNECT tunnel that turns out to carry HTTP/2 (grpcio with ``grpc_proxy``) is served
    as HTTP/2 to the named service, balanced per request. An opaque connection here has
    no destination: authority routing needs a request, and the original-destination
    lookup (transparent mode, iptables) comes with the Kubernetes issue, where it slots
    in as ``connect_upstream`` for classify."""

    def __init__(self, config: ProxyConfig, runtime: Runtime, services: Services,
                 h2pool: H2Pool) -> None:
        self.config = config
        router = OutboundRouter(services, config.namespace)
        self.observer = runtime.observer("outbound")
        tcp = runtime.metrics.tcp_metrics("outbound", {"peer": "src", **tls.TLS_LOOPBACK})
        self.h2pool = h2pool
        self.h2ctx = H2Context(router=router, pool=h2pool, http1=config.http1, tcp=tcp,
                               connections=runtime.connections, observer=self.observer)
        self.ctx = ServerContext(
            router=router, settings=config.http1, tcp=tcp, connections=runtime.connections,
            observer=self.observer, tunnel_h2=self._tunnel_h2)
        self.no_destination = 0  # opaque connections closed for want of a destination

    def _tunnel_h2(self, client: asyncio.Transport, initial: bytes, target: Target,
                   upstream: asyncio.Transport | None, key: EndpointKey,
                   upstream_data: bytes) -> None:
        """A CONNECT tunnel began with the HTTP/2 preface: serve it as HTTP/2 to the
        tunnel's service; the plaintext connection opened for the tunnel joins the HTTP/2
        pool (a TLS one, made for HTTP/1, was closed: the pool opens its own)."""
        ctx = H2Context(router=FixedH2Router(target), pool=self.h2pool,
                        http1=self.config.http1, tcp=self.h2ctx.tcp,
                        connections=self.h2ctx.connections, observer=self.observer)
        if upstream is not None:
            self.h2pool.adopt_transport(key, upstream, upstream_data)
        adopt_server(client, ctx, initial)

    async def handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        result = await classify(loop, client, opaque=False, connect_upstream=None,
                                timeout=self.config.detect_timeout)
        if result.protocol == "http1":
            await serve_http1(client, self.ctx, result.client_data)
        elif result.protocol == "http2":
            await serve_http2(client, self.h2ctx, result.client_data)
        else:
            self.no_destination += 1
            client.close()


class PortMapped:
    """A local port forwarding to one service (``--upstream LOCAL=svc.ns[:PORT]``):
    detection with the upstream connected in parallel (so NATS, MySQL and friends never
    stall), then HTTP/1 through the engine or opaque bytes relayed at kernel speed. The
    service's port in the mapping decides opacity (the opaque-ports list).

    To a meshed endpoint the opaque bytes travel over mutual TLS (ALPN ``shoal.opaque``;
    the peer proxy connects to its app at once, so a server that speaks first is still
    heard at once through it). Its proxy never speaks first on the raw connection, so
    on a port that is not opaque a silent client waits for the detection timeout, as
    with Linkerd: list server-first ports in ``--opaque-ports`` (NATS, MySQL, ... are by
    default)."""

    def __init__(self, mapping: PortMapping, config: ProxyConfig, runtime: Runtime,
                 services: Services, h2pool: H2Pool,
                 client_tls: tls.ClientTls | None = None) -> None:
        self.mapping = mapping
        self.config = config
        self.target = services.target(mapping.target, mapping.port)
        self.tls = client_tls
        self.metrics = runtime.metrics
        self.observer = runtime.observer("outbound")
        labels = {m.AUTHORITY: self.target.authority.decode(),
                  m.DST_NAMESPACE: mapping.target.namespace,
                  m.DST_SERVICE: mapping.target.service}
        tcp = self.metrics.tcp_metrics("outbound", {"peer": "src", **labels, **tls.TLS_LOOPBACK})
        self.ctx = ServerContext(
            router=FixedRouter(self.target), settings=config.http1, tcp=tcp,
            connections=runtime.connections, observer=self.observer)
        self.h2pool = h2pool
        self.h2ctx = H2Context(router=FixedH2Router(self.target), pool=h2pool,
                               http1=config.http1, tcp=tcp, connections=runtime.connections,
                               observer=self.observer)
        self._opaque_tcp: dict[str, TcpMetrics] = {}
        self.opaque = mapping.port is not None and mapping.port in config.opaque_ports
        self.unreachable = 0
        self.tls_failures = 0  # opaque connections closed because the handshake failed

    def opaque_tcp(self, endpoint_identity: str) -> TcpMetrics:
        """Opaque connections' counters, by the TLS labels of the endpoint they go to."""
        series = self._opaque_tcp.get(endpoint_identity)
        if series is None:
            if len(self._opaque_tcp) >= MAX_OPAQUE_SERIES:
                self._opaque_tcp.clear()
            series = self.metrics.tcp_metrics("outbound", {
                "peer": "src", "protocol": "opaque",
                **self.target.labels(endpoint_identity)})
            self._opaque_tcp[endpoint_identity] = series
        return series

    async def connect(self) -> tuple[socket.socket, EndpointState]:
        """A connected socket to an endpoint chosen by the balancer, trying others on
        failure; the balancer gets the connect time as the RTT sample."""
        loop = asyncio.get_running_loop()
        target = self.target
        exclude: list[EndpointKey] = []
        last: ProxyError | None = None
        for _ in range(self.config.http1.max_connect_attempts):
            state = target.pick(time.monotonic(), exclude)
            if state is None:
                if last is not None:
                    raise last
                state = await target.wait_pick(exclude)
            assert isinstance(state, EndpointState)
            started = time.monotonic()
            try:
                sock = await connect_tcp(loop, state.key[0], state.key[1],
                                         target.connect_timeout)
            except OSError as error:
                target.on_connect_error(state, time.monotonic())
                exclude.append(state.key)
                last = UpstreamRefused(f"connecting to {state.key[0]}:{state.key[1]} failed: "
                                       f"{error.strerror or type(error).__name__}")
                continue
            now = time.monotonic()
            target.on_dispatch(state, now)
            target.on_complete(state, now, now - started, True)
            return sock, state
        raise last or NoEndpoints(f"no endpoint of {target.name} could be reached")

    async def handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        chosen: list[EndpointState] = []

        async def connector() -> socket.socket:
            try:
                sock, state = await self.connect()
            except ProxyError as error:  # classify expects OSError from its connector
                raise ConnectionError(error.message) from None
            chosen.append(state)
            return sock

        result = await classify(loop, client, opaque=self.opaque, connect_upstream=connector,
                                timeout=self.config.detect_timeout)
        state = chosen[0] if chosen else None
        meshed = state is not None and bool(state.identity) and self.tls is not None
        if result.protocol == "http1":
            if result.upstream is not None and state is not None:
                if meshed:  # the pool opens its own TLS connection (ALPN shoal.http1)
                    result.upstream.close()
                else:
                    await adopt(self.target.pool, state.key, result.upstream)
            await serve_http1(client, self.ctx, result.client_data)
            return
        if result.protocol == "http2":
            if result.upstream is not None and state is not None:
                if meshed:  # the pool opens its own TLS connection (ALPN h2)
                    result.upstream.close()
                else:
                    await self.h2pool.adopt(state.key, result.upstream, result.upstream_data)
            await serve_http2(client, self.h2ctx, result.client_data)
            return
        if result.upstream is None or state is None:
            self.unreachable += 1
            client.close()
            return
        metrics = self.opaque_tcp(state.identity)
        metrics.opened()
        if not meshed:
            await forward_opaque(client, result.upstream, result.client_data, metrics,
                                 upstream_initial=result.upstream_data)
            return
        await self._relay_tls(client, result.upstream, state, result.client_data, metrics)

    async def _relay_tls(self, client: socket.socket, upstream: socket.socket,
                         state: EndpointState, initial: bytes, metrics: TcpMetrics) -> None:
        """Opaque bytes to a meshed endpoint: TLS (ALPN shoal.opaque) on the connected
        ``upstream``, then a relay between the app's plaintext and it."""
        loop = asyncio.get_running_loop()
        assert self.tls is not None
        host, port = state.key
        try:
            try:
                context = self.tls.client_context(OPAQUE_ALPN)
            except IdentityError as error:
                upstream.close()
                raise IdentityUnavailable(error.reason) from None
            connection = await handshake_errors(
                tls.originate(loop, upstream, context, state.identity),
                f"{host}:{port}", state.identity)
        except ProxyError as error:
            # Opaque bytes have no way to carry an error: the app sees its connection
            # close; the reason goes to the log and the count.
            self.tls_failures += 1
            log.warning("%s: opaque connection refused: %s", self.target.name, error.message)
            client.close()
            metrics.closed(True)
            return
        relay = Relay(metrics, client_initial=initial)
        connection.attach(relay.upstream)
        try:
            await loop.connect_accepted_socket(lambda: relay.client, client)
        except OSError:
            client.close()
            relay.finish(error=True)
        await relay.wait()
