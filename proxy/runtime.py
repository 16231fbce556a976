"""The proxy's live handles, kept apart from its fixed ``ProxyConfig`` (as linkerd2-proxy
keeps ``Config`` apart from ``Runtime``): the bus link, discovery, metrics, the
registrar, the connection set, the tasks handling accepted connections, and the
readiness and drain state that admin reports.

Readiness (``/ready``) means "has its configuration": the listeners are bound and, when a
bus is configured, the bus was reached at least once (discovery can answer), with
identity the proxy holds a certificate and trust anchors, and, in local mode, the first
registration heartbeat went out. After that the proxy stays ready when
the bus goes away, because it keeps serving from what it last knew (fail static). It is
not ready again once draining has begun. Without a bus (static endpoints only) it is
ready as soon as it listens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .buslink import BusLink
from .discover import Discovery
from .http1.server import Connections
from .identity import IdentityClient
from .metrics import ProxyMetrics
from .register import Registrar


@dataclass
class Runtime:
    metrics: ProxyMetrics
    link: BusLink | None = None
    discovery: Discovery | None = None
    registrar: Registrar | None = None
    identity: IdentityClient | None = None
    connections: Connections = field(default_factory=Connections)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    listening: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def connection_count(self) -> int:
        return len(self.connections.live) + len(self.tasks)

    @property
    def draining(self) -> bool:
        return self.connections.draining

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not)."""
        if self.draining or self.stop.is_set():
            return False, "draining"
        if not self.listening:
            return False, "listeners not bound yet"
        if self.link is not None and self.link.connects == 0:
            return False, "bus not reached yet"
        identity = self.identity
        if identity is not None and not identity.ready:
            why = identity.last_error or "waiting for the identity service"
            return False, f"no certificate yet ({why})"
        if self.registrar is not None and self.registrar.sent == 0:
            return False, "not registered yet"
        return True, ""
