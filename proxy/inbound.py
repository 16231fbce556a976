"""Inbound: connections from other proxies (and clients) to the local application.

Path: accept -> detect (connecting to the app in parallel, so a server that speaks first,
NATS or MySQL, is seen at once) -> forward: HTTP/1 through the engine to the app port
(the connection detection opened is put into the pool), opaque bytes relayed as they are.
Authorization policy joins this path with the policy issue.

The app port is one fixed endpoint: no balancing, Linkerd's inbound connect timeout
(100 ms, the app is local). A port listed as opaque skips detection.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from .accept import classify, connect_tcp
from .config import ProxyConfig
from .http1.client import Pool
from .http1.server import ServerContext
from .listen import adopt, refuse_http2, serve_http1
from .observe import RouteSeries
from .opaque import forward_opaque
from .route import NULL_COUNTER, TLS_LABELS, FixedRouter, FixedTarget
from .runtime import Runtime

log = logging.getLogger("shoal.proxy.inbound")


class Inbound:
    def __init__(self, config: ProxyConfig, runtime: Runtime) -> None:
        assert config.app_port is not None
        self.config = config
        self.host = config.app_host
        self.port = config.app_port
        metrics = runtime.metrics
        target_addr = f"{self.host}:{self.port}"
        self.pool = Pool(
            max_idle=config.inbound.pool_max_idle,
            idle_timeout=config.inbound.pool_idle_timeout,
            max_head_bytes=config.http1.max_response_head_bytes,
            tcp=metrics.tcp_metrics("inbound", {"peer": "dst", "target_addr": target_addr}))
        labels = {"target_addr": target_addr, **TLS_LABELS}
        observer = runtime.observer("inbound")
        # One series per route and caller (src_namespace/src_workload from the
        # shoal-client-workload field the caller's proxy stamps; observe.py).
        self.target = FixedTarget(
            self.host, self.port, self.pool, NULL_COUNTER, config.inbound.connect_timeout,
            series=RouteSeries(metrics, "inbound", labels),
            peer=observer.local_peer(self.host, self.port))
        self.ctx = ServerContext(
            router=FixedRouter(self.target), settings=config.http1,
            tcp=metrics.tcp_metrics("inbound", {"peer": "src", **labels}),
            connections=runtime.connections, observer=observer)
        self.opaque_tcp = metrics.tcp_metrics("inbound", {"peer": "src", "protocol": "opaque",
                                                          **labels})
        self.opaque = self.port in config.opaque_ports
        self.unreachable = 0  # opaque connections dropped because the app was down

    async def connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        return await connect_tcp(loop, self.host, self.port, self.config.inbound.connect_timeout)

    async def handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        result = await classify(loop, client, opaque=self.opaque,
                                connect_upstream=self.connect,
                                timeout=self.config.detect_timeout)
        if result.protocol == "http1":
            if result.upstream is not None:
                await adopt(self.pool, self.target.endpoint.key, result.upstream)
            await serve_http1(client, self.ctx, result.client_data)
            return
        if result.protocol == "http2":
            if result.upstream is not None:
                result.upstream.close()
            await refuse_http2(client)
            return
        if result.upstream is None:
            self.unreachable += 1
            client.close()
            return
        await forward_opaque(client, result.upstream, result.client_data, self.opaque_tcp,
                             upstream_initial=result.upstream_data)
