"""Session rules as plain code: what an open request becomes once the caps apply, and
what an extension does. The service (service.py) only reads and writes the bucket.

Caps, each a named constant: at most ``MAX_SESSIONS`` open sessions at once (tap puts
work on every matching proxy), at most ``MAX_SESSION_RPS`` events per second per session
(a larger ask is lowered, and the reply says so), and a time to live of at most the
bucket's TTL (a longer one would vanish from the bucket before it expires).
"""

from __future__ import annotations

import secrets

from msgspec.structs import replace

from shoal.schemas import names
from shoal.schemas.tap import (
    MAX_SESSION_TTL_SECONDS,
    TapExtend,
    TapFilter,
    TapOpen,
    TapSession,
)

MAX_SESSIONS = 16  # Linkerd has no cap; 16 operators tapping at once is plenty on one bus
MAX_SESSION_RPS = 1000.0  # 10x Linkerd's default --max-rps
SESSION_ID_BYTES = 8


class SessionRefused(ValueError):
    """The caller asked for something the caps do not allow."""


def new_session(request: TapOpen, open_sessions: int, now: float,
                session_id: str | None = None) -> TapSession:
    if open_sessions >= MAX_SESSIONS:
        raise SessionRefused(f"too many open tap sessions ({open_sessions}, cap "
                             f"{MAX_SESSIONS}); close one or wait for one to expire")
    ttl = min(request.ttl_seconds, MAX_SESSION_TTL_SECONDS)
    return TapSession(
        id=session_id or secrets.token_hex(SESSION_ID_BYTES),
        filter=request.filter,
        max_rps=min(request.max_rps, MAX_SESSION_RPS),
        expires_at=now + ttl,
        capture_body=request.capture_body,
        max_body_bytes=request.max_body_bytes if request.capture_body else 0,
        redact_headers=sorted({h.lower() for h in request.redact_headers}),
    )


def extended(session: TapSession, request: TapExtend, now: float) -> TapSession:
    if session.expires_at and session.expires_at <= now:
        raise SessionRefused(f"tap session {session.id} has expired; open a new one")
    return replace(session, expires_at=now + min(request.ttl_seconds, MAX_SESSION_TTL_SECONDS))


def is_open(session: TapSession, now: float) -> bool:
    return not session.expires_at or session.expires_at > now


def events_subject(session: TapSession) -> str:
    """The narrowest subject that carries every event of a session."""
    return filter_subject(session.filter)


def filter_subject(f: TapFilter) -> str:
    """The narrowest subject carrying every event a filter can match (known before the
    session exists, so a client can subscribe first and miss nothing)."""
    if not f.namespace:
        return names.TAP_ALL
    ns = names.subject_token(f.namespace)
    if not f.workload:
        return f"{names.TAP_PREFIX}.{ns}.>"
    workload = names.subject_token(f.workload)
    pod = names.subject_token(f.pod) if f.pod else "*"
    return f"{names.TAP_PREFIX}.{ns}.{workload}.{pod}"
