"""What both ends of the HTTP/2 engine share: a connection's socket side around a codec
(output batching, write pause, the flows waiting to send on it) and the ``Flusher`` that
coalesces writes.

Writes: events from one read usually touch several connections (a request fans out to an
upstream, its WINDOW_UPDATE goes back to the client); each touched connection is marked
and written once, when the event loop finishes the current callbacks (``Flusher``), so a
read of 100 requests is one write upstream, not 100. A connection that has queued more
than FLUSH_EARLY_BYTES of DATA is written at once, so its transport's high-water mark
(flow.WRITE_BUFFER_HIGH) pauses the pumps in time.

Backpressure: DATA waits in a ``Flow`` (exchange.py) until the destination's windows and
transport allow; it is acknowledged to its source (WINDOW_UPDATE) only when it moves on, so
a slow reader makes the other peer stop at its window, never the proxy buffer without
bound. A paused transport or a closed window puts the flow in ``blocked``; window updates,
settings changes and ``resume_writing`` pump them again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, cast

from ..http1.flow import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW
from ..route import TcpCounter
from .h2codec import H2Codec

if TYPE_CHECKING:
    from .exchange import Exchange, Flow

# DATA queued on one connection before it is written without waiting for the end of the
# loop iteration: the write-buffer high-water mark, so pause_writing comes in time.
FLUSH_EARLY_BYTES: Final = WRITE_BUFFER_HIGH


class Flusher:
    """Writes every marked connection once per loop iteration."""

    __slots__ = ("_pending", "_scheduled")

    def __init__(self) -> None:
        self._pending: list[H2Conn] = []
        self._scheduled = False

    def add(self, conn: H2Conn) -> None:
        self._pending.append(conn)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.run)

    def run(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for conn in pending:
            conn.flush()


class H2Conn(asyncio.Protocol):
    """One HTTP/2 connection's socket side (subclassed by server.py and client.py)."""

    codec: H2Codec
    transport: asyncio.Transport

    def __init__(self, flusher: Flusher, tcp: TcpCounter) -> None:
        self.flusher = flusher
        self.tcp = tcp
        self.exchanges: dict[int, Exchange] = {}
        self.blocked: set[Flow] = set()
        self.write_paused = False
        self.closed = False
        self.closing = False
        self.ticks = 0
        self._marked = False
        self._queued = 0

    def setup(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)

    def mark(self) -> None:
        if not self._marked:
            self._marked = True
            self.flusher.add(self)

    def queued(self, size: int) -> None:
        """``size`` DATA bytes went into the codec."""
        self._queued += size
        if self._queued >= FLUSH_EARLY_BYTES:
            self.flush()
        else:
            self.mark()

    def flush(self) -> None:
        self._marked = False
        self._queued = 0
        data = self.codec.output()
        if data and not self.closed:
            self.transport.write(data)
            self.tcp.wrote(len(data))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.unblock()

    def unblock(self) -> None:
        blocked = self.blocked
        if blocked:
            self.blocked = set()
            for flow in blocked:
                flow.pump()

    def close(self) -> None:
        """Write what is queued, then close."""
        if not self.closing:
            self.closing = True
            self.flush()
            if not self.closed:
                self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if not self.closed:
            self.transport.abort()
