"""Connecting to the bus as a role, and the JetStream buckets Shoal keeps its state in.

Connections reconnect forever with backoff: a proxy keeps serving from what it last knew
while the bus is away ("fail static") and resynchronises when it returns.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from shoal.schemas import names

from .config import BusSettings

log = logging.getLogger("shoal.bus")

CONNECT_TIMEOUT_SECONDS = 2.0
RECONNECT_WAIT_SECONDS = 0.5  # nats-py adds jitter; attempts never stop (-1)
PING_INTERVAL_SECONDS = 10.0  # two missed pongs mark the connection stale in ~20 s
MAX_OUTSTANDING_PINGS = 2
PENDING_BYTES_LIMIT = 8 * 1024 * 1024  # bytes buffered while reconnecting, then dropped


@dataclass(frozen=True)
class BucketSpec:
    name: str
    history: int
    ttl_seconds: float  # 0: entries never expire
    description: str


# History: policy keeps the most JetStream allows (64) for rollback; endpoints and trust
# keep a few for debugging; tap sessions expire on their own unless the client extends.
BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec(names.BUCKET_ENDPOINTS, 5, 0, "ready endpoints per service"),
    BucketSpec(names.BUCKET_POLICY, 64, 0, "policy documents per service, with history"),
    BucketSpec(names.BUCKET_TRUST, 10, 0, "trust anchors"),
    BucketSpec(names.BUCKET_TAP, 1, 60, "open tap sessions"),
)
BUCKETS_BY_NAME = {spec.name: spec for spec in BUCKETS}

ErrorCallback = Callable[[Exception], Awaitable[None]]
EventCallback = Callable[[], Awaitable[None]]


def _tls_context(settings: BusSettings) -> ssl.SSLContext | None:
    if not settings.tls_ca and not settings.url.startswith("tls://"):
        return None
    context = ssl.create_default_context(cafile=settings.tls_ca or None)
    return context


async def connect(
    settings: BusSettings,
    name: str,
    *,
    error_cb: ErrorCallback | None = None,
    allow_reconnect: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    disconnected_cb: EventCallback | None = None,
    reconnected_cb: EventCallback | None = None,
) -> Client:
    """Connect with the role's credentials; reconnect forever unless told otherwise.

    ``disconnected_cb`` and ``reconnected_cb`` run after the logging ones (a proxy uses
    them to restart its watches once the bus is back)."""

    async def _log_error(error: Exception) -> None:
        log.warning("bus error (%s): %s", name, error)
        if error_cb is not None:
            await error_cb(error)

    async def _disconnected() -> None:
        log.info("bus disconnected (%s)", name)
        if disconnected_cb is not None:
            await disconnected_cb()

    async def _reconnected() -> None:
        log.info("bus reconnected (%s)", name)
        if reconnected_cb is not None:
            await reconnected_cb()

    options: dict[str, object] = {
        "servers": [settings.url],
        "name": name,
        "connect_timeout": connect_timeout,
        "allow_reconnect": allow_reconnect,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT_SECONDS,
        "ping_interval": PING_INTERVAL_SECONDS,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
        "pending_size": PENDING_BYTES_LIMIT,
        "error_cb": _log_error,
        "disconnected_cb": _disconnected,
        "reconnected_cb": _reconnected,
    }
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password
    tls = _tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    return await nats.connect(**options)  # type: ignore[arg-type]


async def ensure_buckets(js: JetStreamContext, replicas: int = 1) -> dict[str, KeyValue]:
    """Create the buckets that do not exist yet (idempotent; needs the controller or
    operator role). ``replicas`` is 3 on a NATS cluster."""
    out: dict[str, KeyValue] = {}
    for spec in BUCKETS:
        try:
            out[spec.name] = await js.key_value(spec.name)
            continue
        except BucketNotFoundError:
            pass
        config = KeyValueConfig(
            bucket=spec.name,
            description=spec.description,
            history=spec.history,
            ttl=spec.ttl_seconds or None,
            storage=StorageType.FILE,
            replicas=replicas,
        )
        out[spec.name] = await js.create_key_value(config=config)
        log.info("created bucket %s (history %d, ttl %ss, replicas %d)",
                 spec.name, spec.history, spec.ttl_seconds, replicas)
    return out
