"""What tap costs the proxy per request, in the four states that matter: tap compiled
out, no session open (the one attribute check), a session open that does not match, and
a matching session (events built, encoded and queued; at 100 events/s most requests are
over the cap, at 10k/s every one is tapped). Prints ns per request; no assertions.

A second table runs the same states through the hooks the HTTP/1 engine calls per
request (observe.py: a request observer with its route label and metric series, the
response start and end), against the metrics counting alone, so it shows what the
hooks cost and that with no session tap adds nothing measurable to them.
``bench.tap_throughput`` measures the same through a real proxy with wrk.

    python -m bench.tap_cost [--requests N]
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Callable

from shoal.proxy.metrics import ProxyMetrics
from shoal.proxy.observe import TAP_OFF, Observer, RouteSeries, TapSwitch
from shoal.proxy.route import FixedTarget
from shoal.proxy.tap import LocalProxy, RequestInfo, TapRegistry
from shoal.schemas.codec import encode
from shoal.schemas.tap import Peer, TapFilter, TapSession

SINK_LIMIT = 10_000  # events kept by the stand-in for the bus publisher
LOCAL = LocalProxy("demo", "web", "web-1")
REQUEST = RequestInfo(
    id="1:1", direction="inbound", method="GET", authority="web-svc:8080", path="/api/vote",
    source=Peer(address="127.0.0.1", port=40000, workload="vote-bot"),
    destination=Peer(address="127.0.0.1", port=8080, workload="web"), tls=True,
    headers=(("user-agent", "bench"), ("authorization", "Bearer x")))


# Best of this many timings, each in this thread's CPU time (time.thread_time): on a
# machine shared with other work, time spent descheduled is not counted and the minimum
# is the figure least disturbed by neighbours.
REPEATS = 5


def _per_request(run: Callable[[int], None], n: int) -> float:
    run(min(n, 1000))  # warm up
    best = float("inf")
    for _ in range(REPEATS):
        start = time.thread_time()
        run(n)
        best = min(best, time.thread_time() - start)
    return best / n * 1e9


def _registry(session: TapSession | None) -> tuple[TapRegistry, deque[bytes]]:
    sink: deque[bytes] = deque(maxlen=SINK_LIMIT)
    registry = TapRegistry(LOCAL, lambda _subject, payload: sink.append(payload))
    if session is not None:
        registry.apply(session.id, encode(session))
    return registry, sink


def _hot_path(registry: TapRegistry, sink: deque[bytes]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            if registry.active:
                record = registry.request_start(REQUEST)
                if record is not None:
                    record.response_start(200)
                    record.response_end(response_bytes=10)
    return run


class _Transport:
    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else None


HEADERS = [(b"Host", b"web-svc:8080"), (b"User-Agent", b"bench"), (b"Accept", b"*/*"),
           (b"Authorization", b"Bearer x")]


def _hooks(tap: TapSwitch) -> Callable[[int], None]:
    """One inbound request through the observer hooks, as the HTTP/1 engine makes them."""
    metrics = ProxyMetrics()
    observer = Observer("inbound", tap=tap, local=LOCAL)
    target = FixedTarget("127.0.0.1", 8080, None, None,  # type: ignore[arg-type]
                         0.1, series=RouteSeries(metrics, "inbound", {"tls": "false"}),
                         peer=observer.local_peer("127.0.0.1", 8080))
    conn = observer.connection(_Transport())
    endpoint = target.endpoint

    def run(n: int) -> None:
        for _ in range(n):
            obs = conn.request(target, endpoint, b"GET", b"web-svc:8080", b"/api/vote",
                               HEADERS, b"demo/vote-bot", 1.0)
            obs.response_start(200, (), 1.001)
            obs.response_bytes += 10
            if obs.needs_end:
                obs.response_end(())
    return run


def _metrics_alone() -> Callable[[int], None]:
    """What the engine counted before the hooks: one cached series, request + observe."""
    series = ProxyMetrics().request_metrics("inbound", {"tls": "false"})

    def run(n: int) -> None:
        for _ in range(n):
            series.request()
            series.observe(200, None, 1.0, True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    n = parser.parse_args().requests
    far = time.time() + 3600

    def compiled_out(count: int) -> None:
        for _ in range(count):
            pass

    cases: list[tuple[str, Callable[[int], None], int]] = [
        ("tap compiled out (empty loop)", compiled_out, n),
        ("no session open", _hot_path(*_registry(None)), n),
        ("session for another workload", _hot_path(*_registry(TapSession(
            id="a", filter=TapFilter(workload="voting"), expires_at=far))), n),
        ("session here, path does not match", _hot_path(*_registry(TapSession(
            id="b", filter=TapFilter(path_prefix="/other"), expires_at=far))), n // 10),
        ("matching session, 100 events/s cap", _hot_path(*_registry(TapSession(
            id="c", max_rps=100, expires_at=far))), n // 10),
        ("matching session, every request tapped", _hot_path(*_registry(TapSession(
            id="d", max_rps=10_000, expires_at=far))), min(n // 100, 9_000)),
    ]
    base = None
    for name, run, count in cases:
        ns = _per_request(run, count)
        base = ns if base is None else base
        print(f"{name:<40} {ns:10.1f} ns/request  (+{ns - base:.1f} over compiled out)")

    def registry(session: TapSession | None) -> TapRegistry:
        return _registry(session)[0]

    hooks: list[tuple[str, Callable[[int], None], int]] = [
        ("metrics alone (before the hooks)", _metrics_alone(), n),
        ("hooks, tap compiled out (--no-tap)", _hooks(TAP_OFF), n),
        ("hooks, no session open", _hooks(registry(None)), n),
        ("hooks, session for another workload", _hooks(registry(TapSession(
            id="a", filter=TapFilter(workload="voting"), expires_at=far))), n),
        ("hooks, matching session, 100 events/s", _hooks(registry(TapSession(
            id="c", max_rps=100, expires_at=far))), n // 10),
        ("hooks, every request tapped", _hooks(registry(TapSession(
            id="d", max_rps=10_000, expires_at=far))), min(n // 100, 9_000)),
    ]
    print()
    base = None
    for name, run, count in hooks:
        ns = _per_request(run, count)
        base = ns if base is None else base
        print(f"{name:<40} {ns:10.1f} ns/request  (+{ns - base:.1f} over metrics alone)")


if __name__ == "__main__":
    main()
