"""``shoal viz stat|top|tap|edges|routes``: the metrics and tap services, shown with
Linkerd's columns so operators feel at home.

Tables are plain text aligned in columns (Linkerd's tabwriter look), with no colour, so
they read the same in a terminal, a pipe or a test. ``-o json`` prints what scripts
depend on (keys in docs/observability.md). ``top`` refreshes in place on a terminal (rich
Live, which honours NO_COLOR) and prints once otherwise. ``tap`` opens a session through
the tap service, prints every event of it, extends it while running and closes it on
Ctrl-C. Exit codes: 0 ok, 1 the bus or a service cannot be reached, 2 usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import re
import signal
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import nats.errors
import typer
from nats.aio.client import Client

from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.errors import ErrorReply
from shoal.schemas.metrics import (
    EdgeRow,
    EdgesAnswer,
    EdgesQuery,
    MetricsAnswer,
    MetricsQuery,
    ResourceKind,
    RouteRow,
    RoutesAnswer,
    RoutesQuery,
    StatAnswer,
    StatQuery,
    StatRow,
    TopAnswer,
    TopQuery,
    TopRow,
)
from shoal.schemas.tap import (
    DEFAULT_MAX_RPS,
    DEFAULT_SESSION_TTL_SECONDS,
    Peer,
    TapClose,
    TapEvent,
    TapExtend,
    TapFilter,
    TapOpen,
    TapRequestStart,
    TapResponseStart,
    TapSession,
    TapSessionGranted,
    TapSessionReply,
)
from shoal.services.metrics.views import BadResource, Resource, parse_resource
from shoal.services.tap.relay import SessionEvents, follow
from shoal.services.tap.sessions import filter_subject

from .busclient import (
    REQUEST_TIMEOUT_SECONDS,
    BusUnreachable,
    NatsCa,
    NatsPassword,
    NatsUrl,
    NatsUser,
    operator_connection,
)

app = typer.Typer(no_args_is_help=True,
                  help="See into the mesh: stat, top, tap, edges, routes.")

TOP_REFRESH_SECONDS = 2.0
TAP_WAIT_SECONDS = 0.5  # how often the tap loop wakes to extend the session or stop
STAT_JSON_KEYS = ("name", "namespace", "meshed", "success_rate", "rps", "latency_p50_ms",
                  "latency_p95_ms", "latency_p99_ms", "tcp_conn")
# Go's codes.Code names, as Linkerd's tap prints grpc-status.
GRPC_STATUS_NAMES = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded",
                     "NotFound", "AlreadyExists", "PermissionDenied", "ResourceExhausted",
                     "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
                     "Internal", "Unavailable", "DataLoss", "Unauthenticated")
SHORT_KIND = {"namespace": "ns", "deployment": "deploy", "pod": "po", "service": "svc"}

Namespace = Annotated[str, typer.Option("-n", "--namespace", help="namespace of the resource")]
AllNamespaces = Annotated[bool, typer.Option("-A", "--all-namespaces",
                                             help="every namespace")]
Output = Annotated[str, typer.Option("-o", "--output", help="json or wide")]
WindowOpt = Annotated[str, typer.Option("-t", "--window", help="time window: 10s to 1h")]


class ServiceUnreachable(RuntimeError):
    pass


# ----- formatting (plain functions: the tests call them)


def parse_window(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*", text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration like 30s, 1m or 1h")
    value = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    if not 10 <= value <= 3600:
        raise typer.BadParameter(f"window {text} is outside 10s..1h")
    return value


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded with three spaces, left-aligned, as Linkerd's tabwriter prints."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"


def duration(value_ms: float) -> str:
    """Latencies as Linkerd's top shows them: µs below 1 ms, ms below 1 s, else s."""
    if value_ms < 1:
        return f"{value_ms * 1000:.0f}µs"
    if value_ms < 1000:
        return f"{value_ms:.0f}ms"
    return f"{value_ms / 1000:.1f}s"


def format_stat(rows: Sequence[StatRow], *, wide: bool, show_namespace: bool) -> str:
    headers = ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95",
               "LATENCY_P99", "TCP_CONN"]
    if wide:
        headers += ["READ_BYTES/SEC", "WRITE_BYTES/SEC"]
    if show_namespace:
        headers.insert(0, "NAMESPACE")
    out = []
    for r in rows:
        cells = [r.name, r.meshed, percent(r.success_rate), f"{r.rps:.1f}rps",
                 ms(r.latency_p50_ms), ms(r.latency_p95_ms), ms(r.latency_p99_ms),
                 str(r.tcp_conn)]
        if wide:
            cells += [f"{r.read_bytes_per_sec:.1f}B/s", f"{r.write_bytes_per_sec:.1f}B/s"]
        if show_namespace:
            cells.insert(0, r.namespace)
        out.append(cells)
    return table(headers, out)


def format_top(rows: Sequence[TopRow]) -> str:
    headers = ["Source", "Destination", "Method", "Path", "Count", "Best", "Worst", "Last",
               "Success Rate"]
    return table(headers, [
        [r.source, r.destination, r.method, r.path, str(r.count), duration(r.best_ms),
         duration(r.worst_ms), duration(r.last_ms), percent(r.success_rate)] for r in rows])


def format_edges(rows: Sequence[EdgeRow], *, wide: bool) -> str:
    headers = ["SRC", "DST", "SRC_NS", "DST_NS", "SECURED"]
    if wide:
        headers += ["CLIENT_ID", "SERVER_ID"]
    out = []
    for r in rows:
        secured = "√" if r.secured else f"× ({r.no_tls_reason or 'not secured'})"
        cells = [r.src, r.dst, r.src_namespace, r.dst_namespace, secured]
        if wide:
            cells += [r.client_id or "-", r.server_id or "-"]
        out.append(cells)
    return table(headers, out)


def format_routes(rows: Sequence[RouteRow]) -> str:
    headers = ["ROUTE", "SERVICE", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95",
               "LATENCY_P99"]
    return table(headers, [
        [r.route, r.service, percent(r.success_rate), f"{r.rps:.1f}rps", ms(r.latency_p50_ms),
         ms(r.latency_p95_ms), ms(r.latency_p99_ms)] for r in rows])


def json_rows(rows: Sequence[msgspec.Struct], keys: Sequence[str] | None = None) -> str:
    out: list[dict[str, Any]] = []
    for row in rows:
        data = msgspec.to_builtins(row)
        out.append({k: data[k] for k in keys} if keys else data)
    return json.dumps(out, indent=2, ensure_ascii=False)


def _address(peer: Peer) -> str:
    if peer.address:
        return f"{peer.address}:{peer.port}" if peer.port else peer.address
    return peer.workload or "-"


def _resource(peer: Peer) -> str:
    if peer.workload:
        return f"deploy/{peer.workload}"
    if peer.pod:
        return f"po/{peer.pod}"
    return "-"


def format_tap(event: TapEvent, *, wide: bool = False) -> str:
    """One line per event, as ``linkerd viz tap`` prints it."""
    proxy = "in" if event.direction == "inbound" else "out"
    head = (f"id={event.id} proxy={proxy} src={_address(event.source)} "
            f"dst={_address(event.destination)} tls={'true' if event.tls else 'false'}")
    if isinstance(event, TapRequestStart):
        line = (f"req {head} :method={event.method} :authority={event.authority} "
                f":path={event.path}")
    elif isinstance(event, TapResponseStart):
        line = f"rsp {head} :status={event.status} latency={event.latency_us}µs"
    else:
        status = ""
        if event.reset_error:
            status = f"reset-error={event.reset_error} "
        elif event.grpc_status is not None:
            code = event.grpc_status
            name = GRPC_STATUS_NAMES[code] if 0 <= code < len(GRPC_STATUS_NAMES) else str(code)
            status = f"grpc-status={name} "
        line = (f"end {head} {status}duration={event.duration_us}µs "
                f"response-length={event.response_bytes}B")
    if wide:
        src, dst = event.source, event.destination
        line += (f" src_res={_resource(src)} src_ns={src.namespace or '-'}"
                 f" dst_res={_resource(dst)} dst_ns={dst.namespace or '-'}")
    return line


# ----- talking to the services


async def _request(nc: Client, subject: str, payload: bytes, service: str) -> bytes:
    try:
        msg = await nc.request(subject, payload, timeout=REQUEST_TIMEOUT_SECONDS)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise ServiceUnreachable(
            f"the {service} service did not answer on {subject} (is it running? `shoal up` "
            "starts it)") from None
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        try:
            reply: ErrorReply = Decoder(ErrorReply, subject).decode(msg.data)
            detail = reply.message
        except WireDecodeError:
            detail = msg.headers.get("Nats-Service-Error", "error")
        raise ServiceUnreachable(f"{service} service: {detail}")
    return bytes(msg.data)


async def query_metrics(query: MetricsQuery, url: str | None, user: str | None,
                        password: str | None, tls_ca: str | None,
                        nc: Client | None = None) -> MetricsAnswer:
    own = nc is None
    client = nc or await operator_connection(url, user, password, tls_ca)
    try:
        data = await _request(client, names.METRICS_QUERY, encode(query), "metrics")
    finally:
        if own:
            await client.close()
    decoder: Decoder[MetricsAnswer] = Decoder(MetricsAnswer, names.METRICS_QUERY)
    return decoder.decode(data)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (BusUnreachable, ServiceUnreachable) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except WireDecodeError as error:
        typer.echo(f"error: unexpected answer: {error}", err=True)
        raise typer.Exit(1) from None


def _resource_arg(resource: str, name: str | None) -> Resource:
    try:
        parsed = parse_resource(resource)
    except BadResource as error:
        raise typer.BadParameter(str(error), param_hint="RESOURCE") from None
    if name:
        if parsed.name:
            raise typer.BadParameter("give the name once: kind/name or kind name")
        parsed = Resource(parsed.kind, name)
    return parsed


def _check_output(output: str, allowed: Sequence[str]) -> None:
    if output and output not in allowed:
        raise typer.BadParameter(f"-o {output}: use one of {', '.join(allowed)}")


def _check_peer(text: str | None, option: str) -> str:
    if not text:
        return ""
    try:
        parse_resource(text)
    except BadResource as error:
        raise typer.BadParameter(str(error), param_hint=option) from None
    return text


def _no_traffic() -> None:
    typer.echo("No traffic found.", err=True)


# ----- commands


@app.command()
def stat(
    resource: Annotated[str, typer.Argument(help="ns, deploy, po, svc, or kind/name")],
    name: Annotated[str | None, typer.Argument(help="the resource's name")] = None,
    namespace: Namespace = "default", all_namespaces: AllNamespaces = False,
    output: Output = "", window: WindowOpt = "1m",
    from_resource: Annotated[str | None, typer.Option("--from", help="kind/name")] = None,
    to_resource: Annotated[str | None, typer.Option("--to", help="kind/name")] = None,
    nats_url: NatsUrl = None, user: NatsUser = None, password: NatsPassword = None,
    tls_ca: NatsCa = None,
) -> None:
    """Success rate, request rate, latency percentiles and connections per resource."""
    _check_output(output, ("json", "wide"))
    target = _resource_arg(resource, name)
    query = StatQuery(resource=target.kind, name=target.name,
                      namespace="" if all_namespaces else namespace,
                      window_seconds=parse_window(window),
                      from_resource=_check_peer(from_resource, "--from"),
                      to_resource=_check_peer(to_resource, "--to"))
    answer = _run(query_metrics(query, nats_url, user, password, tls_ca))
    assert isinstance(answer, StatAnswer)
    if output == "json":
        typer.echo(json_rows(answer.rows, STAT_JSON_KEYS))
    elif not answer.rows:
        _no_traffic()
    else:
        show_ns = all_namespaces and target.kind != "namespace"
        typer.echo(format_stat(answer.rows, wide=output == "wide", show_namespace=show_ns))


@app.command()
def routes(
    resource: Annotated[str, typer.Argument(help="deploy/NAME, po/NAME or ns/NAME")],
    name: Annotated[str | None, typer.Argument()] = None,
    namespace: Namespace = "default", all_namespaces: AllNamespaces = False,
    output: Output = "", window: WindowOpt = "1m",
    nats_url: NatsUrl = None, user: NatsUser = None, password: NatsPassword = None,
    tls_ca: NatsCa = None,
) -> None:
    """Success rate, request rate and latency per route a resource serves."""
    _check_output(output, ("json", "wide"))
    target = _resource_arg(resource, name)
    query = RoutesQuery(resource=target.kind, name=target.name,
                        namespace="" if all_namespaces else namespace,
                        window_seconds=parse_window(window))
    answer = _run(query_metrics(query, nats_url, user, password, tls_ca))
    assert isinstance(answer, RoutesAnswer)
    if output == "json":
        typer.echo(json_rows(answer.rows))
    elif not answer.rows:
        _no_traffic()
    else:
        typer.echo(format_routes(answer.rows))


@app.command()
def edges(
    resource: Annotated[str, typer.Argument(help="deploy, po or ns")],
    namespace: Namespace = "default", all_namespaces: AllNamespaces = False,
    output: Output = "", window: WindowOpt = "1m",
    nats_url: NatsUrl = None, user: NatsUser = None, password: NatsPassword = None,
    tls_ca: NatsCa = None,
) -> None:
    """Who talks to whom, and whether the connection is mutual TLS."""
    _check_output(output, ("json", "wide"))
    kind: ResourceKind = _resource_arg(resource, None).kind
    query = EdgesQuery(resource=kind, namespace="" if all_namespaces else namespace,
                       window_seconds=parse_window(window))
    answer = _run(query_metrics(query, nats_url, user, password, tls_ca))
    assert isinstance(answer, EdgesAnswer)
    if output == "json":
        typer.echo(json_rows(answer.rows))
    elif not answer.rows:
        _no_traffic()
    else:
        typer.echo(format_edges(answer.rows, wide=output == "wide"))


@app.command()
def top(
    resource: Annotated[str, typer.Argument(help="deploy/NAME, po/NAME or ns/NAME")],
    name: Annotated[str | None, typer.Argument()] = None,
    namespace: Namespace = "default", all_namespaces: AllNamespaces = False,
    output: Output = "", window: WindowOpt = "1m",
    limit: Annotated[int, typer.Option(min=1, max=1000, help="rows shown")] = 50,
    nats_url: NatsUrl = None, user: NatsUser = None, password: NatsPassword = None,
    tls_ca: NatsCa = None,
) -> None:
    """The busiest paths with best, worst and last latency; refreshes on a terminal."""
    _check_output(output, ("json",))
    target = _resource_arg(resource, name)
    query = TopQuery(resource=target.kind, name=target.name,
                     namespace="" if all_namespaces else namespace,
                     window_seconds=parse_window(window), limit=limit)
    if output == "json" or not sys.stdout.isatty():
        answer = _run(query_metrics(query, nats_url, user, password, tls_ca))
        assert isinstance(answer, TopAnswer)
        if output == "json":
            typer.echo(json_rows(answer.rows))
        elif not answer.rows:
            _no_traffic()
        else:
            typer.echo(format_top(answer.rows))
        return
    _run(_top_live(query, nats_url, user, password, tls_ca))


async def _top_live(query: TopQuery, url: str | None, user: str | None,
                    password: str | None, tls_ca: str | None) -> None:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    stop = asyncio.Event()
    _stop_on_signals(stop)
    nc = await operator_connection(url, user, password, tls_ca)
    try:
        with Live(Text("waiting for traffic..."), console=Console(), auto_refresh=False,
                  screen=False) as live:
            while not stop.is_set():
                answer = await query_metrics(query, url, user, password, tls_ca, nc=nc)
                assert isinstance(answer, TopAnswer)
                text = format_top(answer.rows) if answer.rows else "No traffic found."
                live.update(Text(text), refresh=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), TOP_REFRESH_SECONDS)
    finally:
        await nc.close()


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def _workload_filter(option: str, text: str | None, namespace: str) -> tuple[str, str]:
    """``--to deploy/web`` -> (namespace, workload); ``--to ns/x`` -> (x, "")."""
    if not text:
        return "", ""
    target = _resource_arg(_check_peer(text, option), None)
    if target.kind == "namespace":
        return target.name, ""
    if target.kind != "deployment":
        raise typer.BadParameter("tap filters name a deployment or namespace",
                                 param_hint=option)
    return namespace, target.name


@app.command()
def tap(
    resource: Annotated[str, typer.Argument(help="deploy/NAME, po/NAME or ns/NAME")],
    name: Annotated[str | None, typer.Argument()] = None,
    namespace: Namespace = "default",
    to: Annotated[str | None, typer.Option("--to", help="destination deploy/NAME or ns/NAME")]
    = None,
    to_namespace: Annotated[str | None, typer.Option("--to-namespace")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="source deploy/NAME or ns/NAME")]
    = None,
    from_namespace: Annotated[str | None, typer.Option("--from-namespace")] = None,
    method: Annotated[str, typer.Option(help="HTTP method")] = "",
    path: Annotated[str, typer.Option(help="path prefix")] = "",
    authority: Annotated[str, typer.Option(help=":authority / Host")] = "",
    scheme: Annotated[str, typer.Option(help="http or https")] = "",
    max_rps: Annotated[float, typer.Option("--max-rps", min=0.1, max=10_000,
                                           help="events per second")] = DEFAULT_MAX_RPS,
    output: Output = "",
    nats_url: NatsUrl = None, user: NatsUser = None, password: NatsPassword = None,
    tls_ca: NatsCa = None,
) -> None:
    """Watch requests live; Ctrl-C stops (and closes the session)."""
    _check_output(output, ("json", "wide"))
    target = _resource_arg(resource, name)
    if target.kind == "service":
        raise typer.BadParameter("tap a deploy, po or ns (services have no proxy)")
    to_ns, to_workload = _workload_filter("--to", to, to_namespace or namespace)
    from_ns, from_workload = _workload_filter("--from", from_, from_namespace or namespace)
    filter_ = TapFilter(
        namespace=target.name if target.kind == "namespace" else namespace,
        workload=target.name if target.kind == "deployment" else "",
        pod=target.name if target.kind == "pod" else "",
        to_namespace=to_namespace or to_ns, to_workload=to_workload,
        from_namespace=from_namespace or from_ns, from_workload=from_workload,
        method=method.upper(), path_prefix=path, authority=authority, scheme=scheme)
    request = TapOpen(filter=filter_, max_rps=max_rps, opened_by=_whoami())
    _run(_tap(request, output, nats_url, user, password, tls_ca))


def _whoami() -> str:
    try:
        return f"{getpass.getuser()} (shoal viz tap)"
    except Exception:
        return "shoal viz tap"


async def _session_call(nc: Client, payload: msgspec.Struct) -> TapSessionReply:
    data = await _request(nc, names.TAP_SESSION, encode(payload), "tap")
    decoder: Decoder[TapSessionReply] = Decoder(TapSessionReply, names.TAP_SESSION)
    return decoder.decode(data)


async def _tap(request: TapOpen, output: str, url: str | None, user: str | None,
               password: str | None, tls_ca: str | None) -> None:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    nc = await operator_connection(url, user, password, tls_ca)
    try:
        # Subscribe first: proxies publish as soon as the session is in the bucket.
        async with follow(nc, filter_subject(request.filter)) as events:
            granted = await _session_call(nc, request)
            assert isinstance(granted, TapSessionGranted)
            session: TapSession = granted.session
            events.bind(session.id)
            if session.max_rps < request.max_rps:
                typer.echo(f"note: --max-rps lowered to {session.max_rps:g} by the tap "
                           "service", err=True)
            try:
                await _print_events(nc, session, events, output, stop)
            finally:
                with contextlib.suppress(Exception):
                    await _session_call(nc, TapClose(id=session.id))
    finally:
        await nc.close()


async def _print_events(nc: Client, session: TapSession, events: SessionEvents, output: str,
                        stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    extend_every = DEFAULT_SESSION_TTL_SECONDS / 3
    next_extend = loop.time() + extend_every
    while not stop.is_set():
        try:
            event = await asyncio.wait_for(events.queue.get(), TAP_WAIT_SECONDS)
        except TimeoutError:
            event = None
        if event is not None:
            if output == "json":
                line = encode(event).decode()
            else:
                line = format_tap(event, wide=output == "wide")
            print(line, flush=True)
        if loop.time() >= next_extend:
            await _session_call(nc, TapExtend(id=session.id))
            next_extend = loop.time() + extend_every
