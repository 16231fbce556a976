"""Following one tap session's events: subscribe to its subject, keep the events that
list the session, hand them on through a bounded queue (oldest dropped when a slow
reader falls behind). The CLI uses it directly; the dashboard will serve it over HTTP
to browsers, which cannot reach NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.aio.client import Client
from nats.aio.msg import Msg

from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError
from shoal.schemas.tap import TapEvent, TapSession

from .sessions import events_subject

RELAY_QUEUE_LIMIT = 1000  # 10 s of one session at the default 100 events/s


class SessionEvents:
    """Events of one session, in arrival order; ``dropped`` counts what overflowed."""

    def __init__(self, session: TapSession, limit: int = RELAY_QUEUE_LIMIT) -> None:
        self.session_id = session.id
        self.subject = events_subject(session)
        self.queue: asyncio.Queue[TapEvent] = asyncio.Queue(limit)
        self.dropped = 0
        self.malformed = 0
        self._decoder: Decoder[TapEvent] = Decoder(TapEvent, names.TAP_ALL)

    def offer(self, data: bytes, subject: str) -> None:
        try:
            event = self._decoder.decode(data, subject)
        except WireDecodeError:
            self.malformed += 1
            return
        if self.session_id not in event.sessions:
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)


@contextlib.asynccontextmanager
async def follow(nc: Client, session: TapSession,
                 limit: int = RELAY_QUEUE_LIMIT) -> AsyncIterator[SessionEvents]:
    """Subscribe for the session's events while the context is open."""
    events = SessionEvents(session, limit)

    async def on_message(msg: Msg) -> None:
        events.offer(msg.data, msg.subject)

    subscription = await nc.subscribe(events.subject, cb=on_message)
    await nc.flush()  # the server has the subscription before we say we follow
    try:
        yield events
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
