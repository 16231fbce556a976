"""The dashboard's HTTP routes: the static page, a small JSON API, and the live streams
(server-sent events) the page listens to.

    GET /                          the single-page app (static/index.html)
    GET /static/<file>             its script, style sheet and icon
    GET /api/status                whether the metrics service answers
    GET /api/namespaces            namespaces table (+ sparkline history)
    GET /api/workloads?ns=NS       workloads table of a namespace (+ history)
    GET /api/workload?ns=NS&name=W a workload: stat, edges in and out, routes, top
    GET /api/stream?view=...       the same payloads, pushed every tick (SSE)
    GET /api/tap?ns=&workload=&to=&to_ns=&method=&path=&authority=&max_rps=
                                   opens a tap session, streams its events (SSE),
                                   closes the session when the browser goes away

Every figure comes from the control plane over NATS (plane.py); nothing here talks to a
proxy. Errors are JSON ``{"error": "..."}`` with 400 (the caller's parameters), 404,
405, 421 (a Host we do not answer to), 429 (too many streams), 502 or 503 (the control
plane).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client

from shoal.kernel.httpserve import Request, Response, Send, StreamResponse
from shoal.schemas.codec import encode
from shoal.schemas.metrics import (
    EdgesAnswer,
    EdgesQuery,
    RoutesAnswer,
    RoutesQuery,
    TopAnswer,
    TopQuery,
)
from shoal.schemas.tap import DEFAULT_SESSION_TTL_SECONDS, TapOpen
from shoal.services.tap.relay import SessionEvents, follow

from . import views
from .history import tick_samples
from .plane import MetricsClient, PlaneRefused, PlaneUnavailable, TapSessions
from .poller import POLL_INTERVAL_SECONDS, Poller

log = logging.getLogger("shoal.dashboard")

STATIC_DIR = Path(__file__).with_name("static")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
JSON = "application/json; charset=utf-8"
# Streams open at once (every open page holds one); under the HTTP server's 1000
# connections, so plain requests are still served when streams are at their cap.
MAX_STREAMS = 200
# Tap streams open at once: each is a session in the tap service, which allows 16 for
# the whole mesh; the dashboard keeps half for the CLI.
MAX_TAP_STREAMS = 8
# A stream with nothing to say sends a comment this often, so the browser and anything
# between see it alive and a dead peer is noticed (idle proxies cut at 30-60 s).
HEARTBEAT_SECONDS = 15.0
# Tap events sent in one write when they arrive faster than we write them.
TAP_BATCH_LIMIT = 100
# The session is extended this often: a third of its time to live, so two extensions
# can fail (a bus blip) before it expires.
TAP_EXTEND_SECONDS = DEFAULT_SESSION_TTL_SECONDS / 3
# Closing a session on the way out waits this long (it expires on its own anyway).
TAP_CLOSE_TIMEOUT_SECONDS = 2.0


Route = Callable[[dict[str, str]], Awaitable[Response | StreamResponse]]


def json_response(status: int, value: object) -> Response:
    return Response(status, msgspec.json.encode(value), JSON,
                    headers=(("Cache-Control", "no-store"),))


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


def load_static(directory: Path = STATIC_DIR) -> dict[str, Response]:
    """Every file of the static folder, read once: URL path -> response."""
    files: dict[str, Response] = {}
    for path in sorted(directory.iterdir()):
        kind = CONTENT_TYPES.get(path.suffix)
        if kind is None or not path.is_file():
            continue
        files[f"/static/{path.name}"] = Response(
            200, path.read_bytes(), kind, headers=(("Cache-Control", "no-cache"),))
    if "/static/index.html" in files:
        files["/"] = files["/index.html"] = files["/static/index.html"]
    return files


def _plane_error(error: PlaneUnavailable | PlaneRefused) -> Response:
    if isinstance(error, PlaneUnavailable):
        return error_response(503, str(error))
    return error_response(400 if error.code == "bad_request" else 502, error.message)


class DashboardApi:
    """Routes requests; holds the bus client, the poller and the stream counts."""

    def __init__(self, nc: Client, poller: Poller, *, allowed_hosts: frozenset[str],
                 static: dict[str, Response] | None = None) -> None:
        self.nc = nc
        self.poller = poller
        self.metrics: MetricsClient = poller.metrics
        self.taps = TapSessions(nc)
        self.allowed_hosts = allowed_hosts
        self.static = load_static() if static is None else static
        self.streams = 0
        self.tap_streams = 0
        self._routes: dict[str, Route] = {
            "/api/status": self._status,
            "/api/namespaces": self._namespaces,
            "/api/workloads": self._workloads,
            "/api/workload": self._workload,
            "/api/stream": self._stream,
            "/api/tap": self._tap,
        }

    async def handle(self, request: Request) -> Response | StreamResponse:
        if not views.host_allowed(request.headers.get("host", ""), self.allowed_hosts):
            return error_response(421, "this dashboard does not answer to that Host; start "
                                  "it with --allow-host NAME to add one")
        if request.method not in ("GET", "HEAD"):
            return error_response(405, f"{request.method} is not supported here")
        static = self.static.get(request.path)
        if static is not None:
            return static
        route = self._routes.get(request.path)
        if route is None:
            return error_response(404, f"no such page: {request.path[:100]}")
        params = {key: values[-1] for key, values in request.query.items()}
        try:
            return await route(params)
        except views.BadParameter as error:
            return error_response(400, str(error))
        except (PlaneUnavailable, PlaneRefused) as error:
            return _plane_error(error)

    # ----- JSON

    async def _status(self, params: dict[str, str]) -> Response:
        snapshot = self.poller.snapshot
        return json_response(200, {
            "metrics": "unavailable" if self.poller.error else "ok",
            "error": self.poller.error,
            "last_poll": snapshot.time if snapshot else None,
            "bus_connected": self.nc.is_connected,
            "refresh_seconds": POLL_INTERVAL_SECONDS,
        })

    async def _namespaces(self, params: dict[str, str]) -> Response:
        return json_response(200, self.namespaces_view(history=True))

    async def _workloads(self, params: dict[str, str]) -> Response:
        namespace = views.name_param(params, "ns", required=True)
        return json_response(200, self.workloads_view(namespace, history=True))

    async def _workload(self, params: dict[str, str]) -> Response:
        namespace = views.name_param(params, "ns", required=True)
        name = views.name_param(params, "name", required=True)
        return json_response(200, await self.workload_view(namespace, name, history=True))

    def _base(self) -> dict[str, Any]:
        return {"error": self.poller.error, "time": time.time(),
                "refresh_seconds": POLL_INTERVAL_SECONDS}

    def namespaces_view(self, *, history: bool) -> dict[str, Any]:
        out = self._base()
        snapshot = self.poller.snapshot
        if snapshot is None:
            return {**out, "rows": [], "waiting": True}
        out.update(views.namespaces_payload(snapshot.namespaces, snapshot.workloads))
        out.update(self._history(None, history))
        return out

    def workloads_view(self, namespace: str, *, history: bool) -> dict[str, Any]:
        out = self._base()
        snapshot = self.poller.snapshot
        if snapshot is None:
            return {**out, "namespace": namespace, "rows": [], "waiting": True}
        out.update(views.workloads_payload(namespace, snapshot.workloads))
        out.update(self._history(namespace, history))
        return out

    async def workload_view(self, namespace: str, name: str, *, history: bool,
                            ) -> dict[str, Any]:
        out = self._base()
        window = views.TABLE_WINDOW_SECONDS
        top, routes, edges = await asyncio.gather(
            self.metrics.ask(TopQuery(resource="deployment", name=name, namespace=namespace,
                                      window_seconds=window, limit=views.TOP_LIMIT)),
            self.metrics.ask(RoutesQuery(resource="deployment", name=name,
                                         namespace=namespace, window_seconds=window)),
            self.metrics.ask(EdgesQuery(resource="deployment", namespace=namespace,
                                        window_seconds=window)))
        assert isinstance(top, TopAnswer)
        assert isinstance(routes, RoutesAnswer)
        assert isinstance(edges, EdgesAnswer)
        snapshot = self.poller.snapshot
        stat = views.find_row(snapshot.workloads, namespace, name) if snapshot else None
        out.update(views.workload_payload(namespace, name, stat, top, routes, edges))
        ring = self._history(namespace, history)
        if history:
            series = ring["history"]["series"]
            ring["history"]["series"] = {name: series[name]} if name in series else {}
        elif ring.get("sample"):
            values = ring["sample"]["values"]
            ring["sample"]["values"] = {name: values[name]} if name in values else {}
        out.update(ring)
        return out

    def _history(self, namespace: str | None, whole: bool) -> dict[str, Any]:
        """The whole ring (first payload of a page) or the newest tick (every next one)."""
        ring = self.poller.history
        if whole:
            return {"history": ring.namespaces() if namespace is None
                    else ring.workloads(namespace)}
        tick = ring.latest()
        if tick is None:
            return {}
        return {"sample": {"time": tick.time, "values": tick_samples(tick, namespace)}}

    # ----- streams

    async def _stream(self, params: dict[str, str]) -> Response | StreamResponse:
        view = params.get("view", "")
        if view == "namespaces":
            async def build(history: bool) -> dict[str, Any]:
                return self.namespaces_view(history=history)
        elif view == "workloads":
            namespace = views.name_param(params, "ns", required=True)

            async def build(history: bool) -> dict[str, Any]:
                return self.workloads_view(namespace, history=history)
        elif view == "workload":
            namespace = views.name_param(params, "ns", required=True)
            name = views.name_param(params, "name", required=True)

            async def build(history: bool) -> dict[str, Any]:
                try:
                    return await self.workload_view(namespace, name, history=history)
                except (PlaneUnavailable, PlaneRefused) as error:
                    return {**self._base(), "error": str(error), "namespace": namespace,
                            "name": name, "waiting": True}
        else:
            raise views.BadParameter("view must be namespaces, workloads or workload")
        if self.streams >= MAX_STREAMS:
            return error_response(429, f"too many open streams ({MAX_STREAMS})")

        async def produce(send: Send) -> None:
            self.streams += 1
            try:
                seen = self.poller.generation
                payload = msgspec.json.encode(await build(True))
                await send(views.sse_retry() + views.sse("snapshot", payload))
                while True:
                    generation = await self.poller.next_tick(seen, HEARTBEAT_SECONDS)
                    if generation == seen:
                        await send(views.sse_comment("no new figures"))
                        continue
                    seen = generation
                    await send(views.sse("tick", msgspec.json.encode(await build(False))))
            finally:
                self.streams -= 1

        return StreamResponse(200, produce)

    async def _tap(self, params: dict[str, str]) -> Response | StreamResponse:
        filter_ = views.tap_filter(params)
        max_rps = views.max_rps_param(params)
        if self.tap_streams >= MAX_TAP_STREAMS or self.streams >= MAX_STREAMS:
            return error_response(429, f"too many tap streams open in this dashboard "
                                  f"({MAX_TAP_STREAMS}); close a tap page")
        granted = await self.taps.open(TapOpen(filter=filter_, max_rps=max_rps,
                                               opened_by="shoal dashboard"))
        session = granted.session
        # If the browser is gone before the stream starts, the session is not closed
        # here: nobody extends it, and it expires within its time to live.

        async def produce(send: Send) -> None:
            self.tap_streams += 1
            self.streams += 1
            try:
                async with follow(self.nc, session) as events:
                    hello = {"id": session.id, "subject": granted.subject,
                             "max_rps": session.max_rps,
                             "filter": msgspec.to_builtins(session.filter)}
                    await send(views.sse_retry() +
                               views.sse("session", msgspec.json.encode(hello)))
                    await self._relay(send, session.id, events)
            finally:
                self.tap_streams -= 1
                self.streams -= 1
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.taps.close(session.id),
                                           TAP_CLOSE_TIMEOUT_SECONDS)

        return StreamResponse(200, produce)

    async def _relay(self, send: Send, session_id: str, events: SessionEvents) -> None:
        loop = asyncio.get_running_loop()
        next_extend = loop.time() + TAP_EXTEND_SECONDS
        reported_drops = 0
        while True:
            wait = max(0.05, min(HEARTBEAT_SECONDS, next_extend - loop.time()))
            try:
                first = await asyncio.wait_for(events.queue.get(), wait)
            except TimeoutError:
                first = None
            if first is None:
                await send(views.sse_comment("waiting for events"))
            else:
                batch = [first]
                while len(batch) < TAP_BATCH_LIMIT and not events.queue.empty():
                    batch.append(events.queue.get_nowait())
                await send(b"".join(views.sse("tap", encode(event)) for event in batch))
            if events.dropped != reported_drops:
                reported_drops = events.dropped
                await send(views.sse("dropped", msgspec.json.encode(
                    {"dropped": reported_drops})))
            if loop.time() >= next_extend:
                next_extend = loop.time() + TAP_EXTEND_SECONDS
                try:
                    await self.taps.extend(session_id, DEFAULT_SESSION_TTL_SECONDS)
                except PlaneRefused as error:  # the session is gone: say so and stop
                    await send(views.sse("ended", msgspec.json.encode({"error": str(error)})))
                    return
                except PlaneUnavailable as error:  # a blip: the next extension may work
                    log.warning("dashboard: cannot extend tap session %s: %s", session_id,
                                error)
