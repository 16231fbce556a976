"""What a request is sent to: the ``Target`` seam between the protocol engines and the
rooms that choose endpoints.

The HTTP/1 engine and the opaque forwarder ask a Target for an endpoint (``pick``, a
synchronous fast path; ``wait_pick`` when nothing is available yet, bounded by the
fail-fast timeout), report what happened (``on_dispatch``, ``on_complete``,
``on_connect_error``), and count requests on the metrics object the Target hands out.
Outbound targets are balanced over discovered endpoints (outbound.py); the inbound target
is the local application, a single fixed endpoint (``FixedTarget`` here).

The metrics objects are duck-typed here (``RequestCounter``/``TcpCounter``) so the engines
do not depend on how metrics are kept; proxy/metrics.py provides the real ones. A Target
hands out one series per (endpoint, route, caller), so a request costs one cached lookup,
and says who the destination is (``destination``) for tap events.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol

from shoal.schemas.tap import Peer

from .errors import MethodNotAllowed, NoEndpoints
from .http1.framing import RequestHead

if TYPE_CHECKING:
    from .http1.client import Pool

EndpointKey = tuple[str, int]

# The labels of a connection without TLS because the proxy runs without identity
# (--no-identity, or no bus); proxy/tls.py has the labels of every other case.
TLS_LABELS = {"tls": "no_identity", "no_tls_reason": "disabled"}


class RequestCounter(Protocol):
    def request(self) -> None: ...

    def observe(self, status_code: int, grpc_status: int | None, latency_ms: float,
                success: bool, now: float = 0.0) -> None: ...


class SeriesSource(Protocol):
    """Request series by route and caller (``RouteSeries`` in metrics.py)."""

    def series(self, route: str, client: bytes | None) -> RequestCounter: ...


class TcpCounter(Protocol):
    def opened(self) -> None: ...

    def closed(self, error: bool) -> None: ...

    def read(self, n: int) -> None: ...

    def wrote(self, n: int) -> None: ...


class EndpointRef(Protocol):
    """What a Target hands out: at least the address to connect to, and the identity its
    proxy must prove ("" for an endpoint without one: plaintext)."""

    @property
    def key(self) -> EndpointKey: ...

    @property
    def identity(self) -> str: ...


class Target(Protocol):
    """One logical destination (a service and port, or the local app)."""

    authority: bytes  # sent as Host when the client sent none (HTTP/1.0)
    connect_timeout: float
    pool: Pool

    def pick(self, now: float, exclude: Collection[EndpointKey]) -> EndpointRef | None:
        """An endpoint now, or None; raises a ProxyError when the answer is final
        (e.g. UnknownService)."""
        ...

    async def wait_pick(self, exclude: Collection[EndpointKey]) -> EndpointRef:
        """Wait for an endpoint up to the fail-fast timeout; raises NoEndpoints."""
        ...

    def request_metrics(self, endpoint: EndpointRef | None, route: str = "",
                        client: bytes | None = None) -> RequestCounter:
        """The series a request counts on: per endpoint (None: the proxy answered before
        choosing one), route label and, inbound, the caller's ``ns/workload``."""
        ...

    def destination(self, endpoint: EndpointRef | None) -> Peer:
        """Who the request goes to, for tap (cold path: tapped requests only)."""
        ...

    def on_dispatch(self, endpoint: EndpointRef, now: float) -> None: ...

    def on_complete(self, endpoint: EndpointRef, now: float, rtt_s: float,
                    success: bool) -> None: ...

    def on_connect_error(self, endpoint: EndpointRef, now: float) -> None: ...


class FixedEndpoint:
    __slots__ = ("identity", "key")

    def __init__(self, key: EndpointKey, identity: str = "") -> None:
        self.key = key
        self.identity = identity


class NullRequestCounter:
    """Counts nothing: for tests and for targets that keep no request metrics."""

    def request(self) -> None:
        pass

    def observe(self, status_code: int, grpc_status: int | None, latency_ms: float,
                success: bool, now: float = 0.0) -> None:
        pass


NULL_COUNTER = NullRequestCounter()


class NullTcpCounter:
    def opened(self) -> None:
        pass

    def closed(self, error: bool) -> None:
        pass

    def read(self, n: int) -> None:
        pass

    def wrote(self, n: int) -> None:
        pass


class FixedTarget:
    """A single endpoint with nothing to balance: the inbound side's local app.

    ``metrics`` counts every request unless ``series`` is given, which then picks the
    series by route and caller; ``peer`` is what tap shows as the destination."""

    def __init__(self, address: str, port: int, pool: Pool, metrics: RequestCounter,
                 connect_timeout: float, authority: bytes | None = None, *,
                 series: SeriesSource | None = None, peer: Peer | None = None) -> None:
        self.endpoint = FixedEndpoint((address, port))
        self.authority = authority or f"{address}:{port}".encode()
        self.pool = pool
        self.metrics = metrics
        self.series = series
        self.peer = peer or Peer(address=address, port=port)
        self.connect_timeout = connect_timeout

    def pick(self, now: float, exclude: Collection[EndpointKey]) -> EndpointRef | None:
        return None if self.endpoint.key in exclude else self.endpoint

    async def wait_pick(self, exclude: Collection[EndpointKey]) -> EndpointRef:
        if self.endpoint.key in exclude:
            raise NoEndpoints(f"no endpoint left for {self.authority.decode()}")
        return self.endpoint

    def request_metrics(self, endpoint: EndpointRef | None, route: str = "",
                        client: bytes | None = None) -> RequestCounter:
        if self.series is not None:
            return self.series.series(route, client)
        return self.metrics

    def destination(self, endpoint: EndpointRef | None) -> Peer:
        return self.peer

    def on_dispatch(self, endpoint: EndpointRef, now: float) -> None:
        pass

    def on_complete(self, endpoint: EndpointRef, now: float, rtt_s: float,
                    success: bool) -> None:
        pass

    def on_connect_error(self, endpoint: EndpointRef, now: float) -> None:
        pass


class FixedRouter:
    """Every request to one target: a port-mapped upstream's listener, or inbound."""

    def __init__(self, target: Target, allow_connect: bool = False) -> None:
        self.target = target
        self.allow_connect = allow_connect

    def route(self, head: RequestHead) -> Target:
        if head.is_connect and not self.allow_connect:
            raise MethodNotAllowed("CONNECT is only served on the outbound port")
        if head.host is None:
            head.host = self.target.authority
            head.rewrite_host = True
        return self.target
