"""Opaque TCP relayed between two asyncio transports, for connections where one side is
TLS (proxy/tls.py) and ``os.splice`` cannot move the bytes: the client proxy's app
connection to its TLS connection to the peer proxy (port-mapped upstreams), and the
server proxy's terminated TLS connection to the app (``shoal.opaque``).

Behaviour matches ``opaque.forward_opaque``:
- Half-close: one side's EOF (a TCP FIN, or TLS close_notify) becomes ``write_eof`` on
  the other (close_notify and a FIN through TLS); the opposite direction carries on.
- Backpressure: a side whose write buffer passes RELAY_WRITE_HIGH pauses reading on
  the other side until it drains below RELAY_WRITE_LOW.
- A side lost with an error (reset, TLS failure, truncation) aborts the other side;
  when both directions have ended by EOF the relay closes both sides cleanly.
- Idle timeout: nothing moved either way for ``idle_timeout`` aborts both.
Metrics from the client's point of view: ``read`` for bytes from the client (with
``client_initial``), ``wrote`` for bytes to it (with ``upstream_initial``), ``closed``
once at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, cast

from .opaque import OPAQUE_IDLE_TIMEOUT_SECONDS, TcpCounters

# Per side: the write buffer above which the other side's reading pauses, and the mark
# it must drain below to resume. The opaque forwarder's per-direction bound (PIPE_BYTES).
RELAY_WRITE_HIGH: Final = 256 * 1024
RELAY_WRITE_LOW: Final = 64 * 1024


class _End(asyncio.Protocol):
    """One side of the relay: what it reads goes to ``peer``'s transport."""

    def __init__(self, relay: Relay, on_read: Callable[[int], None] | None) -> None:
        self.relay = relay
        self.on_read = on_read
        self.peer: _End
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] = []  # read (or given) before the peer's transport exists
        self.eof = False
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(RELAY_WRITE_HIGH, RELAY_WRITE_LOW)
        if self.peer.transport is None:
            transport.pause_reading()  # until the peer's transport exists (both_made)
            return
        self.relay.both_made()

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        relay.active = True
        if self.on_read is not None:
            self.on_read(len(data))
        peer = self.peer.transport
        if peer is None:
            self.held.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        peer.write(data)
        if self is relay.upstream and relay.metrics is not None:
            relay.metrics.wrote(len(data))

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write_eof()
        if peer.eof:
            self.relay.finish(error=False)
            return False
        return True

    def pause_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        relay = self.relay
        # Clean only when this side ended its stream first and nothing broke.
        relay.finish(error=exc is not None or not (self.eof and self.peer.eof))


class Relay:
    """One relayed connection: make it, attach both transports, await ``finished``."""

    def __init__(self, metrics: TcpCounters | None, *, client_initial: bytes = b"",
                 upstream_initial: bytes = b"",
                 idle_timeout: float = OPAQUE_IDLE_TIMEOUT_SECONDS) -> None:
        self.loop = asyncio.get_running_loop()
        self.metrics = metrics
        self.client = _End(self, metrics.read if metrics is not None else None)
        self.upstream = _End(self, None)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        if client_initial:
            self.client.held.append(client_initial)
            if metrics is not None:
                metrics.read(len(client_initial))
        if upstream_initial:
            self.upstream.held.append(upstream_initial)
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.error = False
        self.active = False
        self.idle_timeout = idle_timeout
        self._timer: asyncio.TimerHandle | None = None

    def both_made(self) -> None:
        """Both transports exist: pass on what was held, start the idle timer."""
        for end in (self.client, self.upstream):
            peer, held = end.peer.transport, end.held
            assert peer is not None and end.transport is not None
            if held:
                data = b"".join(held)
                end.held = []
                peer.write(data)
                if end is self.upstream and self.metrics is not None:
                    self.metrics.wrote(len(data))
            if end.eof:
                peer.write_eof()
            end.transport.resume_reading()
        self._timer = self.loop.call_later(self.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        if self.active:
            self.active = False
            self._timer = self.loop.call_later(self.idle_timeout, self._check_idle)
            return
        self._timer = None
        self.finish(error=True)

    def finish(self, *, error: bool) -> None:
        """End the relay: both sides closed (aborted when ``error``), once."""
        if self.finished.done():
            return
        self.error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for end in (self.client, self.upstream):
            transport = end.transport
            if transport is not None and not end.done:
                if error:
                    transport.abort()
                else:
                    transport.close()
        if self.metrics is not None:
            self.metrics.closed(error)
        self.finished.set_result(None)

    async def wait(self) -> None:
        """Until the relay ends; cancelling it aborts both sides."""
        try:
            await asyncio.shield(self.finished)
        except asyncio.CancelledError:
            self.finish(error=True)
            raise
