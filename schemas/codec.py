"""Encoding and typed decoding of bus messages.

One decoder is built per message type and reused. A malformed or truncated message
raises ``WireDecodeError``, which names the subject and the offending field; receivers
log it and drop the message (or reply ``bad_request``) instead of crashing.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


class WireDecodeError(ValueError):
    """A message on ``subject`` did not match its schema: the sender's fault."""

    def __init__(self, subject: str, detail: str, field: str = "") -> None:
        self.subject = subject
        self.detail = detail
        self.field = field
        where = f" at {field}" if field else ""
        super().__init__(f"malformed message on {subject}{where}: {detail}")


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def _field_of(error_text: str) -> str:
    # msgspec ends validation messages with "- at `$.path`".
    marker = " - at `"
    if marker in error_text:
        return error_text.rsplit(marker, 1)[1].rstrip("`")
    return ""


class Decoder(Generic[T]):
    """A typed JSON decoder for one message type (or tagged union) on one subject."""

    __slots__ = ("_decoder", "subject", "type")

    def __init__(self, message_type: Any, subject: str) -> None:
        self.type = message_type
        self.subject = subject
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(message_type)

    def decode(self, data: bytes, subject: str | None = None) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as error:
            text = str(error)
            raise WireDecodeError(subject or self.subject, text, _field_of(text)) from None
        except msgspec.DecodeError as error:
            detail = str(error) if data else "empty message"
            raise WireDecodeError(subject or self.subject, detail) from None
