"""Wires the dashboard to the service runtime: once the bus is connected it starts the
poller and the HTTP server (api.py on kernel/httpserve.py); on stop the server closes
its streams (each closes its tap session) before the bus connection drains.

Concurrency: everything runs on the runtime's event loop. The poller is one task; each
browser connection is a task of the HTTP server; they share the poller's snapshot and
history (replaced whole, never mutated in place) and the metrics client's answer cache.
"""

from __future__ import annotations

import logging

from shoal.kernel.httpserve import HttpServer

from ..runtime import ServiceContext, ServiceRuntime
from . import views
from .api import DashboardApi
from .plane import ANSWER_TTL_SECONDS, MetricsClient
from .poller import POLL_INTERVAL_SECONDS, Poller

log = logging.getLogger("shoal.dashboard")

DEFAULT_PORT = 8084  # Linkerd's dashboard is port-forwarded to 50750; Shoal's demo says 8084
DEFAULT_HOST = "127.0.0.1"


class DashboardService:
    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 allow_hosts: tuple[str, ...] = (),
                 poll_interval: float = POLL_INTERVAL_SECONDS) -> None:
        self.host = host
        self.port = port
        self.allowed_hosts = views.allowed_hosts(host, allow_hosts)
        self.poll_interval = poll_interval
        self.bound_port = 0
        self.poller: Poller | None = None
        self.api: DashboardApi | None = None
        self._server: HttpServer | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.bound_port}/"

    def install(self, runtime: ServiceRuntime) -> None:
        runtime.on_setup(self._setup)
        runtime.add_task(self._run)

    async def _setup(self, ctx: ServiceContext) -> None:
        # answers are shared for less than a tick, so every tick sees new figures
        metrics = MetricsClient(ctx.nc, ttl=min(ANSWER_TTL_SECONDS, self.poll_interval / 2))
        self.poller = Poller(metrics, interval=self.poll_interval)
        self.api = DashboardApi(ctx.nc, self.poller, allowed_hosts=self.allowed_hosts)
        self._server = HttpServer(self.api.handle, name="dashboard")
        self.bound_port = await self._server.start(self.host, self.port)
        log.info("dashboard on %s", self.url)

    async def _run(self, ctx: ServiceContext) -> None:
        assert self.poller is not None and self._server is not None
        try:
            await self.poller.run(ctx.stopping)
        finally:
            await self._server.stop()
