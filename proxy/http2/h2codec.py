"""The h2-backed implementation of the codec seam (codec.py): the only module that knows
the ``h2`` library. Pure code, no I/O.

What it changes in h2 and why (DESIGN.md, "Performance notes"):
- Header validation and normalisation are off both ways: h2 spends ~17% of a proxied
  request there, and the engine re-validates what it relies on (headers.py: pseudo-headers,
  connection-specific fields, ``te``); everything else travels as it came and the next
  hop judges it. Content-Length against DATA is still checked by h2's stream machine.
- ``MAX_CLOSED_STREAMS`` is lowered from 65,536 (about 11 MB of closed-stream records on
  a busy connection) to CLOSED_STREAMS_KEPT.
- GOAWAY does not close the connection: h2 moves to CLOSED on any GOAWAY, sent or
  received, after which the streams below the last id can neither send nor receive. RFC
  9113 section 6.8 lets those streams finish, and graceful drain needs exactly that, so a
  NO_ERROR GOAWAY is written here without touching h2's state, and a received GOAWAY
  becomes an event without closing (``_ShoalH2Connection._receive_goaway_frame``). This
  leans on h2 4.x internals (``_data_to_send``, the frame dispatch table); the tests cover
  both directions.
- hpack logs every integer and field it codes at DEBUG (~30 ``log.debug`` calls per
  proxied request, 5% of the time); unless that logger is enabled for DEBUG, its module
  logger is swapped for one whose ``debug`` does nothing (``quiet_hpack``).
- Our SETTINGS are installed before the preface (``local_settings`` replaced, as h2's
  documentation suggests) so the first SETTINGS frame carries them, and the connection
  window is raised with one WINDOW_UPDATE right after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

import h2.config
import h2.connection
import h2.events as h2e
import h2.exceptions
import h2.settings
import hpack.hpack
from hyperframe.frame import GoAwayFrame

from .codec import (
    PROTOCOL_ERROR,
    CodecError,
    DataReceived,
    Event,
    GoAwayReceived,
    Headers,
    InformationalReceived,
    RequestReceived,
    ResponseReceived,
    SettingsChanged,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)

log = logging.getLogger("shoal.proxy.http2")

# Closed-stream records h2 keeps to tell a late frame on a reset stream (a stream error)
# from one on a stream that never existed (a connection error). Frames in flight arrive
# within one round trip: 1,000 streams covers 10,000 streams/s on one connection (more
# than this proxy reaches) at a 100 ms round trip.
CLOSED_STREAMS_KEPT: Final = 1000
# RFC 9113 6.5.2: the initial window every connection starts with.
DEFAULT_WINDOW: Final = 65_535
_SETTING = h2.settings.SettingCodes


class _QuietLogger:
    """Stands in for hpack's module logger: debug() costs one call and does nothing."""

    def __init__(self, real: logging.Logger) -> None:
        self.real = real

    def debug(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def quiet_hpack() -> None:
    """Skip hpack's per-field debug logging unless someone asked for it."""
    current = hpack.hpack.log
    if isinstance(current, logging.Logger) and not current.isEnabledFor(logging.DEBUG):
        hpack.hpack.log = _QuietLogger(current)  # type: ignore[assignment]


@dataclass(frozen=True)
class CodecSettings:
    """What we advertise; config.Http2Settings says where each number comes from."""

    max_concurrent_streams: int
    stream_window: int
    connection_window: int
    max_frame_size: int
    max_header_list_size: int


class _ShoalH2Connection(h2.connection.H2Connection):
    MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        """A GOAWAY as an event, leaving the connection open for the streams below the
        last id (h2's own version closes the state machine and drops queued output)."""
        event = h2e.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class H2Codec:
    """codec.Codec over an h2 connection; see the module docstring."""

    __slots__ = ("_conn", "_settings", "client_side")

    def __init__(self, client_side: bool, settings: CodecSettings) -> None:
        quiet_hpack()
        self.client_side = client_side
        self._settings = settings
        config = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None,
            validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=False, normalize_inbound_headers=False)
        conn = _ShoalH2Connection(config=config)
        values = {
            _SETTING.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            _SETTING.INITIAL_WINDOW_SIZE: settings.stream_window,
            _SETTING.MAX_FRAME_SIZE: settings.max_frame_size,
            _SETTING.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
        }
        if client_side:
            values[_SETTING.ENABLE_PUSH] = 0
        conn.local_settings = h2.settings.Settings(client=client_side, initial_values=values)
        conn.max_inbound_frame_size = settings.max_frame_size
        conn.decoder.max_header_list_size = settings.max_header_list_size
        self._conn = conn

    def initiate(self) -> None:
        conn = self._conn
        conn.initiate_connection()
        extra = self._settings.connection_window - DEFAULT_WINDOW
        if extra > 0:
            conn.increment_flow_control_window(extra)

    def receive(self, data: bytes) -> list[Event]:
        try:
            events: list[Any] = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            raise CodecError(int(error.error_code), str(error) or type(error).__name__) \
                from None
        except Exception as error:  # h2 or hyperframe choking on input it did not expect
            log.debug("h2 raised %r on peer input", error)
            self._append_goaway(PROTOCOL_ERROR, self._conn.highest_inbound_stream_id)
            raise CodecError(PROTOCOL_ERROR, f"malformed HTTP/2 input: "
                                             f"{type(error).__name__}") from None
        out: list[Event] = []
        add = out.append
        for event in events:
            kind = type(event)
            if kind is h2e.DataReceived:
                add(DataReceived(event.stream_id, event.data, event.flow_controlled_length,
                                 event.stream_ended is not None))
            elif kind is h2e.RequestReceived:
                add(RequestReceived(event.stream_id, event.headers,
                                    event.stream_ended is not None))
            elif kind is h2e.ResponseReceived:
                add(ResponseReceived(event.stream_id, event.headers,
                                     event.stream_ended is not None))
            elif kind is h2e.TrailersReceived:
                add(TrailersReceived(event.stream_id, event.headers, True))
            elif kind is h2e.WindowUpdated:
                add(WindowOpened(event.stream_id))
            elif kind is h2e.StreamReset:
                add(StreamReset(event.stream_id, int(event.error_code)))
            elif kind is h2e.InformationalResponseReceived:
                add(InformationalReceived(event.stream_id, event.headers, False))
            elif kind is h2e.RemoteSettingsChanged:
                add(SettingsChanged(0))
            elif kind is h2e.ConnectionTerminated:
                add(GoAwayReceived(int(event.error_code), int(event.last_stream_id),
                                   event.additional_data or b""))
            # StreamEnded is folded into the events above; pings and settings are
            # acknowledged by h2 itself; priority, ALTSVC and unknown frames are ignored.
        return out

    def output(self) -> bytes:
        return self._conn.data_to_send()

    def new_stream_id(self) -> int:
        try:
            return int(self._conn.get_next_available_stream_id())
        except h2.exceptions.NoAvailableStreamIDError:
            raise StreamClosed("stream ids exhausted on this connection") from None

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        try:
            self._conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as error:
            raise StreamClosed(str(error)) from None

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        try:
            self._conn.send_data(stream_id, data, end_stream=end_stream)
        except h2.exceptions.ProtocolError as error:
            raise StreamClosed(str(error)) from None

    def end_stream(self, stream_id: int) -> None:
        try:
            self._conn.end_stream(stream_id)
        except h2.exceptions.ProtocolError as error:
            raise StreamClosed(str(error)) from None

    def reset(self, stream_id: int, code: int) -> None:
        try:
            self._conn.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass  # already closed (StreamClosedError is a ProtocolError)

    def goaway(self, code: int, last_stream_id: int, debug: bytes = b"") -> None:
        self._append_goaway(code, last_stream_id, debug)

    def _append_goaway(self, code: int, last_stream_id: int, debug: bytes = b"") -> None:
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = code
        frame.additional_data = debug
        self._conn._data_to_send += frame.serialize()

    def ack(self, stream_id: int, size: int) -> None:
        if size > 0:
            try:
                self._conn.acknowledge_received_data(size, stream_id)
            except h2.exceptions.ProtocolError:
                pass

    def send_window(self, stream_id: int) -> int:
        try:
            return int(self._conn.local_flow_control_window(stream_id))
        except h2.exceptions.ProtocolError:
            raise StreamClosed(f"stream {stream_id} is closed") from None

    @property
    def max_frame_size(self) -> int:
        return int(self._conn.max_outbound_frame_size)

    @property
    def remote_max_streams(self) -> int:
        return int(self._conn.remote_settings.max_concurrent_streams)

    @property
    def last_peer_stream_id(self) -> int:
        return int(self._conn.highest_inbound_stream_id)
