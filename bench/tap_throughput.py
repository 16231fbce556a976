"""What tap costs a real proxy, measured with wrk: one Shoal outbound proxy (a
port-mapped upstream to nginx through a static endpoint, a real bus for the tap bucket)
per state, each alone on the proxy core while it is loaded:

- ``compiled-out``: ``--no-tap``, the registry replaced by a constant False;
- ``no-session``: tap on, sessions open for other workloads only (``active`` is False);
- ``session``: one open session matching every request, Linkerd's default 100 events/s;
- ``session-all``: one session at 10,000 events/s, so every request is tapped;
- ``baseline`` (with ``--baseline TREE``): the proxy of another source tree (say
  ``git archive <commit> | tar -x -C TREE``) with the same flags, for what the hooks
  themselves (route labels, the per-request observer) cost against an older proxy.

Sessions are written to ``shoal_tap`` as the tap service writes them, re-written before
every run (the bucket's TTL is a minute), and a proxy counts as tapped once a plain
subscriber on ``shoal.v1.tap.>`` sees its events. Runs are interleaved (the order
rotates each repetition); medians are printed. wrk and nginx share the load core.
Besides req/s the table gives the proxy's own CPU time per request (user + system, from
/proc), which neighbours on a shared machine disturb far less than throughput, and the
share of the proxy core other processes took during the runs (bench/cpu.py).

    python -m bench.tap_throughput [--reps 3] [--duration 10] [--connections 50]
                                   [--baseline TREE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client

from bench import cpu
from bench.peers import SHOAL_NAMESPACE, UPSTREAM_SERVICE, find_program, start_upstream
from bench.procs import PeerUnavailable, ProcessGroup, wait_http_ok
from bench.wrk import WrkResult, run_wrk
from shoal.kernel.bus import connect, ensure_buckets
from shoal.kernel.config import BusSettings, bus_environment, generate_credentials
from shoal.kernel.natsd import EmbeddedNats
from shoal.schemas import names
from shoal.schemas.codec import encode
from shoal.schemas.tap import TapFilter, TapSession

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 20.0
# A session reaches the proxy's watch in about a millisecond; a second is generous.
TAP_SEEN_TIMEOUT_SECONDS = 5.0
# Sessions live this long (under the bucket's 60 s TTL) and are re-written before a run.
SESSION_SECONDS = 55.0
WARMUP_SECONDS = 2
MAX_REPS = 20
MAX_DURATION_SECONDS = 120


@dataclass(frozen=True)
class Mode:
    name: str
    flags: tuple[str, ...]
    max_rps: float | None  # a session matching this proxy, or None
    description: str
    tree: Path | None = None  # run the proxy of this source tree instead


MODES = (
    Mode("compiled-out", ("--no-tap",), None, "tap compiled out (--no-tap)"),
    Mode("no-session", (), None, "no session for this proxy"),
    Mode("session", (), 100.0, "one session, 100 events/s"),
    Mode("session-all", (), 10_000.0, "one session, every request tapped"),
)


@dataclass
class Proxy:
    mode: Mode
    workload: str
    port: int
    pid: int


@dataclass(frozen=True)
class Run:
    wrk: WrkResult
    cpu_us: float | None  # proxy CPU time per request
    foreign: float | None  # share of the proxy core other processes used


JIFFY_US = 1e6 / os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tap_throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--proxy-cpu", type=int, default=1)
    parser.add_argument("--load-cpu", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a source tree whose proxy is measured too (no tap flags)")
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "proxy" / "app.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a Shoal source tree")
    if not 0 < args.reps <= MAX_REPS:
        parser.error(f"--reps must be 1..{MAX_REPS}")
    if not 0 < args.duration <= MAX_DURATION_SECONDS:
        parser.error(f"--duration must be 1..{MAX_DURATION_SECONDS}")
    if not 0 < args.connections <= 10_000:
        parser.error("--connections must be 1..10000")
    return args


def _cpus(args: argparse.Namespace) -> tuple[int | None, int | None]:
    cores = os.sched_getaffinity(0)
    if args.no_pin or args.proxy_cpu == args.load_cpu or not {
            args.proxy_cpu, args.load_cpu} <= cores:
        return None, None
    return args.proxy_cpu, args.load_cpu


async def _open_session(nc: Client, proxy: Proxy) -> None:
    """Write this proxy's session (as the tap service would), or sessions for another
    workload only (``no-session``), then wait until its events appear."""
    kv = await nc.jetstream().key_value(names.BUCKET_TAP)
    expires = time.time() + SESSION_SECONDS
    if proxy.mode.max_rps is None:
        if proxy.mode.name == "no-session":
            other = TapSession(id=f"other-{proxy.workload}", expires_at=expires,
                               filter=TapFilter(namespace=SHOAL_NAMESPACE,
                                                workload="someone-else"))
            await kv.put(other.id, encode(other))
        return
    session = TapSession(id=f"bench-{proxy.workload}", max_rps=proxy.mode.max_rps,
                         expires_at=expires,
                         filter=TapFilter(namespace=SHOAL_NAMESPACE, workload=proxy.workload))
    await kv.put(session.id, encode(session))
    seen = asyncio.Event()

    async def on_event(_msg: object) -> None:
        seen.set()

    sub = await nc.subscribe(names.tap_subject(SHOAL_NAMESPACE, proxy.workload,
                                               f"{proxy.workload}-1"), cb=on_event)
    try:
        deadline = time.monotonic() + TAP_SEEN_TIMEOUT_SECONDS
        while not seen.is_set():
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"{proxy.mode.name}: no tap event within "
                                      f"{TAP_SEEN_TIMEOUT_SECONDS:g}s")
            await asyncio.to_thread(_one_request, proxy.port)
            await asyncio.sleep(0.05)
    finally:
        await sub.unsubscribe()


def _one_request(port: int) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
    finally:
        conn.close()


def _start_proxies(procs: ProcessGroup, bus: BusSettings, upstream_port: int,
                   cpu: int | None, baseline: Path | None) -> list[Proxy]:
    env = {**os.environ, **bus_environment(bus), "PYTHONUNBUFFERED": "1"}
    authority = f"{UPSTREAM_SERVICE}.{SHOAL_NAMESPACE}"
    started = []
    modes = list(MODES)
    if baseline is not None:
        modes.append(Mode("baseline", (), None, f"baseline ({baseline.name})",
                          baseline.resolve()))
    for index, mode in enumerate(modes):
        workload = f"client{index}"
        local, admin = procs.free_port(), procs.free_port()
        argv = [sys.executable, "-m", "shoal.proxy", "--namespace", SHOAL_NAMESPACE,
                "--workload", workload, "--pod", f"{workload}-1",
                "--outbound-port", str(procs.free_port()), "--inbound-port", "0",
                "--admin-port", str(admin), "--no-register",
                "--upstream", f"{local}={authority}:{upstream_port}",
                "--static-endpoint", f"{authority}=127.0.0.1:{upstream_port}", *mode.flags]
        tree = mode.tree or REPO_ROOT
        managed = procs.start(f"proxy-{mode.name}", argv, cpu=cpu,
                              env={**env, "PYTHONPATH": str(tree)}, cwd=tree)
        wait_http_ok([managed], admin, READY_TIMEOUT_SECONDS, path="/ready")
        wait_http_ok([managed], local, READY_TIMEOUT_SECONDS)
        started.append(Proxy(mode, workload, local, managed.popen.pid))
    return started


def _measure(proxy: Proxy, args: argparse.Namespace, proxy_cpu: int | None,
             load_cpu: int | None) -> Run:
    core = proxy_cpu if proxy_cpu is not None else 0
    before = cpu.sample(core, [proxy.pid])
    result = run_wrk(f"http://127.0.0.1:{proxy.port}/", args.connections, args.duration,
                     None, load_cpu)
    after = cpu.sample(core, [proxy.pid])
    cpu_us = None
    if before is not None and after is not None and result.requests:
        cpu_us = (after.ours - before.ours) * JIFFY_US / result.requests
    share = cpu.foreign_share(before, after) if proxy_cpu is not None else None
    return Run(result, cpu_us, share)


def _median(runs: list[Run]) -> tuple[float, float, float, float | None, float | None]:
    cpus = [r.cpu_us for r in runs if r.cpu_us is not None]
    shares = [r.foreign for r in runs if r.foreign is not None]
    return (statistics.median(r.wrk.requests_per_second for r in runs),
            statistics.median(r.wrk.p50_us for r in runs),
            statistics.median(r.wrk.p99_us for r in runs),
            statistics.median(cpus) if cpus else None, max(shares) if shares else None)


async def _run(args: argparse.Namespace, workdir: Path) -> int:
    find_program("wrk")
    proxy_cpu, load_cpu = _cpus(args)
    credentials = generate_credentials()
    server = EmbeddedNats(state_dir=workdir / "bus", credentials=credentials)
    server.start()
    if load_cpu is not None and server.pid:  # tap events load it, not the proxy core
        os.sched_setaffinity(server.pid, {load_cpu})
    nc: Client | None = None
    try:
        controller = BusSettings(url=server.url, user=credentials["controller"].user,
                                 password=credentials["controller"].password,
                                 role="controller")
        proxy_bus = BusSettings(url=server.url, user=credentials["proxy"].user,
                                password=credentials["proxy"].password, role="proxy")
        nc = await connect(controller, "bench-tap")
        await ensure_buckets(nc.jetstream())
        with ProcessGroup(workdir) as procs:
            upstream = start_upstream(procs, workdir, load_cpu, READY_TIMEOUT_SECONDS)
            proxies = _start_proxies(procs, proxy_bus, upstream, proxy_cpu, args.baseline)
            print(f"wrk -t1 -c{args.connections} -d{args.duration}s, {args.reps} reps; "
                  f"proxy core {proxy_cpu}, load core (wrk, nginx, nats-server) {load_cpu}",
                  flush=True)
            results: dict[str, list[Run]] = {p.mode.name: [] for p in proxies}
            for proxy in proxies:  # warm-up: pools filled, first-request costs paid
                await _open_session(nc, proxy)
                await asyncio.to_thread(run_wrk, f"http://127.0.0.1:{proxy.port}/",
                                        args.connections, WARMUP_SECONDS, None, load_cpu)
            for rep in range(args.reps):
                order = proxies[rep % len(proxies):] + proxies[:rep % len(proxies)]
                for proxy in order:
                    await _open_session(nc, proxy)
                    run = await asyncio.to_thread(_measure, proxy, args, proxy_cpu, load_cpu)
                    results[proxy.mode.name].append(run)
                    print(f"  rep {rep + 1} {proxy.mode.name:<13} "
                          f"{run.wrk.requests_per_second:9.0f} req/s "
                          f"{_show(run.cpu_us, '.1f')} us CPU/request", flush=True)
            base = _median(results["compiled-out"])
            print(f"\n{'state':<36} {'req/s':>8} {'vs out':>7} {'p50':>8} {'p99':>9} "
                  f"{'CPU/req':>8} {'vs out':>7} {'others':>7}")
            for proxy in proxies:
                rps, p50, p99, cpu_us, share = _median(results[proxy.mode.name])
                cpu_ratio = cpu_us / base[3] if cpu_us is not None and base[3] else None
                print(f"{proxy.mode.description:<36} {rps:8.0f} {rps / base[0]:7.3f} "
                      f"{p50:6.0f}us {p99:7.0f}us {_show(cpu_us, '6.1f')}us "
                      f"{_show(cpu_ratio, '7.3f')} {_show(share, '7.0%')}")
                spread = [r.wrk.requests_per_second for r in results[proxy.mode.name]]
                print(f"{'':<36} runs: {', '.join(f'{v:.0f}' for v in spread)}")
    finally:
        if nc is not None:
            await nc.close()
        server.stop()
    return 0


def _show(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shoal-tap-bench-") as tmp:
        try:
            return asyncio.run(_run(args, Path(tmp)))
        except PeerUnavailable as error:
            print(f"cannot run: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
