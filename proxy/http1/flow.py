"""Who pauses whom: the one place that owns backpressure on a connection's reads.

A transport's reading may be paused for several reasons at once (the peer's write buffer
is full, a pipelined request waits its turn, a request body is held while the upstream
connection is being set up, an upgrade waits for its 101). ``ReadGate`` keeps them as bits
and pauses the transport when the first reason appears and resumes it when the last one
goes, so no reason can accidentally undo another.

Write side: asyncio calls ``pause_writing`` on a Protocol when its transport's buffer
passes the high-water mark; the Protocols turn that into ``PEER_FULL`` on the other side's
gate. The marks are WRITE_BUFFER_HIGH / WRITE_BUFFER_LOW below.
"""

from __future__ import annotations

import asyncio

# asyncio's own defaults (64 KiB high, a quarter of it low): enough to keep a loopback
# connection busy while bounding what one slow reader can make the proxy hold per hop.
WRITE_BUFFER_HIGH = 64 * 1024
WRITE_BUFFER_LOW = 16 * 1024

PEER_FULL = 1  # the other side's transport buffer is over its high-water mark
PIPELINE = 2  # a complete request waits behind the one being answered
PENDING = 4  # body bytes held while the upstream connection is being set up
UPGRADE = 8  # an upgrade request waits for the upstream's 101 (or refusal)


class ReadGate:
    __slots__ = ("reasons", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons and not self.transport.is_closing():
            self.transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and not self.transport.is_closing():
                self.transport.resume_reading()
