"""What a request is sent to: the ``Target`` seam between the protocol engines and the
rooms that choose endpoints.

The HTTP/1 engine and the opaque forwarder ask a Target for an endpoint (``pick``, a
synchronous fast path; ``wait_pick`` when nothing is available yet, bounded by the
fail-fast timeout), report what happened (``on_dispatch``, ``on_complete``,
``on_connect_error``), and count requests on the metrics object the Target hands out.
Outbound targets are balanced over discovered endpoints (outbound.py); the inbound target
is the local application, a single fixed endpoint (``FixedTarget`` here).

The metrics objects are duck-typed here (``RequestCounter``/``TcpCounter``) so the engines
do not depend on how metrics are kept; proxy/metrics.py provides the real ones.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol

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
                success: bool) -> None: ...


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

    def request_metrics(self, endpoint: EndpointRef) -> RequestCounter: ...

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
                success: bool) -> None:
        pass


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
    """A single endpoint with nothing to balance: the inbound side's local app."""

    def __init__(self, address: str, port: int, pool: Pool, metrics: RequestCounter,
                 connect_timeout: float, authority: bytes | None = None) -> None:
        self.endpoint = FixedEndpoint((address, port))
        self.authority = authority or f"{address}:{port}".encode()
        self.pool = pool
        self.metrics = metrics
        self.connect_timeout = connect_timeout

    def pick(self, now: float, exclude: Collection[EndpointKey]) -> EndpointRef | None:
        return None if self.endpoint.key in exclude else self.endpoint

    async def wait_pick(self, exclude: Collection[EndpointKey]) -> EndpointRef:
        if self.endpoint.key in exclude:
            raise NoEndpoints(f"no endpoint left for {self.authority.decode()}")
        return self.endpoint

    def request_metrics(self, endpoint: EndpointRef) -> RequestCounter:
        return self.metrics

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
