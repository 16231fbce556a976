"""The four answers of ``shoal.v1.metrics.query`` (stat, top, edges, routes), computed
from an ``Aggregator`` at a given ``now``: plain code, so replicas holding the same
reports give the same answer and tests need no clock.

What each view reads (docs/observability.md has the same in prose):
- stat: a workload's (pod's, namespace's) inbound requests, as Linkerd's ``viz stat``;
  ``--to X``: its outbound requests to X; ``--from X``: X's outbound requests to it (for
  pods, the pod's inbound requests from X, since a peer's pod is not in its rows).
  ``service``: every client's outbound requests to that service.
- top: the resource's inbound requests, and its outbound requests to peers outside it
  (the other side of an in-resource call is already counted inbound), per source,
  destination, method and path, with best/worst/last latency.
- edges: who talked to whom and whether it was mutual TLS, from outbound rows (and
  inbound rows whose peer is known), requests and TCP.
- routes: the resource's inbound requests per route.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shoal.schemas.metrics import (
    EdgeRow,
    EdgesAnswer,
    EdgesQuery,
    MetricsAnswer,
    MetricsQuery,
    RequestRow,
    ResourceKind,
    RouteRow,
    RoutesAnswer,
    RoutesQuery,
    StatAnswer,
    StatQuery,
    StatRow,
    TcpRow,
    TopAnswer,
    TopQuery,
    TopRow,
)

from .aggregate import Aggregator, Entry, PodKey, PodState, RequestTotals, Span, TcpTotals

DEFAULT_ROUTE = "[DEFAULT]"  # Linkerd's name for requests that match no route
# Linkerd's reasons in `viz edges` when a connection is not mutual TLS.
NO_TLS_OUTBOUND = "not_provided_by_service_discovery"
NO_TLS_INBOUND = "not_provided_by_remote"

KIND_ALIASES: dict[str, ResourceKind] = {
    "ns": "namespace", "namespace": "namespace", "namespaces": "namespace",
    "deploy": "deployment", "deployment": "deployment", "deployments": "deployment",
    "po": "pod", "pod": "pod", "pods": "pod",
    "svc": "service", "service": "service", "services": "service",
}


class BadResource(ValueError):
    """A ``kind/name`` the caller gave cannot be understood."""


@dataclass(frozen=True)
class Resource:
    kind: ResourceKind
    name: str = ""  # empty: every resource of the kind

    def holds_pod(self, key: PodKey) -> bool:
        return not self.name or self.name == name_of(key, self.kind)


def parse_resource(text: str) -> Resource:
    """``deploy/web``, ``ns/emojivoto``, ``po/web-1``, ``svc/web`` or a bare kind."""
    kind_text, _, name = text.partition("/")
    kind = KIND_ALIASES.get(kind_text.lower())
    if kind is None:
        raise BadResource(f"unknown resource kind {kind_text!r}: use one of "
                          "ns, deploy, po, svc (as kind or kind/name)")
    return Resource(kind, name)


def name_of(key: PodKey, kind: ResourceKind) -> str:
    if kind == "namespace":
        return key.namespace
    if kind == "pod":
        return key.pod
    return key.workload


def group_of(key: PodKey, kind: ResourceKind) -> tuple[str, str]:
    """(namespace, name) a pod belongs to, for a resource kind."""
    return ("" if kind == "namespace" else key.namespace), name_of(key, kind)


def peer_matches(row: RequestRow | TcpRow, home_namespace: str, target: Resource,
                 target_namespace: str) -> bool:
    """Whether a row's peer is ``target`` (pods are not known on the peer side)."""
    peer_ns = row.peer_namespace or home_namespace
    if target.kind == "namespace":
        return not target.name or peer_ns == target.name
    if target_namespace and peer_ns != target_namespace:
        return False
    if target.kind == "service":
        return isinstance(row, RequestRow) and (not target.name or row.peer_service == target.name)
    return not target.name or row.peer_workload == target.name


def split_route(route: str) -> tuple[str, str]:
    """``"GET /api/vote"`` -> (GET, /api/vote); a gRPC ``/pkg.Svc/Method`` is a POST."""
    method, sep, path = route.partition(" ")
    if sep:
        return method, path
    if route.startswith("/"):
        return "POST", route
    return "", route


def _requests(agg: Aggregator, pod: PodState, window: float, now: float,
              ) -> Iterator[tuple[RequestRow, float, Span, Entry]]:
    span = agg.span(pod, window, now)
    if span is None:
        return
    for entry, fraction in agg.entries_in(pod, span):
        for row in entry.requests:
            yield row, fraction, span, entry


def _tcp(agg: Aggregator, pod: PodState, window: float, now: float,
         ) -> Iterator[tuple[TcpRow, float, Span]]:
    span = agg.span(pod, window, now)
    if span is None:
        return
    for entry, fraction in agg.entries_in(pod, span):
        for row in entry.tcp:
            yield row, fraction, span


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class _StatGroup:
    namespace: str
    name: str
    requests: RequestTotals
    tcp: TcpTotals
    pods_seen: int = 0
    pods_meshed: int = 0
    show_meshed: bool = True

    def row(self) -> StatRow:
        req = self.requests
        return StatRow(
            name=self.name, namespace=self.namespace,
            meshed=f"{self.pods_meshed}/{self.pods_seen}" if self.show_meshed else "-",
            success_rate=req.success_rate, rps=round(req.rate, 3),
            latency_p50_ms=_ms(req.latency(0.5)), latency_p95_ms=_ms(req.latency(0.95)),
            latency_p99_ms=_ms(req.latency(0.99)), tcp_conn=self.tcp.open_connections,
            read_bytes_per_sec=round(self.tcp.read_rate, 3),
            write_bytes_per_sec=round(self.tcp.write_rate, 3))


def stat(agg: Aggregator, query: StatQuery, now: float) -> StatAnswer:
    target = Resource(query.resource, query.name)
    window = query.window_seconds
    groups: dict[tuple[str, str], _StatGroup] = {}

    def group(namespace: str, name: str) -> _StatGroup:
        found = groups.get((namespace, name))
        if found is None:
            found = groups[(namespace, name)] = _StatGroup(
                namespace, name, RequestTotals(), TcpTotals(),
                show_meshed=target.kind != "service")
        return found

    if target.kind == "service":
        _stat_services(agg, query, now, group)
    elif query.from_resource and target.kind != "pod":
        _stat_from(agg, query, now, group)
        _count_pods(agg, query, now, groups)
    else:
        _stat_own(agg, query, now, group)
    rows = sorted((g.row() for g in groups.values()), key=lambda r: (r.namespace, r.name))
    return StatAnswer(rows=rows, window_seconds=window)


GroupFn = Callable[[str, str], _StatGroup]


def _stat_own(agg: Aggregator, query: StatQuery, now: float, group: GroupFn) -> None:
    """The resource's own proxies: inbound (or outbound ``--to``, inbound ``--from``)."""
    target = Resource(query.resource, query.name)
    to = parse_resource(query.to_resource) if query.to_resource else None
    source = parse_resource(query.from_resource) if query.from_resource else None
    namespace = "" if target.kind == "namespace" else query.namespace
    for pod in agg.selected(namespace, now):
        if not target.holds_pod(pod.key) or agg.span(pod, query.window_seconds, now) is None:
            continue
        stats = group(*group_of(pod.key, target.kind))
        stats.pods_seen += 1
        live = agg.fresh(pod, now)
        stats.pods_meshed += int(live and pod.meshed)
        direction = "outbound" if to is not None else "inbound"
        peer = to or source
        for row, fraction, span, entry in _requests(agg, pod, query.window_seconds, now):
            if row.direction != direction:
                continue
            if peer is not None and not peer_matches(row, pod.key.namespace, peer,
                                                     query.namespace):
                continue
            stats.requests.add(row, fraction, span, entry.end)
        for tcp_row, fraction, span in _tcp(agg, pod, query.window_seconds, now):
            if tcp_row.direction == direction and (peer is None or peer_matches(
                    tcp_row, pod.key.namespace, peer, query.namespace)):
                stats.tcp.add(tcp_row, fraction, span)
        if live:
            stats.tcp.open_connections += sum(
                r.open_connections for r in pod.last_tcp if r.direction == direction and (
                    peer is None or peer_matches(r, pod.key.namespace, peer, query.namespace)))


def _stat_from(agg: Aggregator, query: StatQuery, now: float, group: GroupFn) -> None:
    """``--from X``: X's outbound requests, grouped by the destination resource."""
    source = parse_resource(query.from_resource)
    target = Resource(query.resource, query.name)
    for pod in agg.selected("", now):
        if not source.holds_pod(pod.key):
            continue
        if source.kind != "namespace" and query.namespace and pod.key.namespace != query.namespace:
            continue
        for row, fraction, span, entry in _requests(agg, pod, query.window_seconds, now):
            if row.direction != "outbound" or not peer_matches(
                    row, pod.key.namespace, target, query.namespace):
                continue
            peer_ns = row.peer_namespace or pod.key.namespace
            name = peer_ns if target.kind == "namespace" else row.peer_workload
            if not name:
                continue
            key = ("" if target.kind == "namespace" else peer_ns, name)
            group(*key).requests.add(row, fraction, span, entry.end)


def _stat_services(agg: Aggregator, query: StatQuery, now: float, group: GroupFn) -> None:
    """``stat svc``: every client's outbound requests to the service."""
    target = Resource("service", query.name)
    for pod in agg.selected("", now):
        for row, fraction, span, entry in _requests(agg, pod, query.window_seconds, now):
            if row.direction != "outbound" or not row.peer_service:
                continue
            peer_ns = row.peer_namespace or pod.key.namespace
            if query.namespace and peer_ns != query.namespace:
                continue
            if target.name and row.peer_service != target.name:
                continue
            group(peer_ns, row.peer_service).requests.add(row, fraction, span, entry.end)


def _count_pods(agg: Aggregator, query: StatQuery, now: float,
                groups: dict[tuple[str, str], _StatGroup]) -> None:
    """Fill MESHED for the groups ``--from`` found."""
    for pod in agg.selected("", now):
        if agg.span(pod, query.window_seconds, now) is None:
            continue
        stats = groups.get(group_of(pod.key, query.resource))
        if stats is not None:
            stats.pods_seen += 1
            stats.pods_meshed += int(agg.fresh(pod, now) and pod.meshed)


def top(agg: Aggregator, query: TopQuery, now: float) -> TopAnswer:
    target = Resource(query.resource, query.name)
    namespace = "" if target.kind == "namespace" else query.namespace
    members = {pod.key for pod in agg.selected(namespace, now) if target.holds_pod(pod.key)}
    member_workloads = {(k.namespace, k.workload) for k in members}
    totals: dict[tuple[str, str, str, str], RequestTotals] = {}
    for key in members:
        pod = agg.pods[key]
        for row, fraction, span, entry in _requests(agg, pod, query.window_seconds, now):
            peer_ns = row.peer_namespace or key.namespace
            peer = row.peer_workload or row.peer_service or "unknown"
            if row.direction == "inbound":
                source, destination = peer, key.pod
            else:
                if target.kind != "pod" and (peer_ns, row.peer_workload) in member_workloads:
                    continue  # counted by the destination's inbound rows
                source, destination = key.pod, peer
            method, path = split_route(row.route)
            acc = totals.get((source, destination, method, path))
            if acc is None:
                acc = totals[(source, destination, method, path)] = RequestTotals(samples=True)
            acc.add(row, fraction, span, entry.end)
    rows = [
        TopRow(source=s, destination=d, method=m, path=p, count=round(acc.requests),
               best_ms=_ms(acc.best_ms if math.isfinite(acc.best_ms) else 0.0) or 0.0,
               worst_ms=_ms(acc.worst_ms) or 0.0, last_ms=_ms(acc.last_ms) or 0.0,
               success_rate=round(acc.success_rate or 0.0, 6))
        for (s, d, m, p), acc in totals.items() if acc.requests >= 0.5
    ]
    rows.sort(key=lambda r: (-r.count, r.source, r.destination, r.method, r.path))
    return TopAnswer(rows=rows[: query.limit], window_seconds=query.window_seconds)


@dataclass
class _Edge:
    secured: bool = True
    client_id: str = ""
    server_id: str = ""
    reason: str = ""


def edges(agg: Aggregator, query: EdgesQuery, now: float) -> EdgesAnswer:
    kind = query.resource
    found: dict[tuple[str, str, str, str], _Edge] = {}

    def note(key: tuple[str, str, str, str], tls: bool, client_id: str, server_id: str,
             reason: str) -> None:
        edge = found.setdefault(key, _Edge())
        edge.secured = edge.secured and tls
        edge.client_id = edge.client_id or client_id
        edge.server_id = edge.server_id or server_id
        if not tls:
            edge.reason = edge.reason or reason

    for pod in agg.selected("", now):
        k = pod.key
        own_ns, own = group_of(k, kind)
        own_ns = own_ns or k.namespace
        rows: list[tuple[RequestRow | TcpRow, str, str]] = []
        for req_row, _f, _s, _e in _requests(agg, pod, query.window_seconds, now):
            rows.append((req_row, req_row.client_id, req_row.server_id))
        for tcp_row, _f, _s in _tcp(agg, pod, query.window_seconds, now):
            rows.append((tcp_row, "", ""))
        for any_row, client_id, server_id in rows:
            if not any_row.peer_workload and not any_row.peer_namespace:
                continue
            peer_ns = any_row.peer_namespace or k.namespace
            peer = peer_ns if kind == "namespace" else any_row.peer_workload
            if not peer:
                continue
            if any_row.direction == "outbound":
                key = (own_ns, own, peer_ns, peer)
                note(key, any_row.tls, client_id or pod.identity, server_id, NO_TLS_OUTBOUND)
            else:
                key = (peer_ns, peer, own_ns, own)
                note(key, any_row.tls, client_id, server_id or pod.identity, NO_TLS_INBOUND)
    out = [
        EdgeRow(src=src, dst=dst, src_namespace=src_ns, dst_namespace=dst_ns,
                secured=e.secured, no_tls_reason="" if e.secured else e.reason,
                client_id=e.client_id if e.secured else "",
                server_id=e.server_id if e.secured else "")
        for (src_ns, src, dst_ns, dst), e in found.items()
        if not query.namespace or query.namespace in (src_ns, dst_ns)
    ]
    out.sort(key=lambda r: (r.src_namespace, r.src, r.dst_namespace, r.dst))
    return EdgesAnswer(rows=out, window_seconds=query.window_seconds)


def _service_of(row: RequestRow, key: PodKey) -> str:
    if row.authority:
        return row.authority.split(":", 1)[0].split(".", 1)[0]
    return key.workload


def routes(agg: Aggregator, query: RoutesQuery, now: float) -> RoutesAnswer:
    target = Resource(query.resource, query.name)
    namespace = "" if target.kind == "namespace" else query.namespace
    totals: dict[tuple[str, str], RequestTotals] = {}
    for pod in agg.selected(namespace, now):
        if not target.holds_pod(pod.key):
            continue
        for row, fraction, span, entry in _requests(agg, pod, query.window_seconds, now):
            if row.direction != "inbound":
                continue
            key = (row.route or DEFAULT_ROUTE, _service_of(row, pod.key))
            totals.setdefault(key, RequestTotals()).add(row, fraction, span, entry.end)
    rows = [
        RouteRow(route=route, service=service, success_rate=acc.success_rate,
                 rps=round(acc.rate, 3), latency_p50_ms=_ms(acc.latency(0.5)),
                 latency_p95_ms=_ms(acc.latency(0.95)), latency_p99_ms=_ms(acc.latency(0.99)))
        for (route, service), acc in totals.items()
    ]
    rows.sort(key=lambda r: (r.service, r.route == DEFAULT_ROUTE, r.route))
    return RoutesAnswer(rows=rows, window_seconds=query.window_seconds)


def answer(agg: Aggregator, query: MetricsQuery, now: float) -> MetricsAnswer:
    """One query, answered; ``BadResource`` when a ``--from``/``--to`` cannot be parsed."""
    if isinstance(query, StatQuery):
        return stat(agg, query, now)
    if isinstance(query, TopQuery):
        return top(agg, query, now)
    if isinstance(query, EdgesQuery):
        return edges(agg, query, now)
    return routes(agg, query, now)
