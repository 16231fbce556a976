"""gRPC rules as plain code: deadlines (``grpc-timeout``), status codes, and how a
response is classified for metrics and for failure accrual.

- ``grpc-timeout`` (gRPC over HTTP/2, "Requests"): 1 to 8 ASCII digits and a unit, H M S
  m u n. A malformed value is ignored (the server judges it), as grpc-go does.
- Classification (Linkerd's): a gRPC response is a success only with ``grpc-status`` 0,
  whatever the HTTP status; a response without ``grpc-status`` is a failure
  (``grpc_status_code`` absent). Other HTTP responses: success below 500.
- Failure accrual counts as endpoint failures only the codes Linkerd names: DATA_LOSS,
  DEADLINE_EXCEEDED, INTERNAL, PERMISSION_DENIED and UNAVAILABLE; an UNKNOWN from a
  handler is the application's answer, not a sick endpoint.
- A gRPC client gets proxy errors as a trailers-only response (HTTP 200, ``grpc-status``,
  ``grpc-message``), the status mapped from the HTTP one as gRPC's "HTTP to gRPC Status
  Code Mapping" document does.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
CANCELLED: Final = 1
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
DATA_LOSS: Final = 15
UNAUTHENTICATED: Final = 16

ENDPOINT_FAILURES: Final = frozenset({DATA_LOSS, DEADLINE_EXCEEDED, INTERNAL,
                                      PERMISSION_DENIED, UNAVAILABLE})

_UNITS: Final = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3,
                 ord("u"): 1e-6, ord("n"): 1e-9}
_HTTP_TO_GRPC: Final = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED,
                        404: UNIMPLEMENTED, 429: UNAVAILABLE, 502: UNAVAILABLE,
                        503: UNAVAILABLE, 504: UNAVAILABLE}


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` in seconds, or None when malformed."""
    if not 2 <= len(value) <= 9:
        return None
    unit = _UNITS.get(value[-1])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def parse_status(value: bytes) -> int:
    """A ``grpc-status`` value; anything but a small number reads as UNKNOWN."""
    if value.isdigit() and len(value) <= 3:
        return int(value)
    return UNKNOWN


def from_http(status: int) -> int:
    return _HTTP_TO_GRPC.get(status, UNKNOWN)


def is_success(grpc_status: int | None) -> bool:
    return grpc_status == OK


def endpoint_ok(grpc_status: int | None) -> bool:
    """False when the status says the endpoint itself is failing (accrual)."""
    return grpc_status not in ENDPOINT_FAILURES


def percent_encode(text: str) -> bytes:
    """``grpc-message`` encoding: printable ASCII except '%' as is, the rest %XX (UTF-8)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)
