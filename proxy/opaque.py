"""Opaque TCP forwarding: copy bytes both ways between the client and the upstream until
both directions end, at kernel speed.

On Linux each direction moves its bytes with ``os.splice`` from the source socket into a
pipe and from the pipe into the destination socket, so the payload never enters Python;
elsewhere, or when the kernel refuses splice for these sockets (EINVAL and friends), the
direction falls back to ``recv_into``/``send`` through one fixed buffer. Readiness comes
from ``loop.add_reader``/``add_writer`` (works on uvloop as on the default loop).

Behaviour:
- Half-close: when one side ends its stream (EOF), the other side's write half is shut
  down (``shutdown(SHUT_WR)``) and the opposite direction carries on until it ends too.
- Backpressure: a direction reads only when what it read before has been written, so at
  most one pipe (or buffer) of bytes per direction sits in the proxy.
- A reset or read error on either side aborts both, and the other side is reset too
  (SO_LINGER 0), so the peer sees what happened. A write error ends that direction only:
  the opposite one may still be delivering the peer's last bytes.
- Idle timeout: no byte moved either way for ``idle_timeout`` closes both sides.
- Both sockets are always closed when forward_opaque returns (or is cancelled).

Metrics are counted from the client's point of view (Linkerd's inbound ``peer="src"``):
``read(n)`` for bytes read from the client (including ``initial``), ``wrote(n)`` for bytes
written to the client (including ``upstream_initial``), and ``closed(error)`` once at the
end, with error False only when both directions ended by EOF with every byte delivered.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Final, Protocol

# Envoy's tcp_proxy closes a connection idle for 1 hour by default; database pools and
# message-bus clients keep idle connections open for minutes, so anything short would
# break them.
OPAQUE_IDLE_TIMEOUT_SECONDS: Final = 3600.0

# Bytes one direction may hold in flight (pipe capacity). The Linux default pipe is 64 KiB
# (16 pages); bench/opaque_throughput.py --pipe-bytes measured the forwarder's CPU per GB
# at about 0.41 s with 64 KiB, 0.22 s with 256 KiB and 0.20 s with 1 MiB: 256 KiB gets
# most of the gain, and a bigger pipe counts against the per-user pipe page limit
# (/proc/sys/fs/pipe-user-pages-soft, 64 MiB: 128 connections at 2 x 256 KiB; past it a
# non-root proxy's new pipes get 2 pages and cannot grow: still correct, just slower).
PIPE_BYTES: Final = 256 * 1024

# The fallback's buffer per direction (one recv_into); same bound as the pipe.
COPY_BUFFER_BYTES: Final = 256 * 1024

# Chunks moved per readiness callback before yielding to the event loop, so one fast
# stream cannot starve the proxy's other connections (8 x 256 KiB = 2 MiB per wakeup).
MAX_CHUNKS_PER_WAKEUP: Final = 8

# splice(2) errors that mean "not for these file descriptors", not "the connection broke".
_SPLICE_UNSUPPORTED: Final = frozenset(
    {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)
SPLICE_AVAILABLE: Final = sys.platform == "linux" and hasattr(os, "splice")
_SPLICE_FLAGS: Final = (
    os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if SPLICE_AVAILABLE else 0)  # type: ignore[attr-defined,unused-ignore]


class TcpCounters(Protocol):
    """What forward_opaque reports to (shoal.proxy.metrics.TcpMetrics fits)."""

    def read(self, n: int) -> None: ...
    def wrote(self, n: int) -> None: ...
    def closed(self, error: bool) -> None: ...


def _splice(src: int, dst: int, count: int) -> int:
    return os.splice(src, dst, count, flags=_SPLICE_FLAGS)  # type: ignore[attr-defined,unused-ignore]


async def forward_opaque(
    client: socket.socket,
    upstream: socket.socket,
    initial: bytes,
    metrics: TcpCounters | None,
    *,
    upstream_initial: bytes = b"",
    idle_timeout: float = OPAQUE_IDLE_TIMEOUT_SECONDS,
    splice: bool | None = None,
) -> None:
    """Relay between ``client`` and ``upstream`` (connected stream sockets) until both
    directions have ended; close both. ``initial``: bytes already read from the client
    (sent to the upstream first); ``upstream_initial``: bytes the server already sent (sent
    to the client first). ``splice``: None = use it where available; False = never."""
    loop = asyncio.get_running_loop()
    use_splice = SPLICE_AVAILABLE if splice is None else (splice and SPLICE_AVAILABLE)
    forward = _Forward(loop, client, upstream, idle_timeout)
    read = metrics.read if metrics is not None else None
    wrote = metrics.wrote if metrics is not None else None
    if read is not None and initial:
        read(len(initial))
    try:
        forward.pumps.append(
            _Pump(forward, client, upstream, initial, use_splice, on_fill=read, on_deliver=None))
        forward.pumps.append(
            _Pump(forward, upstream, client, upstream_initial, use_splice, on_fill=None,
                  on_deliver=wrote))
        forward.start()
        await forward.finished
    except BaseException:
        forward.error = True
        raise
    finally:
        forward.close()
        if metrics is not None:
            metrics.closed(forward.error)


class _Forward:
    """One forwarded connection: its two pumps, idle timer and ending."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        idle_timeout: float,
    ) -> None:
        self.loop = loop
        self.sockets = (client, upstream)
        for sock in self.sockets:
            sock.setblocking(False)
        self.idle_timeout = idle_timeout
        self.last_activity = loop.time()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.pumps: list[_Pump] = []
        self.error = False
        self.reset = False
        self.idle_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.idle_timer = self.loop.call_at(self.last_activity + self.idle_timeout,
                                            self._check_idle)
        for pump in self.pumps:
            pump.start()

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    def _check_idle(self) -> None:
        due = self.last_activity + self.idle_timeout
        if self.loop.time() >= due:
            self.idle_timer = None
            self.end(error=True)
        else:
            self.idle_timer = self.loop.call_at(due, self._check_idle)

    def pump_done(self) -> None:
        if all(pump.done for pump in self.pumps):
            self.end(error=self.error)

    def end(self, *, error: bool, reset: bool = False) -> None:
        self.error = self.error or error
        self.reset = self.reset or reset
        for pump in self.pumps:
            pump.stop()
        if not self.finished.done():
            self.finished.set_result(None)

    def close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        for pump in self.pumps:
            pump.stop()
            pump.release()
        for sock in self.sockets:
            if self.reset:  # pass a reset on: close with RST instead of FIN
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()


class _Pump:
    """One direction, src -> dst: fill (read from src into the pipe or buffer), flush
    (write all of it to dst), repeat; reading pauses while a flush waits for dst."""

    def __init__(
        self,
        forward: _Forward,
        src: socket.socket,
        dst: socket.socket,
        head: bytes,
        use_splice: bool,
        *,
        on_fill: Callable[[int], None] | None,
        on_deliver: Callable[[int], None] | None,
    ) -> None:
        self.forward = forward
        self.loop = forward.loop
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.head = memoryview(head)  # bytes read before forwarding began, sent first
        self.on_fill, self.on_deliver = on_fill, on_deliver
        self.pipe: tuple[int, int] | None = _open_pipe() if use_splice else None
        self.pipe_capacity = _pipe_capacity(self.pipe) if self.pipe else 0
        self.in_pipe = 0
        self.buffer: bytearray | None = None if self.pipe else bytearray(COPY_BUFFER_BYTES)
        self.pending = memoryview(b"")  # copy mode: read but not yet written
        self.reading = self.writing = False
        self.done = False

    # -- state ---------------------------------------------------------------------------

    def start(self) -> None:
        self._after_flush(self._flush())

    def _want_read(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False
        if not self.reading:
            self.loop.add_reader(self.src_fd, self._on_readable)
            self.reading = True

    def _want_write(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        if not self.writing:
            self.loop.add_writer(self.dst_fd, self._on_writable)
            self.writing = True

    def stop(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False
        self.done = True

    def release(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    # -- events --------------------------------------------------------------------------

    def _on_readable(self) -> None:
        self.forward.touch()
        for _ in range(MAX_CHUNKS_PER_WAKEUP):
            try:
                count = self._fill()
            except OSError:  # reset by the peer: abort both sides, pass the reset on
                self.forward.end(error=True, reset=True)
                return
            if count is None:
                return
            if count == 0:
                self._eof()
                return
            flushed = self._flush()
            if flushed is not True:
                self._after_flush(flushed)
                return

    def _on_writable(self) -> None:
        self.forward.touch()
        self._after_flush(self._flush())

    def _after_flush(self, flushed: bool | None) -> None:
        if flushed is None:  # dst broke: this direction is over
            self.stop()
            self.forward.error = True
            self.forward.pump_done()
        elif flushed:
            self._want_read()
        else:
            self._want_write()

    def _eof(self) -> None:
        self.stop()
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone; the other direction will find out
        self.forward.pump_done()

    # -- moving bytes --------------------------------------------------------------------

    def _fill(self) -> int | None:
        """Read from src: a count, 0 at EOF, None if nothing is there. Called only when
        everything read before has been flushed."""
        if self.pipe is not None:
            try:
                count = _splice(self.src_fd, self.pipe[1], self.pipe_capacity)
            except BlockingIOError:
                return None
            except OSError as error:
                if error.errno not in _SPLICE_UNSUPPORTED:
                    raise
                self._fall_back()
                return self._fill()
            self.in_pipe += count
        else:
            assert self.buffer is not None
            try:
                count = self.src.recv_into(self.buffer)
            except BlockingIOError:
                return None
            self.pending = memoryview(self.buffer)[:count]
        if count and self.on_fill is not None:
            self.on_fill(count)
        return count

    def _flush(self) -> bool | None:
        """Write what is held to dst: True when all is written, False when dst is full,
        None when dst is broken."""
        try:
            while self.head:
                self.head = self.head[self._send(self.head):]
            while self.in_pipe:
                assert self.pipe is not None
                try:
                    sent = _splice(self.pipe[0], self.dst_fd, self.in_pipe)
                except OSError as error:
                    if error.errno not in _SPLICE_UNSUPPORTED:
                        raise
                    self._fall_back()
                    continue
                self.in_pipe -= sent
                self._delivered(sent)
            while self.pending:
                self.pending = self.pending[self._send(self.pending):]
        except BlockingIOError:
            return False
        except OSError:
            return None
        return True

    def _send(self, data: memoryview) -> int:
        sent = self.dst.send(data)
        self._delivered(sent)
        return sent

    def _delivered(self, count: int) -> None:
        if self.on_deliver is not None:
            self.on_deliver(count)

    def _fall_back(self) -> None:
        """splice refused these sockets: copy through a buffer from now on, keeping any
        bytes already in the pipe (they are written first)."""
        assert self.pipe is not None
        held = b""
        while len(held) < self.in_pipe:
            held += os.read(self.pipe[0], self.in_pipe - len(held))
        self.release()
        self.in_pipe = 0
        self.buffer = bytearray(COPY_BUFFER_BYTES)
        self.pending = memoryview(held)


def _open_pipe() -> tuple[int, int] | None:
    """A non-blocking pipe sized PIPE_BYTES (or as big as the kernel allows), or None when
    no pipe can be had (file descriptor limit): the caller copies instead."""
    try:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # over the per-user pipe limit: keep the default size
    return read_end, write_end


def _pipe_capacity(pipe: tuple[int, int]) -> int:
    try:
        return int(fcntl.fcntl(pipe[1], _F_GETPIPE_SZ))
    except OSError:
        return 64 * 1024  # the Linux default pipe capacity
