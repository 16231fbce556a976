"""The HTTP/2 codec seam: what the proxy needs from an HTTP/2 implementation, as Shoal's
own small interface, so a native codec (libnghttp2 through cffi, say) can replace the
pure-Python one without touching routing, balancing, metrics or tap (DESIGN.md,
"Performance notes").

A codec is one connection's protocol state and does no I/O: bytes go in through
``receive`` and come back as events; the engine calls ``send_*`` and takes what to write
with ``output``. Flow control stays the engine's business: a codec reports how much it may
send on a stream (``send_window``) and is told when received DATA has been consumed
(``ack``), which is when the WINDOW_UPDATE goes back to the peer.

Errors say whose fault they are: ``CodecError`` is a connection error caused by the peer
(a GOAWAY with ``code`` is already queued in the output; flush it and close), and
``StreamClosed`` is the engine writing to a stream the peer or the codec has closed.
"""

from __future__ import annotations

from typing import Final, Protocol

Headers = list[tuple[bytes, bytes]]

# RFC 9113 section 7 error codes the engine uses.
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
ENHANCE_YOUR_CALM: Final = 0xB
# Every code's name (RFC 9113 section 7), as tap events name a reset.
ERROR_NAMES: Final = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
                      "SETTINGS_TIMEOUT", "STREAM_CLOSED", "FRAME_SIZE_ERROR",
                      "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR",
                      "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")


def error_name(code: int) -> str:
    """``0x8`` -> ``"CANCEL"``; an unknown code as its number (RFC 9113 section 7: treat
    it as INTERNAL_ERROR, but say what came)."""
    return ERROR_NAMES[code] if 0 <= code < len(ERROR_NAMES) else f"0x{code:x}"


class CodecError(Exception):
    """The peer broke the protocol: a connection error; the GOAWAY is in the output."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamClosed(Exception):
    """The engine wrote to a stream that is already closed (reset by the peer, say)."""


class Event:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class RequestReceived(Event):
    """A new stream's request headers (server side)."""

    __slots__ = ("end_stream", "headers")

    def __init__(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream


class ResponseReceived(RequestReceived):
    """A final response head (client side)."""

    __slots__ = ()


class InformationalReceived(RequestReceived):
    """A 1xx response head (client side); never ends the stream."""

    __slots__ = ()


class TrailersReceived(RequestReceived):
    """Trailers: the stream's last headers, always with END_STREAM."""

    __slots__ = ()


class DataReceived(Event):
    """DATA: ``flow_length`` counts padding too; ack it all once consumed."""

    __slots__ = ("data", "end_stream", "flow_length")

    def __init__(self, stream_id: int, data: bytes, flow_length: int, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_length = flow_length
        self.end_stream = end_stream


class StreamReset(Event):
    """The peer reset the stream with ``code``."""

    __slots__ = ("code",)

    def __init__(self, stream_id: int, code: int) -> None:
        self.stream_id = stream_id
        self.code = code


class WindowOpened(Event):
    """The peer granted send credit on a stream (``stream_id`` 0: the connection)."""

    __slots__ = ()


class SettingsChanged(Event):
    """The peer changed its settings (windows or stream limits may have moved)."""

    __slots__ = ()


class GoAwayReceived(Event):
    """The peer sent GOAWAY: streams above ``last_stream_id`` were not processed.
    The codec keeps the connection usable for the streams at or below it."""

    __slots__ = ("code", "debug", "last_stream_id")

    def __init__(self, code: int, last_stream_id: int, debug: bytes) -> None:
        self.stream_id = 0
        self.code = code
        self.last_stream_id = last_stream_id
        self.debug = debug


class Codec(Protocol):
    """One HTTP/2 connection's protocol state (client or server side)."""

    def initiate(self) -> None:
        """Queue the connection preface (client) and our SETTINGS and window."""
        ...

    def receive(self, data: bytes) -> list[Event]:
        """Bytes from the peer -> events; raises CodecError."""
        ...

    def output(self) -> bytes:
        """Everything queued for the peer since the last call."""
        ...

    def new_stream_id(self) -> int:
        """The id for a new outbound stream; raises StreamClosed when ids ran out."""
        ...

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None: ...

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """``data`` must fit ``send_window`` and ``max_frame_size``."""
        ...

    def end_stream(self, stream_id: int) -> None: ...

    def reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM; a no-op on a stream that is already closed."""
        ...

    def goaway(self, code: int, last_stream_id: int, debug: bytes = b"") -> None:
        """GOAWAY. With NO_ERROR the streams at or below ``last_stream_id`` carry on."""
        ...

    def ack(self, stream_id: int, size: int) -> None:
        """``size`` flow-controlled bytes received on the stream were consumed."""
        ...

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream now (stream and connection windows)."""
        ...

    @property
    def max_frame_size(self) -> int: ...

    @property
    def remote_max_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS."""
        ...

    @property
    def last_peer_stream_id(self) -> int:
        """The highest stream id the peer opened (for our GOAWAY)."""
        ...
