"""The proxy process: wiring only (as linkerd2's cmd/*/main.go). Builds the runtime from
the config, binds the listeners, starts the bus link, discovery, the identity client and
registration, runs the once-a-second sweeper, and stops gracefully.

Identity (when enabled): the client certifies over the bus link as soon as the bus is
reached (and watches ``shoal_trust``, again after every reconnect); the inbound endpoint
is registered only once a certificate is in hand, so peers never pick a proxy that
cannot yet answer their TLS; /ready waits for it too.

Shutdown (SIGTERM, SIGINT or admin ``POST /shutdown``), in order:
1. /ready turns 503;
2. local mode: the registrar deregisters (heartbeats stop, then a Deregistration), and the
   proxy keeps serving for DEREGISTER_GRACE_SECONDS so peers' proxies stop picking it;
3. the listeners close (no new connections);
4. idle client connections close; busy ones finish their current response, which says
   ``Connection: close``; HTTP/2 connections get GOAWAY and finish the streams in flight;
   opaque relays and tunnels keep going;
5. after everything finished or the drain timeout, whatever is left is cut, the bus link
   closes, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence

import uvloop
from nats.aio.client import Client

from shoal.kernel.logs import setup_logging
from shoal.schemas.endpoints import Registration

from . import tls
from .admin import Admin
from .balance import Balancer
from .buslink import BusLink
from .config import SWEEP_INTERVAL_SECONDS, ProxyConfig, ServiceName, load
from .discover import Discovery
from .http1.client import Pool
from .http2.client import H2Pool
from .http2.conn import Flusher
from .identity import IdentityClient, IdentityConfig, TokenSource
from .inbound import Inbound
from .listen import Handler, Listener, bind
from .metrics import IdentityCollector, ProxyMetrics, TcpMetrics
from .outbound import Outbound, PortMapped, Services, StaticEntry
from .register import REGISTER_TTL_SECONDS, Registrar
from .runtime import Runtime

log = logging.getLogger("shoal.proxy")

# While draining, how often the proxy looks whether every connection has finished.
DRAIN_POLL_SECONDS = 0.05
# A token file holds one token (a Kubernetes projected token is ~1 KiB); read at most this.
MAX_TOKEN_FILE_BYTES = 64 * 1024
# While registration waits for the first certificate, say why this often.
IDENTITY_WAIT_LOG_SECONDS = 30.0
# TLS client connections' TCP series kept per peer identity before the cache starts over.
MAX_TLS_TCP_SERIES = 1024


def token_source(config: ProxyConfig) -> TokenSource:
    """The bootstrap token: the environment's, or the file's, read at each request (so
    replacing the file hands the proxy a new token without a restart)."""
    if not config.identity_token_file:
        token = config.identity_token
        return lambda: token
    path = config.identity_token_file

    def read() -> str:
        with open(path, "rb") as handle:
            return handle.read(MAX_TOKEN_FILE_BYTES).decode("utf-8", "replace").strip()

    return read


class Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.runtime = Runtime(metrics=ProxyMetrics())
        self.listeners: list[Listener] = []
        self.pools: list[Pool | H2Pool] = []
        self.admin: Admin | None = None
        self.addresses: dict[str, tuple[str, int]] = {}
        self._register_task: asyncio.Task[None] | None = None
        self._tls_tcp: dict[str, TcpMetrics] = {}

    def request_stop(self) -> None:
        if not self.runtime.stop.is_set():
            log.info("shutting down: draining")
            self.runtime.stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._start()
        except OSError as error:
            log.error("cannot start the proxy: %s", error)
            await self._close_all()
            return 1
        sweeper = asyncio.create_task(self._sweep(), name="sweeper")
        try:
            await self.runtime.stop.wait()
        finally:
            await self._shutdown()
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        return 0

    def _bind(self, name: str, host: str, port: int, handler: Handler) -> None:
        try:
            sock = bind(host, port)
        except OSError as error:
            raise OSError(f"{name} listener on {host}:{port}: {error.strerror or error}") \
                from None
        listener = Listener(name, sock, handler, self.runtime, self.config.max_connections)
        self.listeners.append(listener)
        self.addresses[name] = listener.address

    async def _start(self) -> None:
        config, runtime = self.config, self.runtime
        if config.bus is not None:
            runtime.link = BusLink(config.bus, f"shoal-proxy-{config.pod}")
            runtime.discovery = Discovery(runtime.link, Balancer)
            if config.identity_enabled:
                runtime.identity = IdentityClient(
                    IdentityConfig(identity=config.identity, alpn_protocols=tls.SERVER_ALPN,
                                   min_refresh_s=config.identity_min_refresh),
                    runtime.link.request, token_source(config))
                runtime.metrics.add_collector(
                    IdentityCollector(runtime.identity.metric_values))
                runtime.link.on_connect(self._identity_on_connect)
            if config.registers:
                assert config.app_port is not None
                runtime.registrar = Registrar(runtime.link, Registration(
                    namespace=config.namespace, service=config.service,
                    workload=config.workload, pod=config.pod,
                    address=config.advertise_address, port=config.inbound_port,
                    identity=config.identity, ttl_seconds=REGISTER_TTL_SECONDS))
        pool = Pool(max_idle=config.outbound.pool_max_idle,
                    idle_timeout=config.outbound.pool_idle_timeout,
                    max_head_bytes=config.http1.max_response_head_bytes,
                    tcp=runtime.metrics.tcp_metrics("outbound", {
                        "peer": "dst", **tls.outbound_labels("", runtime.identity is not None)}),
                    tls_client=runtime.identity, tls_tcp=self._outbound_tls_tcp,
                    meshed_idle_timeout=config.outbound.pool_meshed_idle_timeout)
        self.pools.append(pool)
        flusher = Flusher()
        h2_outbound = H2Pool(config.http2, flusher, tcp=pool.tcp, tls_client=runtime.identity,
                             tls_tcp=self._outbound_tls_tcp)
        self.pools.append(h2_outbound)
        static: dict[ServiceName, StaticEntry] = {
            item.target: StaticEntry(item.target, item.endpoints, item.identities)
            for item in config.static}
        services = Services(discovery=runtime.discovery, static=static, pool=pool,
                            metrics=runtime.metrics, settings=config.outbound,
                            cluster_domain=config.cluster_domain)
        if config.outbound_port:
            outbound = Outbound(config, runtime, services, h2_outbound)
            self._bind("outbound", config.listen_host, config.outbound_port, outbound.handle)
        if config.serves_inbound:
            h2_inbound = H2Pool(config.http2, flusher, tcp=runtime.metrics.tcp_metrics(
                "inbound", {"peer": "dst", "target_addr": f"{config.app_host}:{config.app_port}"}))
            inbound = Inbound(config, runtime, h2_inbound, runtime.identity)
            self.pools.append(inbound.pool)
            self.pools.append(h2_inbound)
            self._bind("inbound", config.inbound_host, config.inbound_port, inbound.handle)
        for mapping in config.upstreams:
            mapped = PortMapped(mapping, config, runtime, services, h2_outbound,
                                runtime.identity)
            self._bind(f"upstream {mapping.local_port}={mapping.target}", config.listen_host,
                       mapping.local_port, mapped.handle)
        if config.admin_port:
            self.admin = Admin(runtime, self.request_stop)
            try:
                self.addresses["admin"] = await self.admin.start(config.admin_host,
                                                                 config.admin_port)
            except OSError as error:
                raise OSError(f"admin listener on {config.admin_host}:{config.admin_port}: "
                              f"{error.strerror or error}") from None
        for listener in self.listeners:
            listener.start()
        runtime.listening = True
        if runtime.link is not None:
            await runtime.link.start()
        if runtime.registrar is not None:
            if runtime.identity is None:
                await runtime.registrar.start()
            else:
                self._register_task = asyncio.create_task(
                    self._register_when_certified(runtime.registrar, runtime.identity),
                    name="register-when-certified")
        shown = ", ".join(f"{name} {host}:{port}" for name, (host, port) in
                          self.addresses.items())
        bus = config.bus.redacted() if config.bus is not None else "none (static endpoints)"
        log.info("proxy %s/%s listening: %s; bus %s", config.namespace,
                 config.pod, shown, bus)

    def _outbound_tls_tcp(self, identity: str) -> TcpMetrics:
        """The TCP series of outbound TLS connections to peers proving ``identity``."""
        series = self._tls_tcp.get(identity)
        if series is None:
            if len(self._tls_tcp) >= MAX_TLS_TCP_SERIES:
                self._tls_tcp.clear()
            series = self.runtime.metrics.tcp_metrics(
                "outbound", {"peer": "dst", **tls.server_id_labels(identity)})
            self._tls_tcp[identity] = series
        return series

    async def _identity_on_connect(self, nc: Client) -> None:
        """After every (re)connect: watch the trust bundle again, and ask for a
        certificate now if there is none yet (the first connect starts the client)."""
        identity = self.runtime.identity
        assert identity is not None
        identity.start_trust_watch(nc)
        await identity.start()
        if not identity.ready:
            identity.renew_soon()

    async def _register_when_certified(self, registrar: Registrar,
                                       identity: IdentityClient) -> None:
        while not await identity.wait_ready(IDENTITY_WAIT_LOG_SECONDS):
            log.warning("not registering %s yet: no certificate (%s)", identity.identity,
                        identity.last_error or "waiting for the identity service")
        await registrar.start()

    async def _sweep(self) -> None:
        runtime = self.runtime
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
            now = time.monotonic()
            runtime.connections.sweep(now)
            for pool in self.pools:
                pool.sweep(now)

    async def _shutdown(self) -> None:
        config, runtime = self.config, self.runtime
        runtime.stop.set()
        if self._register_task is not None:
            self._register_task.cancel()
        if runtime.registrar is not None:
            await runtime.registrar.stop()
            await asyncio.sleep(config.deregister_grace)
        for listener in self.listeners:
            await listener.close()
        runtime.connections.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.drain_timeout
        while (runtime.connections.live or runtime.tasks) and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        left = len(runtime.connections.live) + len(runtime.tasks)
        if left:
            log.warning("drain timeout (%gs): cutting %d connections", config.drain_timeout,
                        left)
        await self._close_all()
        log.info("proxy stopped")

    async def _close_all(self) -> None:
        runtime = self.runtime
        runtime.connections.close_all()
        for task in list(runtime.tasks):
            task.cancel()
        if runtime.tasks:
            await asyncio.wait(list(runtime.tasks), timeout=1.0)
        for listener in self.listeners:
            listener.sock.close()
        for pool in self.pools:
            pool.close_all()
        if self.admin is not None:
            await self.admin.close()
        if runtime.identity is not None:
            await runtime.identity.close()
        if runtime.discovery is not None:
            await runtime.discovery.close()
        if runtime.link is not None:
            await runtime.link.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m shoal.proxy`` / ``shoal proxy``: exit 0 after a clean stop, 1 when it
    cannot start (a port in use, say), 2 for bad flags."""
    config = load(argv)
    setup_logging(config.log_level)
    try:
        status = uvloop.run(Proxy(config).run())
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
