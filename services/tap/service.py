"""Wires session rules to the bus: ``shoal.v1.tapctl.session`` (queue group ``shoal-tap``)
in, ``shoal_tap`` entries out. Proxies watch the bucket; the client that opened a session
extends it before it expires and closes it when done (a client that dies just stops
extending, and the session expires on its own).

The session cap is counted from the bucket, so replicas share it; two replicas opening
the last free slot at the same instant can exceed it by one (a soft cap, accepted: the
per-session rate cap is what protects proxies).
"""

from __future__ import annotations

import logging
import time

from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.tap import (
    TapClose,
    TapExtend,
    TapOpen,
    TapSession,
    TapSessionClosed,
    TapSessionGranted,
    TapSessionReply,
    TapSessionRequest,
)

from ..runtime import BadRequest, ServiceContext, ServiceRuntime, Unavailable
from .sessions import SessionRefused, events_subject, extended, is_open, new_session

log = logging.getLogger("shoal.tap")


class TapService:
    def __init__(self, replica: str = "tap") -> None:
        self.replica = replica
        self._kv: KeyValue | None = None
        self._decoder: Decoder[TapSession] = Decoder(TapSession, names.BUCKET_TAP)

    def install(self, runtime: ServiceRuntime) -> None:
        runtime.on_setup(self._setup)
        runtime.add_request_handler("session", names.TAP_SESSION, TapSessionRequest,
                                    self.handle, names.QUEUE_TAP)

    async def _setup(self, ctx: ServiceContext) -> None:
        self._kv = await ctx.js.key_value(names.BUCKET_TAP)

    async def handle(self, request: TapSessionRequest) -> TapSessionReply:
        try:
            if isinstance(request, TapOpen):
                return await self.open(request)
            if isinstance(request, TapExtend):
                return await self.extend(request)
            return await self.close(request)
        except SessionRefused as error:
            raise BadRequest(str(error)) from None

    async def _open_sessions(self, now: float) -> list[TapSession]:
        assert self._kv is not None
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            return []
        found = []
        for key in keys:
            session = await self._get(key)
            if session is not None and is_open(session, now):
                found.append(session)
        return found

    async def _get(self, key: str) -> TapSession | None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return self._decoder.decode(entry.value)
        except WireDecodeError:
            return None

    async def open(self, request: TapOpen) -> TapSessionGranted:
        assert self._kv is not None
        now = time.time()
        session = new_session(request, len(await self._open_sessions(now)), now)
        await self._put(session)
        log.info("%s: opened tap session %s for %s (max %s events/s, filter %s)",
                 self.replica, session.id, request.opened_by or "?", session.max_rps,
                 session.filter)
        return TapSessionGranted(session=session, subject=events_subject(session))

    async def extend(self, request: TapExtend) -> TapSessionGranted:
        session = await self._get(request.id)
        if session is None:
            raise BadRequest(f"no tap session {request.id} (expired or closed)")
        session = extended(session, request, time.time())
        await self._put(session)
        return TapSessionGranted(session=session, subject=events_subject(session))

    async def close(self, request: TapClose) -> TapSessionClosed:
        assert self._kv is not None
        try:
            await self._kv.delete(request.id)
        except Exception as error:
            raise Unavailable(f"cannot close tap session {request.id}: {error}") from None
        log.info("%s: closed tap session %s", self.replica, request.id)
        return TapSessionClosed(id=request.id)

    async def _put(self, session: TapSession) -> None:
        assert self._kv is not None
        try:
            await self._kv.put(session.id, encode(session))
        except Exception as error:
            raise Unavailable(f"cannot store tap session: {error}") from None
