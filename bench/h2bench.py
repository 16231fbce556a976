"""HTTP/2 and gRPC unary through Shoal, Envoy, and nothing (direct), with h2load.

One run per peer and scenario (h2load ``-c C -m M -D S`` after a warm-up), the proxies
alone on the proxy core, h2load and the upstream on the other (the method of
shared/bench-anchor), then a table of req/s, mean latency, ratios, and the CPU the
proxies spent per request (the figure that holds on a machine shared with other work):

  scenario      request                              upstream
  h2-get        GET /                                nginx h2c, "ok" (3 bytes)
  grpc-nginx    POST /t.Echo/Unary, gRPC framing     nginx h2c answering a trailers-only
                (content-type application/grpc, te)  grpc-status 0 (fast: the proxy's cost)
  grpc-grpcio   the same                             a grpcio server echoing the message

  peer          path
  direct        h2load -> upstream
  envoy         h2load -> Envoy (h2 both sides) -> upstream
  shoal         h2load -> Shoal outbound (static endpoint, routed by :authority) -> upstream
  envoy-pair    h2load -> Envoy -> Envoy -> upstream
  shoal-mesh    h2load -> Shoal outbound -> Shoal inbound -> upstream (h2c between them)

    python -m bench.h2bench                       # every scenario and peer, 10 s each
    python -m bench.h2bench --quick --scenarios grpc-nginx --peers direct,envoy,shoal
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench import configs
from bench.peers import envoy_binary, find_program
from bench.procs import Managed, PeerUnavailable, ProcessGroup, placement

REPO = Path(__file__).resolve().parents[1]
AUTHORITY = "up.bench"  # the service name the Shoal peers route by
# h2load load shape: 10 connections x 10 streams, as many in flight as a busy gRPC client
# pool; -c1 -m1 would measure wake-up latency more than the proxies.
DEFAULT_CLIENTS = 10
DEFAULT_STREAMS = 10
DEFAULT_SECONDS = 10
QUICK_SECONDS = 3
WARMUP_SECONDS = 1
READY_TIMEOUT_SECONDS = 20.0
H2LOAD_SLACK_SECONDS = 30.0  # on top of warm-up + duration, for start and teardown
MAX_SECONDS = 600
PROXY_CPU, LOAD_CPU = 1, 0
# A gRPC message: uncompressed, 5 bytes of payload ("hello").
GRPC_MESSAGE = b"\x00\x00\x00\x00\x05hello"
GRPC_SERVER = """
import sys
from concurrent import futures
import grpc
handler = grpc.method_handlers_generic_handler("t.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
server = grpc.server(futures.ThreadPoolExecutor(16), handlers=[handler])
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    grpc: bool
    upstream: str  # "nginx" or "grpcio"


SCENARIOS = (Scenario("h2-get", "/", False, "nginx"),
             Scenario("grpc-nginx", "/t.Echo/Unary", True, "nginx"),
             Scenario("grpc-grpcio", "/t.Echo/Unary", True, "grpcio"))
PEERS = ("direct", "envoy", "shoal", "envoy-pair", "shoal-mesh")
COUNTERPART = {"shoal": "envoy", "shoal-mesh": "envoy-pair"}


@dataclass
class Result:
    scenario: str
    peer: str
    rps: float
    mean_ms: float
    succeeded: int
    failed: int
    cpu_us: float | None  # the proxies' CPU (user + system) per request; None: direct


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of the processes so far (from /proc; the robust figure on a
    machine shared with other work, where req/s also measures the neighbours)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def nginx_h2_conf(workdir: Path, port: int) -> str:
    return f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections {configs.NGINX_WORKER_CONNECTIONS}; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp;
    scgi_temp_path {workdir}/tmp;
    keepalive_requests {configs.NGINX_KEEPALIVE_REQUESTS};
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ return 200 "ok\\n"; }}
        location /t.Echo/ {{
            default_type application/grpc;
            add_header grpc-status 0;
            return 200;
        }}
    }}
}}
"""


def envoy_h2_config(listen_port: int, admin_port: int, upstream_port: int) -> str:
    """The anchor's Envoy, speaking HTTP/2 to the upstream too."""
    config = json.loads(configs.envoy_config(listen_port, admin_port, upstream_port))
    cluster = config["static_resources"]["clusters"][0]
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                     "HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return json.dumps(config, indent=1) + "\n"


def h2_ok(port: int, path: str, authority: str | None) -> bool:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
            "--http2-prior-knowledge"]
    if authority:
        argv += ["-H", f"Host: {authority}"]
    result = subprocess.run([*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True,
                            check=False)
    return result.stdout == b"200"


Probe = Callable[[int, str | None], bool]


def get_ok(port: int, authority: str | None) -> bool:
    return h2_ok(port, "/", authority)


def wait_h2(watch: Sequence[Managed], port: int, authority: str | None,
            probe: Probe = get_ok) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not probe(port, authority):
        for managed in watch:
            if managed.popen.poll() is not None:
                raise PeerUnavailable(f"{managed.name} exited:\n{managed.log_tail()}")
        if time.monotonic() > deadline:
            raise PeerUnavailable(f"port {port} not answering HTTP/2 after "
                                  f"{READY_TIMEOUT_SECONDS:g}s")
        time.sleep(0.1)


def shoal(procs: ProcessGroup, name: str, *args: str) -> Managed:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return procs.start(name, [sys.executable, "-m", "shoal.proxy", "--no-bus",
                              "--log-level", "warning", *args], cpu=PROXY_CPU, env=env,
                       cwd=REPO)


def start_peer(procs: ProcessGroup, peer: str, upstream: int,
               probe: Probe) -> tuple[int, str | None]:
    """(port to load, authority to send) for ``peer`` in front of ``upstream``, once a
    request through it passes ``probe``."""
    free = procs.free_port
    if peer == "direct":
        return upstream, None
    if peer in ("envoy", "envoy-pair"):
        binary = str(envoy_binary())
        front, chain = free(), []
        target = upstream
        if peer == "envoy-pair":
            back = free()
            conf = procs.workdir / "envoy-back.yaml"
            conf.write_text(envoy_h2_config(back, free(), upstream))
            chain.append(procs.start("envoy-back", [binary, "-c", str(conf), "--concurrency",
                                                    "1", "--disable-hot-restart"],
                                     cpu=PROXY_CPU))
            target = back
        conf = procs.workdir / f"{peer}.yaml"
        conf.write_text(envoy_h2_config(front, free(), target))
        chain.append(procs.start(peer, [binary, "-c", str(conf), "--concurrency", "1",
                                        "--disable-hot-restart"], cpu=PROXY_CPU))
        wait_h2(chain, front, None, probe)
        return front, None
    out = free()
    target = upstream
    chain = []
    if peer == "shoal-mesh":
        inbound = free()
        chain.append(shoal(procs, "shoal-inbound", "--outbound-port", "0", "--inbound-port",
                           str(inbound), "--admin-port", str(free()), "--app-port",
                           str(upstream)))
        target = inbound
    chain.append(shoal(procs, peer, "--outbound-port", str(out), "--inbound-port", "0",
                       "--admin-port", str(free()), "--static-endpoint",
                       f"{AUTHORITY}=127.0.0.1:{target}"))
    wait_h2(chain, out, AUTHORITY, probe)
    return out, AUTHORITY


def start_upstream(procs: ProcessGroup, kind: str) -> int:
    port = procs.free_port()
    if kind == "nginx":
        (procs.workdir / "tmp").mkdir(exist_ok=True)
        conf = procs.workdir / "nginx-h2.conf"
        conf.write_text(nginx_h2_conf(procs.workdir, port))
        managed = procs.start("nginx", [find_program("nginx"), "-p", str(procs.workdir),
                                        "-c", str(conf)], cpu=LOAD_CPU)
        wait_h2([managed], port, None)
        return port
    script = procs.workdir / "grpc_server.py"
    script.write_text(GRPC_SERVER)
    body = procs.workdir / "grpc-message"
    body.write_bytes(GRPC_MESSAGE)
    managed = procs.start("grpcio", [sys.executable, str(script), str(port)], cpu=LOAD_CPU)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not _grpc_ok(port, None, body):
        if managed.popen.poll() is not None or time.monotonic() > deadline:
            raise PeerUnavailable(f"grpcio server not up:\n{managed.log_tail()}")
        time.sleep(0.1)
    return port


def _grpc_ok(port: int, authority: str | None, body: Path) -> bool:
    result = subprocess.run(["h2load", "-n", "1", *_grpc_args(body, authority),
                             f"http://127.0.0.1:{port}/t.Echo/Unary"],
                            capture_output=True, check=False, timeout=10)
    return b"1 succeeded" in result.stdout


def _grpc_probe(port: int, authority: str | None, body: Path) -> bool:
    return _grpc_ok(port, authority, body)


def _grpc_args(body: Path, authority: str | None) -> list[str]:
    args = ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if authority:
        args += ["-H", f":authority: {authority}"]
    return args


def run_h2load(port: int, scenario: Scenario, authority: str | None, seconds: int,
               clients: int, streams: int, body: Path) -> tuple[float, float, int, int]:
    """(req/s, mean ms, succeeded, failed)."""
    argv = [*placement(LOAD_CPU), "h2load", "-c", str(clients), "-m", str(streams), "-t", "1",
            "-D", str(seconds), "--warm-up-time", str(WARMUP_SECONDS)]
    if scenario.grpc:
        argv += _grpc_args(body, authority)
    elif authority:
        argv += ["-H", f":authority: {authority}"]
    argv.append(f"http://127.0.0.1:{port}{scenario.path}")
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            timeout=seconds + WARMUP_SECONDS + H2LOAD_SLACK_SECONDS)
    return parse_h2load(result.stdout)


def parse_h2load(text: str) -> tuple[float, float, int, int]:
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    requests = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, "
                         r"(\d+) failed", text)
    latency = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", text)
    if rate is None or requests is None or latency is None:
        raise ValueError(f"unexpected h2load output:\n{text[-2000:]}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[latency.group(2)]
    return (float(rate.group(1)), float(latency.group(1)) * scale, int(requests.group(1)),
            int(requests.group(2)))


def measure(scenarios: Sequence[Scenario], peers: Sequence[str], seconds: int, clients: int,
            streams: int, say: Callable[[str], None]) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="shoal-h2bench-") as tmp:
        body = Path(tmp) / "grpc-message"
        body.write_bytes(GRPC_MESSAGE)
        for scenario in scenarios:
            for peer in peers:
                workdir = Path(tmp) / f"{scenario.name}-{peer}"
                workdir.mkdir()
                with ProcessGroup(workdir) as procs:
                    try:
                        upstream = start_upstream(procs, scenario.upstream)
                        probe: Probe = get_ok
                        if scenario.upstream == "grpcio":
                            probe = partial(_grpc_probe, body=body)
                        port, authority = start_peer(procs, peer, upstream, probe)
                        pids = [m.popen.pid for m in procs.running
                                if m.name not in ("nginx", "grpcio")]
                        before = cpu_seconds(pids)
                        rps, mean, ok, failed = run_h2load(port, scenario, authority, seconds,
                                                           clients, streams, body)
                        used = cpu_seconds(pids) - before
                    except (PeerUnavailable, ValueError) as error:
                        say(f"{scenario.name:12} {peer:11} not available: {error}")
                        continue
                # h2load's warm-up requests are not in its count; its duration is.
                total = rps * (seconds + WARMUP_SECONDS)
                cpu_us = used / total * 1e6 if pids and total else None
                results.append(Result(scenario.name, peer, rps, mean, ok, failed, cpu_us))
                cpu_text = f"  cpu {cpu_us:6.0f} us/req" if cpu_us is not None else ""
                say(f"{scenario.name:12} {peer:11} {rps:9.0f} req/s  mean {mean:7.2f} ms  "
                    f"({ok} ok, {failed} failed){cpu_text}")
    return results


def table(results: Sequence[Result]) -> str:
    by = {(r.scenario, r.peer): r for r in results}
    lines = [f"{'scenario':12} {'peer':11} {'req/s':>9} {'mean ms':>8} {'/direct':>8} "
             f"{'/envoy':>8} {'cpu us/req':>11} {'cpu/envoy':>10}"]
    for r in results:
        direct = by.get((r.scenario, "direct"))
        counterpart = by.get((r.scenario, COUNTERPART.get(r.peer, "")))
        vs_direct = f"{r.rps / direct.rps:.2f}x" if direct and direct.rps else "-"
        vs_envoy = f"{r.rps / counterpart.rps:.2f}x" if counterpart and counterpart.rps else "-"
        cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "-"
        cpu_ratio = "-"
        if r.cpu_us is not None and counterpart is not None and counterpart.cpu_us:
            cpu_ratio = f"{r.cpu_us / counterpart.cpu_us:.2f}x"
        lines.append(f"{r.scenario:12} {r.peer:11} {r.rps:9.0f} {r.mean_ms:8.2f} "
                     f"{vs_direct:>8} {vs_envoy:>8} {cpu:>11} {cpu_ratio:>10}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.h2bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS))
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS)
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--streams", type=int, default=DEFAULT_STREAMS)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS} s per run")
    args = parser.parse_args(argv)
    known = {s.name: s for s in SCENARIOS}
    scenarios = [known[name] for name in args.scenarios.split(",") if name in known]
    peers = [name for name in args.peers.split(",") if name in PEERS]
    if not scenarios or not peers:
        parser.error(f"scenarios from {sorted(known)}, peers from {PEERS}")
    seconds = QUICK_SECONDS if args.quick else args.seconds
    if not 1 <= seconds <= MAX_SECONDS or not 1 <= args.clients <= 1000 or not (
            1 <= args.streams <= 1000):
        parser.error("seconds 1..600, clients and streams 1..1000")
    print(f"h2load -c {args.clients} -m {args.streams} -D {seconds}s; proxies on cpu "
          f"{PROXY_CPU}, h2load and upstream on cpu {LOAD_CPU}; load {os.getloadavg()[0]:.2f}")
    results = measure(scenarios, peers, seconds, args.clients, args.streams, print)
    print()
    print(table(results))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
