"""`shoal run`: the app starts only once its proxy is ready, learns where its proxy is
from the environment, and its exit status passes through; the proxy stops when the app
exits; SIGTERM stops both. Real proxies, a real bus."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .apps import free_ports
from .conftest import Bus
from .proxyproc import REPO, http_get

RUN_TIMEOUT_SECONDS = 60.0

# The app checks, the moment it starts, that its proxy already answers /ready.
CHECK_APP = """
import os, sys, urllib.request
admin = sys.argv[1]
status = urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2).status
print("proxy-ready", status, flush=True)
print("outbound", os.environ["SHOAL_OUTBOUND"], os.environ["http_proxy"],
      os.environ["grpc_proxy"], flush=True)
sys.exit(7)
"""


def _run(bus: Bus, *args: str) -> subprocess.Popen[str]:
    env = bus.env("operator")
    for name in ("SHOAL_NATS_URL", "SHOAL_NATS_USER", "SHOAL_NATS_PASSWORD"):
        env.pop(name, None)  # as a user would: the bus comes from the state directory
    return subprocess.Popen([sys.executable, "-m", "shoal.cli", "run", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_app_starts_after_proxy_and_status_passes_through(bus: Bus, buckets: None) -> None:
    outbound, inbound, admin, app = free_ports(4)
    proc = _run(bus, "--namespace", "runtest", "--service", "job", "--port", str(app),
                "--outbound-port", str(outbound), "--inbound-port", str(inbound),
                "--admin-port", str(admin), "--",
                sys.executable, "-c", CHECK_APP, str(admin))
    output, _ = await asyncio.to_thread(proc.communicate, timeout=RUN_TIMEOUT_SECONDS)
    assert proc.returncode == 7, output
    assert "proxy-ready 200" in output
    assert f"outbound 127.0.0.1:{outbound} http://127.0.0.1:{outbound}" in output
    assert not _listening(admin) and not _listening(outbound)  # the proxy is gone too


async def test_sigterm_stops_app_then_proxy(bus: Bus, buckets: None) -> None:
    outbound, inbound, admin, app = free_ports(4)
    proc = _run(bus, "--namespace", "runtest", "--service", "web", "--port", str(app),
                "--outbound-port", str(outbound), "--inbound-port", str(inbound),
                "--admin-port", str(admin), "--",
                sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(app))
    try:
        async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
            while True:  # the app answers through its inbound proxy
                try:
                    status, _ = await asyncio.to_thread(http_get, inbound, "/")
                    if status == 200:
                        break
                except OSError:
                    pass
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, RUN_TIMEOUT_SECONDS)
        assert code == 128 + signal.SIGTERM  # the app died of the signal we passed on
        assert not _listening(app) and not _listening(admin) and not _listening(inbound)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_proxy_that_cannot_start_means_no_app(bus: Bus, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    proc = _run(bus, "--namespace", "runtest", "--service", "bad", "--port", "1",
                "--upstream", "not-a-mapping", "--",
                sys.executable, "-c", f"open({str(marker)!r}, 'w').close()")
    output, _ = await asyncio.to_thread(proc.communicate, timeout=RUN_TIMEOUT_SECONDS)
    assert proc.returncode == 1, output
    assert "proxy exited" in output and "Traceback" not in output
    assert not marker.exists()
