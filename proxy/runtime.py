"""The proxy's live handles, kept apart from its fixed ``ProxyConfig`` (as linkerd2-proxy
keeps ``Config`` apart from ``Runtime``): the bus link, discovery, metrics, telemetry
(the tap registry and the metrics reports), the registrar, the connection set, the tasks
handling accepted connections, and the readiness and drain state that admin reports.
Every room gets its metrics-and-tap hooks from ``observer()``.

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
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from shoal.schemas.tap import Direction

from .buslink import BusLink
from .discover import Discovery
from .http1.server import Connections
from .identity import IdentityClient
from .metrics import ProxyMetrics
from .observe import TAP_OFF, Observer, TapSwitch
from .register import Registrar
from .tap import LocalProxy
from .telemetry import Telemetry


@dataclass
class Runtime:
    metrics: ProxyMetrics
    link: BusLink | None = None
    discovery: Discovery | None = None
    registrar: Registrar | None = None
    identity: IdentityClient | None = None
    telemetry: Telemetry | None = None
    tap: TapSwitch = TAP_OFF  # the registry when tap is on (``active`` read per request)
    local: LocalProxy = field(default_factory=lambda: LocalProxy("", "", ""))
    identity_name: str = ""  # this proxy's identity name ("" without identity)
    # Connection numbers shared by every room: tap ids are <connection>:<stream>.
    connection_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    connections: Connections = field(default_factory=Connections)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    listening: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def observer(self, direction: Direction) -> Observer:
        """A room's metrics-and-tap hooks (observe.Observer)."""
        return Observer(direction, tap=self.tap, local=self.local,
                        identity=self.identity_name, connection_ids=self.connection_ids)

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
