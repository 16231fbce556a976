"""Running the proxy (and the destination service) as real child processes for the
end-to-end tests: ``python -m shoal.proxy`` from the repository root with the test's
environment, logs to a file shown when a test fails, readiness from the admin port."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from pathlib import Path

from shoal.kernel.process import die_with_parent

from .apps import LOOPBACK, free_port, free_ports

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 30.0  # a cold interpreter on a busy 2-core machine
STOP_TIMEOUT_SECONDS = 20.0


def http_get(port: int, path: str, method: str = "GET",
             timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Child:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def wait_http_ok(self, port: int, path: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            try:
                status, body = http_get(port, path, timeout=1.0)
                if status == 200:
                    return
                last = f"{status} {body!r}"
            except OSError as error:
                last = str(error)
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready ({last}):\n{self.log()[-3000:]}")


class ProxyProcess(Child):
    """``python -m shoal.proxy`` with its own free ports unless given; ``--no-identity``
    unless ``identity`` (then the environment must carry a token)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *args: str,
                 outbound: bool = True, app_port: int | None = None,
                 identity: bool = False) -> None:
        admin, out, inbound = free_ports(3)
        self.admin_port = admin
        self.outbound_port = out if outbound else 0
        self.inbound_port = inbound if app_port is not None else 0
        argv = [sys.executable, "-m", "shoal.proxy", "--admin-port", str(self.admin_port),
                "--outbound-port", str(self.outbound_port),
                "--inbound-port", str(self.inbound_port), "--log-level", "info", *args]
        if not identity:  # plaintext unless the test brings an identity service and a token
            argv.append("--no-identity")
        if app_port is not None:
            argv += ["--app-port", str(app_port)]
        super().__init__(name, argv, env, log_dir)

    def wait_ready(self) -> None:
        self.wait_http_ok(self.admin_port, "/ready")

    def metrics(self) -> str:
        status, body = http_get(self.admin_port, "/metrics")
        assert status == 200
        return body.decode()


def destination(env: dict[str, str], log_dir: Path, name: str = "destination") -> tuple[
        Child, int]:
    port = free_port()
    child = Child(name, [sys.executable, "-m", "shoal.services.destination",
                         "--health-port", str(port)], env, log_dir)
    return child, port


def proxy_env(base: dict[str, str]) -> dict[str, str]:
    """The test environment for a proxy: the bus as the proxy role, unbuffered output."""
    return {**base, "PYTHONUNBUFFERED": "1"}
