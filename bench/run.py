"""The benchmark's command line and its measuring loop.

Starts the nginx upstream (with wrk, on the load core), then every selected peer (on the
proxy core, alone), warms each one up, and runs wrk against every peer at every
connection count for N interleaved repetitions (the peer order rotates each repetition,
so slow drift in the machine spreads over all peers instead of landing on one). Prints
progress, then the table of medians and the ratios, and writes the JSON record. Every
process is stopped when the run ends, however it ends.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cpu, report
from bench.peers import (
    PEERS,
    PEERS_BY_NAME,
    Peer,
    PeerContext,
    Target,
    envoy_binary,
    find_program,
    start_upstream,
)
from bench.procs import PeerUnavailable, ProcessGroup
from bench.wrk import WrkParseError, WrkRunError, run_wrk

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The anchor's method (shared/bench-anchor/README.md).
DEFAULT_REPS = 3
DEFAULT_DURATION_SECONDS = 10
DEFAULT_CONNECTIONS = (50, 1)
QUICK_DURATION_SECONDS = 3
# Long enough to open every connection, fill the upstream pools and let Envoy's and
# Python's first-request costs pass; not counted.
DEFAULT_WARMUP_SECONDS = 2
QUICK_WARMUP_SECONDS = 1
WARMUP_CONNECTIONS = 50
# Envoy starts in about a second here; a Python proxy imports for about as long.
DEFAULT_READY_TIMEOUT_SECONDS = 20.0
# Bounds on what the command line accepts, so a typo cannot start an hour-long run.
MAX_REPS = 50
MAX_DURATION_SECONDS = 600
MAX_CONNECTIONS = 10_000
# A 1-minute load average above this means something else is using the cores the run
# pins to (2 cores here: wrk+nginx fill one, the proxy the other); the figures are then
# noisy, so the run says so.
BUSY_LOAD_AVERAGE = 0.5
# Version probes of the peer programs, for the record.
VERSION_PROBE_TIMEOUT_SECONDS = 10.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = ", ".join(p.name for p in PEERS)
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="wrk against a direct nginx, Envoy, HAProxy and the Shoal proxy, "
                    "with the proxy under test alone on one core.")
    parser.add_argument("--peers", default=",".join(p.name for p in PEERS),
                        help=f"comma-separated peers to measure (default: all of {names})")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"interleaved repetitions (default {DEFAULT_REPS})")
    parser.add_argument("--duration", type=int, default=None,
                        help=f"seconds per wrk run (default {DEFAULT_DURATION_SECONDS})")
    parser.add_argument("--connections", default=",".join(map(str, DEFAULT_CONNECTIONS)),
                        help="comma-separated wrk connection counts (default 50,1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"seconds of unmeasured load per peer first "
                             f"(default {DEFAULT_WARMUP_SECONDS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"1 repetition of {QUICK_DURATION_SECONDS} s (a smoke run)")
    parser.add_argument("--proxy-cpu", type=int, default=1,
                        help="core for the proxies under test, alone (default 1)")
    parser.add_argument("--load-cpu", type=int, default=0,
                        help="core for wrk and nginx (default 0)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness for every process of the run, wrk included (default "
                             "0; on a machine shared with other work, -10 gives the run "
                             "most of its cores at the others' expense; negative needs "
                             "root)")
    parser.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_SECONDS,
                        help="seconds a peer gets to answer its first request")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where the JSON record goes (default bench/results/)")
    args = parser.parse_args(argv)

    selected = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in selected if n not in PEERS_BY_NAME]
    if unknown or not selected:
        parser.error(f"unknown peer(s) {', '.join(unknown) or '(none given)'}; "
                     f"known: {names}")
    args.peer_list = [PEERS_BY_NAME[n] for n in dict.fromkeys(selected)]
    try:
        args.connection_list = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections wants integers like 50,1, not {args.connections!r}")
    if not args.connection_list or not all(0 < c <= MAX_CONNECTIONS
                                           for c in args.connection_list):
        parser.error(f"--connections must be between 1 and {MAX_CONNECTIONS}")
    if args.reps is None:
        args.reps = 1 if args.quick else DEFAULT_REPS
    if args.duration is None:
        args.duration = QUICK_DURATION_SECONDS if args.quick else DEFAULT_DURATION_SECONDS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP_SECONDS if args.quick else DEFAULT_WARMUP_SECONDS
    if not 0 < args.reps <= MAX_REPS:
        parser.error(f"--reps must be between 1 and {MAX_REPS}")
    if not 0 < args.duration <= MAX_DURATION_SECONDS:
        parser.error(f"--duration must be between 1 and {MAX_DURATION_SECONDS} seconds")
    if not 0 <= args.warmup <= MAX_DURATION_SECONDS:
        parser.error(f"--warmup must be between 0 and {MAX_DURATION_SECONDS} seconds")
    if not -20 <= args.nice <= 19:
        parser.error("--nice must be between -20 and 19")
    if args.nice < 0 and os.geteuid() != 0:
        parser.error("a negative --nice needs root")
    if args.ready_timeout <= 0:
        parser.error("--ready-timeout must be positive")
    return args


def choose_cpus(args: argparse.Namespace) -> tuple[int | None, int | None, str]:
    """(proxy core, load core, a note): unpinned when asked or when the cores are missing."""
    if args.no_pin:
        return None, None, "not pinned (--no-pin)"
    cores = os.sched_getaffinity(0)
    if args.proxy_cpu == args.load_cpu:
        return None, None, "not pinned (--proxy-cpu equals --load-cpu)"
    if args.proxy_cpu not in cores or args.load_cpu not in cores:
        return None, None, (f"not pinned: cores {args.proxy_cpu} and {args.load_cpu} "
                            f"are not both available (have {sorted(cores)})")
    try:
        find_program("taskset")
    except PeerUnavailable:
        return None, None, "not pinned: taskset is not installed"
    return args.proxy_cpu, args.load_cpu, (f"proxies on core {args.proxy_cpu}, "
                                           f"wrk and nginx on core {args.load_cpu}")


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=VERSION_PROBE_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout + done.stderr).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), "unknown")


def environment() -> dict[str, Any]:
    versions: dict[str, str] = {}
    for name, flag in (("wrk", "-v"), ("nginx", "-v"), ("haproxy", "-v")):
        try:
            versions[name] = _first_line([find_program(name), flag])
        except PeerUnavailable as exc:
            versions[name] = str(exc)
    try:
        versions["envoy"] = _first_line([str(envoy_binary()), "--version"])
    except PeerUnavailable as exc:
        versions["envoy"] = str(exc)
    return {"host": platform.node(), "kernel": platform.release(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
            "versions": versions}


def one_line(reason: str) -> str:
    """A multi-line reason (a header and a log tail) as one line: the header and the
    last line of the tail that says something (frame drawing stripped)."""
    lines = [line.strip(" \t|\u2502\u256d\u256e\u2570\u256f\u2500") for line in
             reason.strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return "no reason given"
    if len(lines) == 1:
        return lines[0]
    return f"{lines[0].rstrip(':')}: {lines[-1]}"


def start_peers(peers: Sequence[Peer], ctx: PeerContext
                ) -> tuple[dict[str, Target], dict[str, str], dict[str, list[int]]]:
    """Start every peer; returns the targets, the reasons of those that could not start,
    and the pids of each started peer's processes (for the CPU accounting)."""
    targets: dict[str, Target] = {}
    unavailable: dict[str, str] = {}
    pids: dict[str, list[int]] = {}
    for peer in peers:
        before = {m.popen.pid for m in ctx.procs.running}
        try:
            targets[peer.name] = peer.start(ctx)
            pids[peer.name] = [m.popen.pid for m in ctx.procs.running
                               if m.popen.pid not in before]
        except PeerUnavailable as exc:
            reason = str(exc).strip()
            unavailable[peer.name] = reason
            first, _, rest = reason.partition("\n")
            print(f"  {peer.name:<16} not available: {first}")
            for line in rest.splitlines():
                print(f"  {'':<16}   | {line}")
            continue
        print(f"  {peer.name:<16} ready on {targets[peer.name].url}  ({peer.description})")
    return targets, unavailable, pids


def measure(peers: Sequence[Peer], targets: dict[str, Target], pids: dict[str, list[int]],
            args: argparse.Namespace, proxy_cpu: int | None, load_cpu: int | None
            ) -> list[report.Run]:
    live = [p for p in peers if p.name in targets]
    if args.warmup:
        print(f"warming up ({args.warmup}s each)")
        for peer in live:
            target = targets[peer.name]
            try:
                run_wrk(target.url, WARMUP_CONNECTIONS, args.warmup, target.host_header,
                        load_cpu, args.nice)
            except (WrkRunError, WrkParseError) as exc:
                print(f"  {peer.name}: warm-up failed: {exc}")
    runs: list[report.Run] = []
    for rep in range(args.reps):
        order = live[rep % len(live):] + live[:rep % len(live)] if live else []
        for peer in order:
            target = targets[peer.name]
            for conns in args.connection_list:
                prefix = f"[rep {rep + 1}/{args.reps}] {peer.name:<16} c={conns:<4}"
                ours = pids.get(peer.name, [])
                before = cpu.sample(proxy_cpu, ours) if proxy_cpu is not None else None
                try:
                    result = run_wrk(target.url, conns, args.duration, target.host_header,
                                     load_cpu, args.nice)
                except (WrkRunError, WrkParseError) as exc:
                    runs.append(report.Run(peer.name, conns, rep, error=str(exc)))
                    print(f"{prefix} failed: {exc}")
                    continue
                after = cpu.sample(proxy_cpu, ours) if proxy_cpu is not None else None
                share = cpu.foreign_share(before, after)
                runs.append(report.Run(peer.name, conns, rep, result=result,
                                       foreign_share=share))
                errors = f"  errors {result.errors}" if result.errors else ""
                if share is not None and share > cpu.FOREIGN_SHARE_FLAG:
                    errors += f"  (others took {share:.0%} of the proxy core)"
                print(f"{prefix} {result.requests_per_second:>10,.0f} req/s  "
                      f"p50 {report.format_latency(result.p50_us):>8}  "
                      f"p99 {report.format_latency(result.p99_us):>8}{errors}", flush=True)
    return runs


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the finally blocks stop every child.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    proxy_cpu, load_cpu, pin_note = choose_cpus(args)
    started = datetime.datetime.now()
    peers: list[Peer] = args.peer_list
    print(f"shoal bench: {len(peers)} peers, {args.reps} rep(s) x {args.duration}s at "
          f"{','.join(map(str, args.connection_list))} connections; {pin_note}")
    env = environment()
    if env["loadavg"][0] > BUSY_LOAD_AVERAGE:
        print(f"warning: load average {env['loadavg'][0]:.2f} before starting: other work "
              f"is using the cores, so figures will be low and noisy")
    settings = {"peers": [p.name for p in peers], "reps": args.reps,
                "duration_seconds": args.duration, "warmup_seconds": args.warmup,
                "connections": args.connection_list, "proxy_cpu": proxy_cpu,
                "load_cpu": load_cpu, "nice": args.nice, "wrk_threads": 1,
                "started": started.isoformat(timespec="seconds")}
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp, \
                ProcessGroup(Path(tmp), nice=args.nice) as procs:
            workdir = Path(tmp)
            try:
                upstream = start_upstream(procs, workdir, load_cpu, args.ready_timeout)
            except PeerUnavailable as exc:
                print(f"cannot start the nginx upstream: {exc}", file=sys.stderr)
                return 1
            print(f"  {'upstream':<16} nginx on 127.0.0.1:{upstream}")
            ctx = PeerContext(procs=procs, workdir=workdir, upstream_port=upstream,
                              proxy_cpu=proxy_cpu, repo_root=REPO_ROOT,
                              ready_timeout=args.ready_timeout)
            targets, unavailable, pids = start_peers(peers, ctx)
            if not targets:
                print("no peer could be started; nothing to measure", file=sys.stderr)
                return 1
            runs = measure(peers, targets, pids, args, proxy_cpu, load_cpu)
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130

    order = [p.name for p in peers]
    summaries = report.summarize(runs, order, args.connection_list)
    print()
    print(f"medians of {args.reps} run(s) of {args.duration}s, wrk -t1 --latency; "
          f"ratios are req/s against the same connection count; 'others' is the largest "
          f"share of the proxy core other processes took in one run")
    print(report.format_table(summaries))
    subjects = [p.name for p in peers if p.envoy_counterpart]
    comparison = report.format_comparisons(summaries, subjects)
    if comparison:
        print()
        print(comparison)
    for name, reason in unavailable.items():
        print(f"{name}: not available: {one_line(reason)}")
    env["loadavg_after"] = os.getloadavg()
    path = args.results_dir / f"{started.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        report.write_json(path, report.record(settings, env, unavailable, runs, summaries))
    except OSError as exc:
        print(f"could not write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"\nrecord: {path}")
    failed = [r for r in runs if r.error is not None]
    return 1 if failed and len(failed) == len(runs) else 0
