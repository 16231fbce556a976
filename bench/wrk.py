"""Running wrk and reading what it prints.

``parse_wrk_output`` is plain code over the text wrk writes with ``--latency`` (no
process, no socket), so it is tested on captured samples; ``run_wrk`` is the thin edge
that starts wrk with a bounded duration and hands its output to the parser.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from bench.procs import placement
from shoal.kernel.process import die_with_parent

# wrk formats times with the units of its units.c: "us", "ms", "s", then "m" and "h"
# for runs that pathological; everything is converted to microseconds here.
_TIME_UNITS_US: dict[str, float] = {
    "us": 1.0,
    "ms": 1_000.0,
    "s": 1_000_000.0,
    "m": 60_000_000.0,
    "h": 3_600_000_000.0,
}
_NUMBER = r"(\d+(?:\.\d+)?)"
_UNIT = r"(us|ms|s|m|h)"
_DISTRIBUTION_RE = re.compile(rf"^\s*(\d+(?:\.\d+)?)%\s+{_NUMBER}{_UNIT}\s*$", re.MULTILINE)
_AVG_LATENCY_RE = re.compile(rf"^\s*Latency\s+{_NUMBER}{_UNIT}\s", re.MULTILINE)
_RPS_RE = re.compile(rf"^\s*Requests/sec:\s+{_NUMBER}\s*$", re.MULTILINE)
_TOTAL_RE = re.compile(rf"^\s*(\d+) requests in {_NUMBER}{_UNIT},", re.MULTILINE)
_SOCKET_ERRORS_RE = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")

# A wrk run may overrun its -d by its --timeout while the last requests finish, plus the
# start-up; anything beyond this slack means wrk is stuck and is killed.
WRK_SLACK_SECONDS = 15.0
# wrk's own per-request timeout: far above any latency a healthy peer shows here, so a
# timeout counts as an error in the record instead of hanging a connection.
WRK_REQUEST_TIMEOUT = "5s"


class WrkParseError(ValueError):
    """wrk's output does not have the shape this parser knows (a wrk version change, a
    run without ``--latency``, or wrk failing before it measured anything)."""


class WrkRunError(RuntimeError):
    """wrk could not be run, exited with an error, or overran its time bound."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies are in microseconds; ``errors`` sums socket errors and
    non-2xx/3xx responses, which make a run suspect (the table flags them)."""

    requests_per_second: float
    requests: int
    duration_seconds: float
    latency_avg_us: float
    percentiles_us: dict[float, float]
    socket_errors: int
    non_2xx: int

    @property
    def p50_us(self) -> float:
        return self.percentiles_us[50.0]

    @property
    def p99_us(self) -> float:
        return self.percentiles_us[99.0]

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def to_microseconds(value: str, unit: str) -> float:
    """``("1.20", "ms")`` -> 1200.0."""
    try:
        return float(value) * _TIME_UNITS_US[unit]
    except KeyError:
        raise WrkParseError(f"unknown time unit {unit!r} in wrk output") from None


def parse_wrk_output(text: str) -> WrkResult:
    """Read requests/s, the latency percentiles and the error counts from wrk's output."""
    rps = _RPS_RE.search(text)
    if rps is None:
        raise WrkParseError("no 'Requests/sec:' line in wrk output:\n" + _tail(text))
    percentiles = {float(p): to_microseconds(v, u) for p, v, u in _DISTRIBUTION_RE.findall(text)}
    for needed in (50.0, 99.0):
        if needed not in percentiles:
            raise WrkParseError(
                f"no {needed:g}% line in wrk's latency distribution (was --latency given?):\n"
                + _tail(text))
    avg = _AVG_LATENCY_RE.search(text)
    total = _TOTAL_RE.search(text)
    socket_errors = 0
    sock = _SOCKET_ERRORS_RE.search(text)
    if sock is not None:
        socket_errors = sum(int(n) for n in sock.groups())
    non_2xx = _NON_2XX_RE.search(text)
    return WrkResult(
        requests_per_second=float(rps.group(1)),
        requests=int(total.group(1)) if total else 0,
        duration_seconds=(to_microseconds(total.group(2), total.group(3)) / 1e6
                          if total else 0.0),
        latency_avg_us=to_microseconds(avg.group(1), avg.group(2)) if avg else 0.0,
        percentiles_us=percentiles,
        socket_errors=socket_errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def wrk_argv(url: str, connections: int, duration_seconds: int,
             host_header: str | None = None, cpu: int | None = None, nice: int = 0
             ) -> list[str]:
    """The wrk command line: one thread (the anchor's), ``--latency`` for percentiles."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_seconds}s", "--latency",
            "--timeout", WRK_REQUEST_TIMEOUT]
    if host_header is not None:
        argv += ["-H", f"Host: {host_header}"]
    argv.append(url)
    return [*placement(cpu, nice), *argv]


def run_wrk(url: str, connections: int, duration_seconds: int,
            host_header: str | None = None, cpu: int | None = None, nice: int = 0
            ) -> WrkResult:
    """Run wrk to completion (bounded by its duration plus ``WRK_SLACK_SECONDS``)."""
    argv = wrk_argv(url, connections, duration_seconds, host_header, cpu, nice)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=duration_seconds + WRK_SLACK_SECONDS,
                              preexec_fn=die_with_parent)
    except FileNotFoundError as exc:
        raise WrkRunError(f"cannot run {argv[0]}: {exc}") from None
    except subprocess.TimeoutExpired:
        raise WrkRunError(f"wrk did not finish within {duration_seconds}s + "
                          f"{WRK_SLACK_SECONDS:g}s against {url}") from None
    if done.returncode != 0:
        raise WrkRunError(f"wrk exited with {done.returncode}: "
                          + _tail(done.stderr or done.stdout))
    return parse_wrk_output(done.stdout)


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
