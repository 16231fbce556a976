"""Where Shoal keeps its state on one machine, and how a process finds the bus.

``shoal up`` writes ``<state>/bus.json`` (the URL and the credential file of each role);
every other process on the machine reads it when it is given no ``--nats`` URL. In a
cluster the same settings come from flags and environment variables instead.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgspec

from .roles import ROLES, Role

ENV_STATE_DIR = "SHOAL_STATE_DIR"
ENV_NATS_URL = "SHOAL_NATS_URL"
ENV_NATS_USER = "SHOAL_NATS_USER"
ENV_NATS_PASSWORD = "SHOAL_NATS_PASSWORD"
ENV_NATS_CA = "SHOAL_NATS_CA"
ENV_ROLE = "SHOAL_ROLE"


def default_state_dir() -> Path:
    """``$SHOAL_STATE_DIR``, else ``$XDG_STATE_HOME/shoal``, else ``~/.local/state/shoal``."""
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "shoal"


class RoleCredentials(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    password: str


class BusSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach the bus as one role."""

    url: str
    user: str = ""
    password: str = ""
    tls_ca: str = ""  # path to a CA bundle: NATS over TLS outside a laptop
    role: str = ""

    def redacted(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"nats://{who}{self.url.split('://', 1)[-1]}"


class BusFile(msgspec.Struct, frozen=True, kw_only=True):
    """``<state>/bus.json``: written by ``shoal up``, readable by the owner only."""

    url: str
    credentials: dict[str, RoleCredentials]
    pid: int = 0


def generate_credentials() -> dict[str, RoleCredentials]:
    return {
        role: RoleCredentials(user=f"shoal-{role}", password=secrets.token_urlsafe(24))
        for role in ROLES
    }


def write_bus_file(state_dir: Path, bus: BusFile) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "bus.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(msgspec.json.format(msgspec.json.encode(bus)))
    os.replace(tmp, path)
    return path


class BusNotFound(RuntimeError):
    """No ``--nats`` given and no bus started by ``shoal up`` on this machine."""


def read_bus_file(state_dir: Path) -> BusFile:
    path = state_dir / "bus.json"
    try:
        return msgspec.json.decode(path.read_bytes(), type=BusFile)
    except FileNotFoundError:
        raise BusNotFound(
            f"no bus found: {path} does not exist. Start one with `shoal up` (or `make "
            f"demo`), or pass --nats URL with credentials."
        ) from None
    except msgspec.DecodeError as error:
        raise BusNotFound(f"{path} is not a valid bus file: {error}") from None


def resolve_bus(
    role: Role,
    url: str | None = None,
    user: str | None = None,
    password: str | None = None,
    tls_ca: str | None = None,
    state_dir: Path | None = None,
) -> BusSettings:
    """Explicit arguments, then the environment, then the local bus file."""
    url = url or os.environ.get(ENV_NATS_URL)
    user = user or os.environ.get(ENV_NATS_USER)
    password = password or os.environ.get(ENV_NATS_PASSWORD)
    tls_ca = tls_ca or os.environ.get(ENV_NATS_CA, "")
    if url:
        return BusSettings(url=url, user=user or "", password=password or "",
                           tls_ca=tls_ca, role=role)
    bus = read_bus_file(state_dir or default_state_dir())
    creds = bus.credentials[role]
    return BusSettings(url=bus.url, user=creds.user, password=creds.password,
                       tls_ca=tls_ca, role=role)


def bus_environment(settings: BusSettings) -> dict[str, str]:
    """Environment variables that hand ``settings`` to a child process."""
    env = {ENV_NATS_URL: settings.url, ENV_ROLE: settings.role}
    if settings.user:
        env[ENV_NATS_USER] = settings.user
        env[ENV_NATS_PASSWORD] = settings.password
    if settings.tls_ca:
        env[ENV_NATS_CA] = settings.tls_ca
    return env
