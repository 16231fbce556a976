"""Child processes of a benchmark run, and the checks that say they are ready.

Every process is started in its own session (so its children, nginx's worker for one,
are stopped with it) with the kernel's die-with-parent signal, logged to a file in the
run's directory, and stopped by ``ProcessGroup.close`` (TERM, then KILL after a grace
period), which the run calls from a ``finally``: no orphans, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from shoal.kernel.process import die_with_parent

# Envoy drains in well under a second on TERM, nginx's master waits for its worker, a
# Python proxy drains its connections; past this the process is killed.
STOP_GRACE_SECONDS = 5.0
KILL_WAIT_SECONDS = 2.0
# A readiness probe's own connect/read timeout: loopback answers in microseconds, so a
# second means the peer is not serving yet.
PROBE_TIMEOUT_SECONDS = 1.0
PROBE_INTERVAL_SECONDS = 0.05
# A probe reads a 3-byte body plus headers; anything larger than this is not our upstream.
PROBE_MAX_RESPONSE_BYTES = 64 * 1024
LOG_TAIL_LINES = 12


def placement(cpu: int | None, nice: int = 0) -> list[str]:
    """The command prefix that pins a program to ``cpu`` and sets its niceness."""
    prefix = ["nice", "-n", str(nice)] if nice else []
    if cpu is not None:
        prefix += ["taskset", "-c", str(cpu)]
    return prefix


class PeerUnavailable(Exception):
    """A peer cannot be measured; the message is the reason printed to the operator."""


@dataclass
class Managed:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


class ProcessGroup:
    """Owns the processes of one run and stops all of them, newest first, on close.
    ``nice`` is applied to every process it starts (see ``--nice``)."""

    def __init__(self, workdir: Path, nice: int = 0) -> None:
        self.workdir = workdir
        self.nice = nice
        self._procs: list[Managed] = []
        self._ports: set[int] = set()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def running(self) -> tuple[Managed, ...]:
        """The processes started and not yet stopped, oldest first."""
        return tuple(self._procs)

    def free_port(self) -> int:
        """A loopback port free now and not handed out before in this run."""
        for _ in range(100):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in self._ports:
                self._ports.add(port)
                return port
        raise RuntimeError("no free loopback port after 100 tries")

    def start(self, name: str, argv: list[str], *, cpu: int | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Managed:
        argv = [*placement(cpu, self.nice), *argv]
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                         start_new_session=True, preexec_fn=die_with_parent)
            except OSError as exc:
                raise PeerUnavailable(f"cannot start {argv[0]}: {exc}") from None
        managed = Managed(name, popen, log_path)
        self._procs.append(managed)
        return managed

    def stop(self, managed: Managed) -> None:
        popen = managed.popen
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _signal_group(popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(KILL_WAIT_SECONDS)
        # The leader is gone; anything left in its session (a worker) goes too.
        _signal_group(popen.pid, signal.SIGKILL)
        if managed in self._procs:
            self._procs.remove(managed)

    def close(self) -> None:
        while self._procs:
            self.stop(self._procs[-1])


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def http_status(port: int, path: str = "/", host_header: str | None = None) -> int:
    """Status code of one ``GET`` over a fresh loopback connection (raises OSError or
    ValueError when nothing well-formed answers within the probe timeout)."""
    host = host_header or f"127.0.0.1:{port}"
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_SECONDS) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data and len(data) < PROBE_MAX_RESPONSE_BYTES:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    parts = data.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {data[:80]!r}")
    return int(parts[1])


def wait_http_ok(watch: Sequence[Managed], port: int, timeout: float, *, path: str = "/",
                 host_header: str | None = None) -> None:
    """Wait until ``GET path`` on ``port`` answers 200, while every process in ``watch``
    (the chain behind the port) stays alive."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        for managed in watch:
            code = managed.popen.poll()
            if code is not None:
                raise PeerUnavailable(f"{managed.name} exited with code {code}:\n"
                                      + managed.log_tail())
        try:
            status = http_status(port, path, host_header)
            if status == 200:
                return
            last = f"status {status}"
        except (OSError, ValueError) as exc:
            last = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            tails = "\n".join(f"[{m.name}] {m.log_tail()}" for m in watch)
            raise PeerUnavailable(
                f"GET {path} on port {port} not 200 after {timeout:g}s ({last}):\n" + tails)
        time.sleep(PROBE_INTERVAL_SECONDS)
