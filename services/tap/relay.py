"""Following one tap session's events: subscribe to its subject, keep the events that
list the session, hand them on through a bounded queue (oldest dropped when a slow
reader falls behind). The CLI uses it directly; the dashboard will serve it over HTTP
to browsers, which cannot reach NATS.

A client should subscribe before it opens the session (``follow(nc, filter_subject(f))``
then ``bind(session_id)``): proxies start publishing as soon as the session is in the
bucket, possibly before the tap service's reply arrives. Events received before the id
is known are held (bounded) and sorted out by ``bind``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
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

    def __init__(self, subject: str, session_id: str | None = None,
                 limit: int = RELAY_QUEUE_LIMIT) -> None:
        self.subject = subject
        self.session_id = session_id
        self.queue: asyncio.Queue[TapEvent] = asyncio.Queue(limit)
        self._early: deque[TapEvent] = deque(maxlen=limit)
        self.dropped = 0
        self.malformed = 0
        self._decoder: Decoder[TapEvent] = Decoder(TapEvent, names.TAP_ALL)

    def bind(self, session_id: str) -> None:
        """The session's id is known: keep its events, from those already held on."""
        self.session_id = session_id
        early, self._early = list(self._early), deque(maxlen=self._early.maxlen)
        for event in early:
            self._keep(event)

    def offer(self, data: bytes, subject: str) -> None:
        try:
            event = self._decoder.decode(data, subject)
        except WireDecodeError:
            self.malformed += 1
            return
        if self.session_id is None:
            self._early.append(event)
            return
        self._keep(event)

    def _keep(self, event: TapEvent) -> None:
        if self.session_id not in event.sessions:
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)


@contextlib.asynccontextmanager
async def follow(nc: Client, target: TapSession | str,
                 limit: int = RELAY_QUEUE_LIMIT) -> AsyncIterator[SessionEvents]:
    """Subscribe for a session's events (a ``TapSession``, or a subject from
    ``filter_subject`` with the id bound later) while the context is open."""
    if isinstance(target, TapSession):
        events = SessionEvents(events_subject(target), target.id, limit)
    else:
        events = SessionEvents(target, None, limit)

    async def on_message(msg: Msg) -> None:
        events.offer(msg.data, msg.subject)

    subscription = await nc.subscribe(events.subject, cb=on_message)
    await nc.flush()  # the server has the subscription before we say we follow
    try:
        yield events
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
