"""Tap: sessions in ``shoal_tap`` and the events proxies publish while one matches.

Events go to ``shoal.v1.tap.<ns>.<workload>.<pod>`` as a tagged union (``kind``):
``request_start``, ``response_start``, ``response_end``. Any NATS client may subscribe.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Direction = Literal["inbound", "outbound"]

DEFAULT_MAX_RPS = 100.0  # Linkerd's `tap --max-rps` default
DEFAULT_SESSION_TTL_SECONDS = 30.0
MAX_SESSION_TTL_SECONDS = 60.0  # the shoal_tap bucket's TTL: a longer session would vanish
MAX_BODY_CAPTURE_BYTES = 64 * 1024


class TapFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Every non-empty field must match. ``to_*``/``from_*`` name the peer workload."""

    namespace: str = ""
    workload: str = ""
    pod: str = ""
    direction: Direction | Literal[""] = ""
    to_namespace: str = ""
    to_workload: str = ""
    from_namespace: str = ""
    from_workload: str = ""
    authority: str = ""
    method: str = ""
    path_prefix: str = ""
    scheme: str = ""  # "http", "https" (as Linkerd's `tap --scheme`)


class TapSession(msgspec.Struct, frozen=True, kw_only=True):
    """The value under ``shoal_tap`` key ``<session>``; the client keeps extending it."""

    id: str
    filter: TapFilter = msgspec.field(default_factory=TapFilter)
    max_rps: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = DEFAULT_MAX_RPS
    expires_at: float = 0.0  # unix seconds; the bucket's TTL removes it too
    capture_body: bool = False
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BODY_CAPTURE_BYTES)] = 0
    redact_headers: list[str] = msgspec.field(default_factory=list)  # beyond the defaults


class Peer(msgspec.Struct, frozen=True, kw_only=True):
    address: str = ""
    port: int = 0
    namespace: str = ""
    workload: str = ""
    pod: str = ""
    identity: str = ""


class _TapEventBase(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # <connection>:<stream>, as Linkerd's id=B:S
    sessions: list[str] = msgspec.field(default_factory=list)
    direction: Direction
    source: Peer = msgspec.field(default_factory=Peer)
    destination: Peer = msgspec.field(default_factory=Peer)
    tls: bool = False
    timestamp: float = 0.0


class TapRequestStart(_TapEventBase, frozen=True, kw_only=True, tag="request_start"):
    method: str
    authority: str = ""
    path: str = ""
    scheme: str = "http"
    headers: dict[str, str] = msgspec.field(default_factory=dict)  # redacted
    body: str = ""  # only when the session asked and policy allowed, capped


class TapResponseStart(_TapEventBase, frozen=True, kw_only=True, tag="response_start"):
    status: int
    latency_us: int
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class TapResponseEnd(_TapEventBase, frozen=True, kw_only=True, tag="response_end"):
    grpc_status: int | None = None
    reset_error: str = ""
    duration_us: int = 0
    response_bytes: int = 0


TapEvent = TapRequestStart | TapResponseStart | TapResponseEnd


# Session requests on ``shoal.v1.tapctl.session`` (request/reply, the tap service).


class TapOpen(msgspec.Struct, frozen=True, kw_only=True, tag="open"):
    """Open a session; the reply carries its id and the subjects its events arrive on."""

    filter: TapFilter = msgspec.field(default_factory=TapFilter)
    max_rps: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = DEFAULT_MAX_RPS
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_SESSION_TTL_SECONDS)] = (
        DEFAULT_SESSION_TTL_SECONDS
    )
    capture_body: bool = False
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BODY_CAPTURE_BYTES)] = 0
    redact_headers: list[str] = msgspec.field(default_factory=list)
    opened_by: str = ""


class TapExtend(msgspec.Struct, frozen=True, kw_only=True, tag="extend"):
    id: str
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_SESSION_TTL_SECONDS)] = (
        DEFAULT_SESSION_TTL_SECONDS
    )


class TapClose(msgspec.Struct, frozen=True, kw_only=True, tag="close"):
    id: str


TapSessionRequest = TapOpen | TapExtend | TapClose


class TapSessionGranted(msgspec.Struct, frozen=True, kw_only=True, tag="granted"):
    """The session as stored (``max_rps`` may be lower than asked: the service's cap)."""

    session: TapSession
    subject: str  # subscribe here; events carry the session id in ``sessions``


class TapSessionClosed(msgspec.Struct, frozen=True, kw_only=True, tag="closed"):
    id: str


TapSessionReply = TapSessionGranted | TapSessionClosed
