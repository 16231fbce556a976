"""Smoke tests of the benchmark harness: wrk output parsing on captured samples, the
report's medians and ratios, the peer configuration files, bad command lines, and one
real one-second wrk run against the harness's own nginx upstream (no speed asserted,
only that a measurement came out)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import configs, cpu, report
from bench.peers import (
    ShoalProxyArgs,
    find_program,
    shoal_proxy_argv,
    shoal_unavailable_reason,
    start_upstream,
)
from bench.procs import PeerUnavailable, ProcessGroup, http_status
from bench.run import one_line, parse_args
from bench.wrk import WrkParseError, WrkResult, parse_wrk_output, run_wrk, to_microseconds

# Captured from wrk 4.1.0 (Debian) against the nginx upstream on this machine.
SAMPLE_US_MS = """\
Running 1s test @ http://127.0.0.1:18181/
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.09ms    1.92ms  12.43ms   86.72%
    Req/Sec    26.97k     8.47k   39.90k    50.00%
  Latency Distribution
     50%  198.00us
     75%    1.06ms
     90%    3.76ms
     99%    8.36ms
  27234 requests in 1.02s, 3.90MB read
Requests/sec:  26673.30
Transfer/sec:      3.82MB
"""

# A peer in trouble: latencies in seconds, socket errors and non-2xx answers.
SAMPLE_SECONDS_ERRORS = """\
Running 10s test @ http://127.0.0.1:10000/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.51s   503.20ms   2.00s    66.67%
    Req/Sec     0.80      1.10     3.00     80.00%
  Latency Distribution
     50%    1.80s
     75%    2.00s
     90%    2.00s
     99%    2.00s
  12 requests in 10.01s, 1.70KB read
  Socket errors: connect 0, read 3, write 0, timeout 40
  Non-2xx or 3xx responses: 12
Requests/sec:      1.20
Transfer/sec:     174.00B
"""

# The same run without --latency: no distribution to read percentiles from.
SAMPLE_NO_LATENCY = """\
Running 1s test @ http://127.0.0.1:18181/
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.13ms   14.83ms 102.51ms   94.55%
    Req/Sec    26.73k    14.71k   46.53k    70.00%
  27169 requests in 1.09s, 3.89MB read
Requests/sec:  24847.57
Transfer/sec:      3.55MB
"""


def test_parse_microseconds_and_milliseconds() -> None:
    r = parse_wrk_output(SAMPLE_US_MS)
    assert r.requests_per_second == pytest.approx(26673.30)
    assert r.requests == 27234
    assert r.duration_seconds == pytest.approx(1.02)
    assert r.p50_us == pytest.approx(198.0)
    assert r.p99_us == pytest.approx(8360.0)
    assert r.percentiles_us[75.0] == pytest.approx(1060.0)
    assert r.latency_avg_us == pytest.approx(1090.0)
    assert r.errors == 0


def test_parse_seconds_and_errors() -> None:
    r = parse_wrk_output(SAMPLE_SECONDS_ERRORS)
    assert r.requests_per_second == pytest.approx(1.2)
    assert r.p50_us == pytest.approx(1_800_000.0)
    assert r.p99_us == pytest.approx(2_000_000.0)
    assert r.latency_avg_us == pytest.approx(1_510_000.0)
    assert (r.socket_errors, r.non_2xx, r.errors) == (43, 12, 55)


def test_parse_rejects_output_without_latency_or_rate() -> None:
    with pytest.raises(WrkParseError, match="--latency"):
        parse_wrk_output(SAMPLE_NO_LATENCY)
    with pytest.raises(WrkParseError, match="Requests/sec"):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")
    with pytest.raises(WrkParseError, match="unit"):
        to_microseconds("1", "ns")


def _result(rps: float, p50: float, p99: float) -> WrkResult:
    return WrkResult(rps, int(rps), 1.0, p50, {50.0: p50, 99.0: p99}, 0, 0)


def test_medians_and_ratios() -> None:
    runs = [report.Run("direct", 50, i, _result(r, 100, 200)) for i, r in
            enumerate((70_000, 72_000, 90_000))]
    runs += [report.Run("envoy", 50, i, _result(r, 2000, 3000)) for i, r in
             enumerate((20_000, 24_000, 23_000))]
    runs += [report.Run("shoal", 50, 0, _result(40_000, 1000, 2000)),
             report.Run("shoal", 50, 1, error="wrk exited with 1")]
    summaries = report.summarize(runs, ["direct", "envoy", "shoal"], [50])
    by_peer = {s.peer: s for s in summaries}
    assert by_peer["direct"].requests_per_second == 72_000
    assert by_peer["envoy"].requests_per_second == 23_000
    assert (by_peer["shoal"].runs, by_peer["shoal"].failed_runs) == (1, 1)
    comp = report.comparisons(by_peer["shoal"], None, summaries)
    assert comp["direct:direct"]["requests_per_second"] == pytest.approx(40_000 / 72_000)
    from bench.peers import PEERS_BY_NAME
    comp = report.comparisons(by_peer["shoal"], PEERS_BY_NAME["shoal"], summaries)
    assert comp["envoy:envoy"]["requests_per_second"] == pytest.approx(40_000 / 23_000)
    assert comp["envoy:envoy"]["p99"] == pytest.approx(2000 / 3000)
    table = report.format_table(summaries)
    assert "1.74x" in table and "72,000" in table and "1 runs failed" in table
    record = report.record({}, {}, {"shoal-mesh": "not available"}, runs, summaries)
    assert json.loads(json.dumps(record))["summary"][2]["peer"] == "shoal"


def test_configs_carry_the_ports(tmp_path: Path) -> None:
    assert "listen 127.0.0.1:18080;" in configs.nginx_conf(tmp_path, 18080)
    assert "server upstream 127.0.0.1:18080" in configs.haproxy_cfg(10001, 18080)
    tls = configs.TlsFiles(tmp_path / "c", tmp_path / "k", tmp_path / "ca", "peer.id")
    envoy = json.loads(configs.envoy_config(10000, 9901, 18080, upstream_tls=tls))
    cluster = envoy["static_resources"]["clusters"][0]
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]["port_value"] == 18080
    assert cluster["transport_socket"]["typed_config"]["sni"] == "peer.id"


def test_shoal_command_line_and_availability() -> None:
    argv = shoal_proxy_argv(ShoalProxyArgs(4140, 4143, 4191, 8080, "client",
                                           upstreams=((7000, "nginx.bench", 80),),
                                           static_endpoints=(("nginx.bench", "127.0.0.1",
                                                              80),)))
    assert argv[1:4] == ["-m", "shoal.cli", "proxy"]
    assert "7000=nginx.bench:80" in argv and "nginx.bench=127.0.0.1:80" in argv
    reason = shoal_unavailable_reason()
    assert reason is None or "shoal.proxy" in reason


def test_bad_command_lines_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--peers", "nosuch"], ["--connections", "fifty"], ["--reps", "0"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown peer(s) nosuch" in err and "integers" in err and "--reps" in err
    quick = parse_args(["--quick", "--peers", "direct,envoy"])
    assert (quick.reps, quick.duration) == (1, 3)
    assert [p.name for p in quick.peer_list] == ["direct", "envoy"]


def test_cpu_accounting_parsers() -> None:
    stat = ("cpu  10 0 10 100 0 0 0 0 0 0\n"
            "cpu0 1 2 3 4 5 6 7 8 0 0\n"
            "cpu1 100 0 50 850 0 0 30 0 0 0\n")
    assert cpu.parse_core_line(stat, 1) == cpu.CoreTimes(task=150, total=1030)
    with pytest.raises(ValueError, match="cpu7"):
        cpu.parse_core_line(stat, 7)
    # a command name with spaces and a ')' must not shift the fields
    line = "4242 (we ird) name) S 77 4242 4242 0 -1 4194560 1 0 0 0 120 30 0 0 20 0 1 0\n"
    assert cpu.parse_pid_stat(line) == (77, 150)
    table = {1: (0, 5), 10: (1, 100), 11: (10, 20), 12: (11, 3), 20: (1, 1000)}
    assert cpu.tree_jiffies(table, [10]) == 123
    before = cpu.Sample(cpu.CoreTimes(task=1000, total=2000), ours=400)
    after = cpu.Sample(cpu.CoreTimes(task=1900, total=3000), ours=1100)
    assert cpu.foreign_share(before, after) == pytest.approx(0.2)
    assert cpu.foreign_share(None, after) is None


def test_unavailable_reason_on_one_line() -> None:
    reason = ("shoal exited with code 2:\nUsage: python -m shoal.cli [OPTIONS]\n"
              "\u256d\u2500 Error \u2500\u256e\n\u2502 No such command 'proxy'. \u2502\n"
              "\u2570\u2500\u2500\u256f")
    assert one_line(reason) == "shoal exited with code 2: No such command 'proxy'."
    assert one_line("module shoal.proxy not found") == "module shoal.proxy not found"


def test_real_direct_measurement(tmp_path: Path) -> None:
    try:
        find_program("nginx")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    with ProcessGroup(tmp_path) as procs:
        port = start_upstream(procs, tmp_path, cpu=None, timeout=10.0)
        assert http_status(port) == 200
        result = run_wrk(f"http://127.0.0.1:{port}/", connections=4, duration_seconds=1)
        nginx = procs.running[0].popen
    assert result.requests_per_second > 0
    assert result.requests > 0 and result.errors == 0
    assert 0 < result.p50_us <= result.p99_us
    assert nginx.poll() is not None  # stopped on leaving the group
