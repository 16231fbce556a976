"""The error reply every request/reply service sends when a request fails.

It travels as the reply body, and its code also travels in the ``Nats-Service-Error`` and
``Nats-Service-Error-Code`` headers that ``nats.micro`` clients understand.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ErrorCode = Literal[
    "bad_request",  # the request did not decode: the caller's fault (HTTP 400 analogue)
    "forbidden",  # the caller may not do this
    "unavailable",  # a dependency is down; retry later (503)
    "internal",  # a bug in the service (500); logged with its traceback there
]

HTTP_STATUS_OF: dict[str, int] = {
    "bad_request": 400,
    "forbidden": 403,
    "unavailable": 503,
    "internal": 500,
}


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    code: ErrorCode
    message: str
    subject: str = ""
