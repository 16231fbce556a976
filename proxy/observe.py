"""What the protocol engines tell metrics and tap about each request, through one hook
object per room (``Observer``), per client connection (``ConnectionObserver``) and per
request (``RequestObserver``). Nothing here knows HTTP/1 from HTTP/2: an engine passes
method, authority, path and headers at the request's start, status and headers at the
response's start, body sizes, trailers (gRPC status) at its end, or a failure.

How an engine uses them (the HTTP/1 engine in http1/server.py; HTTP/2 the same way):

    conn = ctx.observer.connection(transport)            # once per client connection
    obs = conn.request(target, endpoint, method, authority, path, headers,
                       client_workload, now, grpc=is_grpc)  # once per request, when sent
    # or, saving an allocation: the engine's per-request object subclasses
    # RequestObserver (the HTTP/1 Exchange does) and is started in place:
    conn.start(exchange, target, endpoint, ...)          # exchange.begun is now True
    obs.response_start(status, headers, now)             # the final response head
    obs.response_bytes += len(chunk)                     # per body chunk
    if obs.needs_end:                                    # gRPC or tapped only
        obs.response_end(trailers)                       # complete (grpc-status inside)
    obs.fail(status_or_0, reset_error)                   # instead, at any point

A TLS layer hands the engine ``observer.for_client(identity)`` instead of the room's
observer: its connections have ``tls`` set, the client's verified identity and the
caller ``b"ns/workload"`` read from it (``workload_of_identity``).

Cost on the hot path, in order of what every request pays:
- a route label from the method and path (``RouteTable``: one dict lookup when seen
  before) and its metric series (one dict lookup in the target's cache), ``request()``
  and ``observe()`` on it: a few integer additions (metrics.py);
- tap: one attribute check, ``tap.active``, False while no open session can match this
  proxy. Only when it is True does the observer build a ``RequestInfo`` (peer addresses,
  decoded headers) and ask the registry; a tapped request then emits its three events.

Route labels (the ``route`` of metrics reports, ``viz top`` and ``viz routes``): HTTP is
``"METHOD /path"`` with the query dropped, at most ``MAX_ROUTE_SEGMENTS`` path segments
(a longer path ends in ``/*``), and segments that look like identifiers (digits, UUIDs,
long hex, very long tokens) shown as ``{id}``; gRPC is the full method path
``/pkg.Service/Method``. At most ``MAX_ROUTES`` distinct labels per room; later ones are
``"METHOD [other]"``. Policy route names replace these when policy reaches the proxy.

The caller's workload: inbound, over mutual TLS it comes from the client's certificate:
an identity ``<serviceaccount>.<namespace>.serviceaccount.identity...`` names the caller
``namespace/serviceaccount`` (a proxy's service account defaults to its workload name).
For plaintext meshed hops (a proxy without identity, or an endpoint discovery gave no
identity) there is a fallback: outbound, the proxy stamps ``shoal-client-workload:
ns/workload`` on every request it forwards (``Observer.stamp``); inbound, the proxy reads
it (the engines strip it before the app sees it) and labels the inbound series and tap
events with it. The identity always wins over the header (``ConnectionObserver.request``).
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from shoal.kernel.pki import IDENTITY_LABEL
from shoal.schemas.names import is_dns_label
from shoal.schemas.tap import Direction, Peer

from . import metrics as m
from .metrics import ProxyMetrics, RequestMetrics
from .report import MAX_LABEL_CHARS
from .route import NULL_COUNTER, EndpointRef, RequestCounter, Target
from .tap import LocalProxy, RequestInfo, TapRecord

Header = tuple[bytes, bytes]

CLIENT_WORKLOAD_HEADER = b"shoal-client-workload"

# Route labels. Three segments tell apart /api/v1/users from /api/v1/orders while a
# path full of arguments (/files/a/b/c/d) stays one label.
MAX_ROUTE_SEGMENTS = 3
# Distinct route labels per room (metrics series multiply by it): a REST API has tens;
# Host-header or path junk must not grow the series without bound.
MAX_ROUTES = 256
# Raw (method, path) -> label lookups remembered; paths with query strings vary per
# request, so the cache is cleared when full rather than grown.
MAX_ROUTE_CACHE = 4096
OTHER_ROUTE = "[other]"
# A segment longer than this is an argument (a token, a base64 blob), not a route name.
MAX_SEGMENT_CHARS = 40
_ID_SEGMENT = re.compile(
    r"^(\d+|[0-9a-fA-F]{16,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$")
# Callers remembered per inbound room (values come from a header: bounded like routes).
MAX_CLIENTS = 1024
# Label sets looked up per room before its cache is rebuilt (the series themselves are
# bounded by metrics.MAX_SERIES).
MAX_CACHED_SERIES = 4096
# gRPC statuses are 0..16; anything else is read as UNKNOWN (2), as a gRPC client must.
_GRPC_STATUS = b"grpc-status"
_GRPC_UNKNOWN = 2


class TapSwitch(Protocol):
    """What the observer needs of tap: the registry (tap.TapRegistry) or ``TapOff``."""

    @property
    def active(self) -> bool: ...

    def can_emit(self, now: float | None = None) -> bool: ...

    def request_start(self, request: RequestInfo, body: bytes = b"",
                      now: float | None = None) -> TapRecord | None: ...


class TapOff:
    """Tap compiled out (``--no-tap``, and a proxy without a bus): ``active`` is a
    constant False, so the hot path reads a class attribute and nothing else."""

    active = False

    def can_emit(self, now: float | None = None) -> bool:
        return False

    def request_start(self, request: RequestInfo, body: bytes = b"",
                      now: float | None = None) -> TapRecord | None:
        return None


TAP_OFF = TapOff()


# -- labels -------------------------------------------------------------------------------


def route_template(method: str, path: str) -> str:
    """``GET /api/vote?choice=x`` -> ``GET /api/vote``; see the module docstring."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    segments = [s for s in path.split("/") if s]
    shown = ["{id}" if len(s) > MAX_SEGMENT_CHARS or _ID_SEGMENT.match(s) else s
             for s in segments[:MAX_ROUTE_SEGMENTS]]
    text = "/" + "/".join(shown)
    if len(segments) > MAX_ROUTE_SEGMENTS:
        text += "/*"
    return f"{method} {text}" if method else text


class RouteTable:
    """Route labels of one room, bounded (see the module docstring)."""

    def __init__(self, max_routes: int = MAX_ROUTES, max_cache: int = MAX_ROUTE_CACHE) -> None:
        self.max_routes = max_routes
        self.max_cache = max_cache
        # method -> path -> label (nested: no key tuple to build per request); gRPC
        # labels under the method b"" (a method path is never an HTTP method).
        self._cache: dict[bytes, dict[bytes, str]] = {}
        self._cached = 0
        self._labels: set[str] = set()
        self.overflowed = 0

    def label(self, method: bytes, path: bytes, grpc: bool = False) -> str:
        paths = self._cache.get(b"" if grpc else method)
        label = paths.get(path) if paths is not None else None
        if label is None:
            label = self._new(method, path, grpc)
        return label

    def _new(self, method: bytes, path: bytes, grpc: bool) -> str:
        verb = method.decode("latin-1")
        text = path.decode("latin-1")
        if grpc:
            label = text.split("?", 1)[0][:MAX_LABEL_CHARS]
        elif verb == "CONNECT":
            label = "CONNECT"
        else:
            label = route_template(verb, text)
        if label not in self._labels:
            if len(self._labels) >= self.max_routes:
                self.overflowed += 1
                label = f"{verb} {OTHER_ROUTE}"
            else:
                self._labels.add(label)
        if self._cached >= self.max_cache:
            self._cache.clear()
            self._cached = 0
        self._cache.setdefault(b"" if grpc else method, {})[path] = label
        self._cached += 1
        return label


def parse_client_workload(value: bytes | None) -> tuple[str, str] | None:
    """``b"ns/workload"`` -> ("ns", "workload"); None when absent or not two DNS labels."""
    if not value:
        return None
    namespace, sep, workload = value.decode("latin-1").strip().partition("/")
    if not sep or not is_dns_label(namespace) or not is_dns_label(workload):
        return None
    return namespace, workload


_IDENTITY_MARKER = f".{IDENTITY_LABEL}.identity."


def workload_of_identity(identity: str) -> bytes | None:
    """``sa.ns.serviceaccount.identity.<cp-ns>.<td>`` -> ``b"ns/sa"`` (the caller as
    ``parse_client_workload`` reads it); None for a name outside that scheme."""
    at = identity.rfind(_IDENTITY_MARKER)
    if at <= 0:
        return None
    serviceaccount, _, namespace = identity[:at].rpartition(".")
    if not is_dns_label(namespace) or not is_dns_label(serviceaccount):
        return None
    return f"{namespace}/{serviceaccount}".encode()


class RouteSeries:
    """One room's request series by (route, caller): what ``FixedTarget(series=...)``
    asks per request, one dict lookup once a combination was seen. The caller's
    ``ns/workload`` becomes ``src_namespace``/``src_workload`` (Linkerd's inbound series
    have no source labels; reports carry the peer, so Shoal keeps it)."""

    def __init__(self, metrics: ProxyMetrics, direction: str, labels: Mapping[str, str],
                 limit: int = MAX_CACHED_SERIES) -> None:
        self.metrics = metrics
        self.direction = direction
        self.labels = dict(labels)
        self.limit = limit
        self._cache: dict[bytes | None, dict[str, RequestMetrics]] = {}  # client -> route
        self._cached = 0

    def series(self, route: str, client: bytes | None) -> RequestCounter:
        routes = self._cache.get(client)
        found = routes.get(route) if routes is not None else None
        if found is None:
            found = self._new(route, client)
        return found

    def _new(self, route: str, client: bytes | None) -> RequestMetrics:
        labels = dict(self.labels)
        if route:
            labels[m.ROUTE] = route
        caller = parse_client_workload(client)
        if caller is not None:
            labels[m.SRC_NAMESPACE], labels[m.SRC_WORKLOAD] = caller
        if self._cached >= self.limit:
            self._cache.clear()
            self._cached = 0
        series = self.metrics.request_metrics(self.direction, labels)
        self._cache.setdefault(client, {})[route] = series
        self._cached += 1
        return series


# -- the hooks ----------------------------------------------------------------------------


def grpc_status_of(fields: Sequence[Header]) -> int | None:
    """The ``grpc-status`` among trailers (or a trailers-only response's headers)."""
    for name, value in fields:
        if len(name) == 11 and name.lower() == _GRPC_STATUS:
            text = value.strip()
            return int(text) if text.isdigit() and int(text) <= 16 else _GRPC_UNKNOWN
    return None


class Observer:
    """One room's hooks (a listener: outbound, inbound, a port-mapped upstream), shared by
    its connections. ``local`` is this proxy's workload; ``stamp`` the field the outbound
    side adds to each forwarded request (None inbound)."""

    def __init__(self, direction: Direction, *, tap: TapSwitch = TAP_OFF,
                 local: LocalProxy | None = None, identity: str = "",
                 connection_ids: Iterator[int] | None = None,
                 routes: RouteTable | None = None) -> None:
        self.direction = direction
        self.tap = tap
        self.local = local or LocalProxy("", "", "")
        self.identity = identity
        self.routes = routes or RouteTable()
        # Connection numbers are per proxy (shared by rooms), as Linkerd's tap ids.
        self._ids = connection_ids or itertools.count(1)
        self.stamp: Header | None = None
        # What every connection of this observer knows of its client (``for_client``).
        self.client_tls = False
        self.client_identity = ""
        self.client_workload: bytes | None = None
        if direction == "outbound" and self.local.workload:
            value = f"{self.local.namespace}/{self.local.workload}".encode()
            self.stamp = (CLIENT_WORKLOAD_HEADER, value)

    def connection(self, transport: object) -> ConnectionObserver:
        """A client connection was accepted; ``transport`` answers ``get_extra_info``."""
        return ConnectionObserver(self, next(self._ids), transport)

    def for_client(self, identity: str) -> Observer:
        """The hooks for connections from a client that proved ``identity`` over mutual
        TLS: the same room (routes, tap, connection numbers), with ``tls`` set and the
        caller taken from the identity rather than from a header."""
        view = copy.copy(self)
        view.client_tls = True
        view.client_identity = identity
        view.client_workload = workload_of_identity(identity)
        return view

    def local_peer(self, address: str = "", port: int = 0) -> Peer:
        local = self.local
        return Peer(address=address, port=port, namespace=local.namespace,
                    workload=local.workload, pod=local.pod, identity=self.identity)


class ConnectionObserver:
    """One client connection: its number, what is known about the client (TLS sets
    ``tls``, ``client_identity`` and ``client_workload``), and a stream counter."""

    __slots__ = ("_source_key", "_source_peer", "client_identity", "client_workload", "id",
                 "observer", "streams", "tls", "transport")

    def __init__(self, observer: Observer, conn_id: int, transport: object) -> None:
        self.observer = observer
        self.id = conn_id
        self.transport = transport
        self.streams = 0
        self.tls = observer.client_tls
        self.client_identity = observer.client_identity
        self.client_workload = observer.client_workload  # from the TLS identity
        self._source_peer: Peer | None = None  # built on the first tapped request
        self._source_key: bytes | None = None

    def request(self, target: Target | None, endpoint: EndpointRef | None, method: bytes,
                authority: bytes, path: bytes, headers: Sequence[Header],
                client: bytes | None, now: float, grpc: bool = False) -> RequestObserver:
        """A new observer for a request on its way; see ``start``."""
        obs = RequestObserver()
        self.start(obs, target, endpoint, method, authority, path, headers, client, now,
                   grpc)
        return obs

    def start(self, obs: RequestObserver, target: Target | None,
              endpoint: EndpointRef | None, method: bytes, authority: bytes, path: bytes,
              headers: Sequence[Header], client: bytes | None, now: float,
              grpc: bool = False) -> None:
        """A request is on its way (``now``, monotonic): counted on its series, tapped
        if a session matches. ``client`` is the caller's ``shoal-client-workload``
        value (inbound); an identity from TLS wins over it."""
        self.streams += 1
        observer = self.observer
        if self.client_workload is not None:
            client = self.client_workload
        metrics: RequestCounter
        if target is None:
            metrics = NULL_COUNTER
        else:
            # RouteTable.label, inlined: this runs for every request.
            paths = observer.routes._cache.get(b"" if grpc else method)
            route = paths.get(path) if paths is not None else None
            if route is None:
                route = observer.routes.label(method, path, grpc)
            metrics = target.request_metrics(endpoint, route, client)
        metrics.request()
        obs.begun = True
        obs.metrics = metrics
        obs.started = now
        if grpc:
            obs.grpc = obs.needs_end = True
        tap = observer.tap
        if tap.active and tap.can_emit():
            record = obs.tap = tap.request_start(self._info(target, endpoint, method,
                                                            authority, path, headers, client))
            if record is not None:
                obs.needs_end = True

    def _info(self, target: Target | None, endpoint: EndpointRef | None, method: bytes,
              authority: bytes, path: bytes, headers: Sequence[Header],
              client: bytes | None) -> RequestInfo:
        observer = self.observer
        destination = target.destination(endpoint) if target is not None else Peer()
        return RequestInfo(
            id=f"{self.id}:{self.streams}", direction=observer.direction,
            method=method.decode("latin-1"), authority=authority.decode("latin-1"),
            path=path.decode("latin-1"), scheme="http", source=self._source(client),
            destination=destination, tls=self.tls, headers=headers)

    def _source(self, client: bytes | None) -> Peer:
        """The client as tap shows it, kept while the caller stays the same."""
        cached = self._source_peer
        if cached is not None and self._source_key == client:
            return cached
        observer = self.observer
        get = getattr(self.transport, "get_extra_info", None)
        peer = get("peername") if get is not None else None
        address, port = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        if observer.direction == "outbound":
            source = observer.local_peer(address, port)
        else:
            caller = parse_client_workload(client)
            source = Peer(address=address, port=port, namespace=caller[0] if caller else "",
                          workload=caller[1] if caller else "",
                          identity=self.client_identity)
        self._source_peer, self._source_key = source, client
        return source


class RequestObserver:
    """One request, from the moment it is sent upstream (or answered by the proxy) to
    its end. Engines call ``response_start`` once, add body sizes to
    ``response_bytes``, then ``response_end``, or ``fail`` at any point.

    Defaults live on the class (as the HTTP/1 engine's Exchange, which is one): a
    request writes only what differs, which costs half of an ``__init__`` setting every
    field, and an engine whose per-request object subclasses this pays no allocation."""

    begun = False  # ConnectionObserver.start ran
    metrics: RequestCounter = NULL_COUNTER
    started = 0.0  # monotonic seconds the request was sent (or answered)
    grpc = False
    tap: TapRecord | None = None
    status = 0
    grpc_status: int | None = None
    latency_ms = 0.0
    observed = False  # the metrics counted the response
    response_bytes = 0
    # Whether ``response_end`` has work (gRPC, or tapped): engines may skip the call.
    needs_end = False

    @classmethod
    def new(cls, metrics: RequestCounter, started: float, grpc: bool = False) -> RequestObserver:
        obs = cls()
        obs.begun = True
        obs.metrics = metrics
        obs.started = started
        if grpc:
            obs.grpc = obs.needs_end = True
        return obs

    def response_start(self, status: int, headers: Sequence[Header], now: float) -> None:
        """The response head (not interim 1xx) arrived at ``now`` (monotonic)."""
        self.status = status
        if not self.grpc:  # gRPC is classified at the end, by its grpc-status
            self.observed = True
            self.metrics.observe(status, None, (now - self.started) * 1000.0, status < 500,
                                 now)
        else:
            self.latency_ms = (now - self.started) * 1000.0
            self.grpc_status = grpc_status_of(headers)  # a trailers-only response
            if status != 200 or self.grpc_status is not None:
                self._observe_grpc(now)
        tap = self.tap
        if tap is not None:
            tap.response_start(status, headers, now)

    def response_end(self, trailers: Sequence[Header] = (), now: float | None = None) -> None:
        """The response is complete; ``trailers`` may carry a grpc-status."""
        tap = self.tap
        if tap is None and not self.grpc:
            return  # the common case: counted at the response head already
        if trailers:
            found = grpc_status_of(trailers)
            if found is not None:
                self.grpc_status = found
        when = time.monotonic() if now is None else now
        if self.grpc and not self.observed:
            self._observe_grpc(when)
        if tap is not None:
            tap.response_end(grpc_status=self.grpc_status,
                             response_bytes=self.response_bytes, now=when)

    def _observe_grpc(self, now: float) -> None:
        """gRPC succeeds with grpc-status 0 only (Linkerd's classification); none at all
        is a failure."""
        self.observed = True
        grpc_status = self.grpc_status
        self.metrics.observe(self.status, grpc_status, self.latency_ms,
                             self.status < 500 and grpc_status == 0, now)

    def fail(self, status: int, reset_error: str = "", now: float | None = None) -> None:
        """The proxy answered ``status`` itself, or (``status`` 0) the stream was cut
        (``reset_error`` says how, as HTTP/2 error names: ``CANCEL`` when the client
        went away, ``INTERNAL_ERROR`` when the upstream did)."""
        when = time.monotonic() if now is None else now
        if not self.observed:
            self.observed = True
            self.metrics.observe(status, None, (when - self.started) * 1000.0, False, when)
        tap = self.tap
        if tap is not None:
            if status and not self.status:
                self.status = status
                tap.response_start(status, (), when)
            tap.response_end(reset_error=reset_error, response_bytes=self.response_bytes,
                             now=when)
