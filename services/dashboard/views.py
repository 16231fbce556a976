"""What the dashboard's JSON API says, as plain code: query parameters checked and turned
into metrics queries and tap filters, answers shaped into page payloads, server-sent
event framing, and the Host check. No sockets and no awaits: the HTTP side (api.py)
calls these and the tests call them directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from shoal.schemas.metrics import (
    EdgeRow,
    EdgesAnswer,
    RoutesAnswer,
    StatAnswer,
    StatRow,
    TopAnswer,
)
from shoal.schemas.tap import DEFAULT_MAX_RPS, TapFilter

# The window of every table, as Linkerd's dashboard and `viz stat` default to.
TABLE_WINDOW_SECONDS = 60.0
# The window of each sparkline sample: the shortest the metrics service answers, so a
# chart follows changes within seconds while the table shows the steadier minute.
SAMPLE_WINDOW_SECONDS = 10.0
# Rows of `top` a workload page shows (the CLI's default limit is 50).
TOP_LIMIT = 100
# Parameter values longer than this are refused (a DNS name is at most 253 bytes; a
# path prefix longer than this is not something anyone types into a filter box).
MAX_PARAM_LENGTH = 253
# Names in namespaces and workloads: Kubernetes DNS labels, and in local mode whatever
# `shoal run --service` was given; dots and underscores are allowed, nothing that could
# smuggle a subject wildcard (`*`, `>`) or a space.
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_METHOD = re.compile(r"^[A-Za-z]{1,20}$")
_AUTHORITY = re.compile(r"^[A-Za-z0-9.\-_:\[\]]+$")
# Hosts a browser may call us by when no other is configured: loopback names only, so a
# page on another site cannot reach the dashboard through DNS rebinding (Linkerd's web
# checks Host against `-enforced-host` for the same reason).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class BadParameter(ValueError):
    """A query parameter the caller got wrong: answered 400 with this message."""


def name_param(params: Mapping[str, str], key: str, *, required: bool) -> str:
    value = params.get(key, "").strip()
    if not value:
        if required:
            raise BadParameter(f"missing parameter {key!r}")
        return ""
    if len(value) > MAX_PARAM_LENGTH or not _NAME.match(value):
        raise BadParameter(f"{key}={value[:64]!r} is not a valid name (letters, digits, "
                           "'-', '.', '_'; starting and ending with a letter or digit)")
    return value


def tap_filter(params: Mapping[str, str]) -> TapFilter:
    """The filters of ``viz tap`` from query parameters: ``ns``, ``workload``, ``pod``,
    ``to`` (a workload) with ``to_ns`` (defaults to ``ns``), ``method``, ``path`` (a
    prefix), ``authority``."""
    namespace = name_param(params, "ns", required=False)
    workload = name_param(params, "workload", required=False)
    pod = name_param(params, "pod", required=False)
    if (workload or pod) and not namespace:
        raise BadParameter("a workload or pod filter needs its namespace (ns)")
    to = name_param(params, "to", required=False)
    to_ns = name_param(params, "to_ns", required=False)
    method = params.get("method", "").strip()
    if method and not _METHOD.match(method):
        raise BadParameter(f"method={method[:64]!r} is not an HTTP method")
    path = params.get("path", "").strip()
    if path and (not path.startswith("/") or len(path) > MAX_PARAM_LENGTH or " " in path):
        raise BadParameter("path must be a path prefix starting with '/'")
    authority = params.get("authority", "").strip()
    if authority and (len(authority) > MAX_PARAM_LENGTH or not _AUTHORITY.match(authority)):
        raise BadParameter(f"authority={authority[:64]!r} is not a host[:port]")
    return TapFilter(
        namespace=namespace, workload=workload, pod=pod,
        to_namespace=(to_ns or namespace) if to else to_ns, to_workload=to,
        method=method.upper(), path_prefix=path, authority=authority)


def max_rps_param(params: Mapping[str, str]) -> float:
    text = params.get("max_rps", "").strip()
    if not text:
        return DEFAULT_MAX_RPS
    try:
        value = float(text)
    except ValueError:
        raise BadParameter(f"max_rps={text[:32]!r} is not a number") from None
    if not 0 < value <= 10_000:
        raise BadParameter("max_rps must be above 0 and at most 10000")
    return value


def host_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    """Whether a request's Host (``name`` or ``name:port``) is one we answer to."""
    host = host_header.strip().lower()
    if host.startswith("["):
        name = host.split("]", 1)[0] + "]"
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in allowed or name.strip("[]") in allowed


def allowed_hosts(bind_host: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    hosts = set(LOOPBACK_HOSTS)
    if bind_host not in ("0.0.0.0", "::", ""):
        hosts.add(bind_host.lower())
    hosts.update(h.lower() for h in extra)
    return frozenset(hosts)


# ----- payloads


def rows(answer: msgspec.Struct) -> list[Any]:
    return msgspec.to_builtins(getattr(answer, "rows", []))  # type: ignore[no-any-return]


def namespaces_payload(namespaces: StatAnswer, workloads: StatAnswer) -> dict[str, Any]:
    """The namespaces page: one row per namespace, with how many workloads it has."""
    counts: dict[str, int] = {}
    for row in workloads.rows:
        counts[row.namespace] = counts.get(row.namespace, 0) + 1
    out = []
    for row in namespaces.rows:
        data = msgspec.to_builtins(row)
        data["workloads"] = counts.get(row.name, 0)
        out.append(data)
    return {"window_seconds": namespaces.window_seconds, "rows": out}


def workloads_payload(namespace: str, workloads: StatAnswer) -> dict[str, Any]:
    mine = [row for row in workloads.rows if row.namespace == namespace]
    return {"namespace": namespace, "window_seconds": workloads.window_seconds,
            "rows": msgspec.to_builtins(mine)}


def split_edges(edges: EdgesAnswer, namespace: str, name: str,
                ) -> tuple[list[EdgeRow], list[EdgeRow]]:
    """A workload's edges: (inbound, where it is the destination; outbound, the source)."""
    inbound = [e for e in edges.rows if e.dst == name and e.dst_namespace == namespace]
    outbound = [e for e in edges.rows if e.src == name and e.src_namespace == namespace]
    return inbound, outbound


def workload_payload(namespace: str, name: str, stat: StatRow | None, top: TopAnswer,
                     routes: RoutesAnswer, edges: EdgesAnswer) -> dict[str, Any]:
    inbound, outbound = split_edges(edges, namespace, name)
    return {
        "namespace": namespace, "name": name, "window_seconds": top.window_seconds,
        "stat": None if stat is None else msgspec.to_builtins(stat),
        "top": rows(top), "routes": rows(routes),
        "inbound": msgspec.to_builtins(inbound), "outbound": msgspec.to_builtins(outbound),
    }


def find_row(answer: StatAnswer, namespace: str, name: str) -> StatRow | None:
    for row in answer.rows:
        if row.namespace == namespace and row.name == name:
            return row
    return None


# ----- server-sent events (https://html.spec.whatwg.org/multipage/server-sent-events.html)

# How long the browser waits before it reconnects a dropped stream, in ms.
SSE_RETRY_MS = 2000


def sse(event: str, data: bytes) -> bytes:
    """One event. ``data`` is compact JSON (no newlines), so one ``data:`` line."""
    if b"\n" in data or b"\r" in data:
        raise ValueError("server-sent event data must be one line")
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def sse_comment(text: str) -> bytes:
    """A comment line: browsers ignore it; it keeps the connection seen as alive."""
    return b": " + text.encode() + b"\n\n"


def sse_retry() -> bytes:
    return f"retry: {SSE_RETRY_MS}\n\n".encode()
