"""Tap on the proxy as plain code: filter semantics, the rate cap, redaction, body
capture, expiry, and the one flag the hot path reads."""

from __future__ import annotations

import msgspec
import pytest

from shoal.proxy.tap import (
    MAX_EVENT_HEADERS,
    REDACTED,
    LocalProxy,
    RequestInfo,
    TapRegistry,
    TokenBucket,
    capture_body,
    filter_matches,
    redact,
)
from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.tap import (
    MAX_BODY_CAPTURE_BYTES,
    Peer,
    TapEvent,
    TapFilter,
    TapRequestStart,
    TapResponseEnd,
    TapResponseStart,
    TapSession,
)

LOCAL = LocalProxy("demo", "web", "web-1")
T0 = 1_700_000_000.0
EVENTS: Decoder[TapEvent] = Decoder(TapEvent, "test")


def _request(**kw: object) -> RequestInfo:
    base: dict[str, object] = {
        "id": "1:0", "direction": "inbound", "method": "GET",
        "authority": "web-svc.demo:8080", "path": "/api/vote?choice=:doughnut:",
        "source": Peer(address="127.0.0.1", port=40000, namespace="demo",
                       workload="vote-bot"),
        "destination": Peer(address="127.0.0.1", port=8080, namespace="demo",
                            workload="web", pod="web-1"),
        "tls": True,
        "headers": (("Authorization", "Bearer secret"), ("Cookie", "a=b"),
                    ("X-Trace", "t1"), ("X-Api-Key", "k"), ("Accept", "a"), ("accept", "b")),
    }
    base.update(kw)
    return RequestInfo(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("filter_", "matches"), [
    (TapFilter(), True),
    (TapFilter(namespace="demo", workload="web"), True),
    (TapFilter(workload="voting"), False),
    (TapFilter(pod="web-2"), False),
    (TapFilter(direction="inbound"), True),
    (TapFilter(direction="outbound"), False),
    (TapFilter(from_workload="vote-bot"), True),
    (TapFilter(from_workload="vote-bot", from_namespace="other"), False),
    (TapFilter(to_workload="web"), True),
    (TapFilter(to_workload="emoji"), False),
    (TapFilter(method="get"), True),
    (TapFilter(method="POST"), False),
    (TapFilter(path_prefix="/api/vote"), True),
    (TapFilter(path_prefix="/api/list"), False),
    (TapFilter(authority="web-svc.demo"), True),  # no port given: any port
    (TapFilter(authority="web-svc.demo:8080"), True),
    (TapFilter(authority="web-svc.demo:9090"), False),
    (TapFilter(scheme="https"), False),
])
def test_filter_semantics(filter_: TapFilter, matches: bool) -> None:
    assert filter_matches(filter_, LOCAL, _request()) is matches


def _session(sid: str = "s1", expires: float = T0 + 30, **kw: object) -> bytes:
    return encode(TapSession(id=sid, expires_at=expires, **kw))  # type: ignore[arg-type]


def _registry(**kw: object) -> tuple[TapRegistry, list[tuple[str, bytes]]]:
    out: list[tuple[str, bytes]] = []
    registry = TapRegistry(LOCAL, lambda s, b: out.append((s, b)), clock=lambda: T0,
                           **kw)  # type: ignore[arg-type]
    return registry, out


def test_inactive_until_a_session_can_match_this_proxy() -> None:
    registry, out = _registry()
    assert registry.active is False
    registry.apply("s0", _session("s0", filter=TapFilter(workload="voting")), T0)
    assert registry.active is False  # a session for another workload costs us nothing
    registry.apply("s1", _session("s1", filter=TapFilter(workload="web")), T0)
    assert registry.active is True
    registry.apply("s1", None, T0)
    assert registry.active is False and out == []


def test_events_of_a_tapped_request() -> None:
    registry, out = _registry()
    registry.apply("s1", _session("s1", redact_headers=["X-Api-Key"]), T0)
    record = registry.request_start(_request(), now=T0)
    assert record is not None
    record.response_start(200, [("Set-Cookie", "x"), ("content-type", "text/plain")])
    record.response_end(grpc_status=2, response_bytes=42)
    record.response_end(response_bytes=1)  # a second end is ignored
    assert [s for s, _ in out] == [names.tap_subject("demo", "web", "web-1")] * 3
    req, rsp, end = (EVENTS.decode(b) for _, b in out)
    assert isinstance(req, TapRequestStart) and req.sessions == ["s1"]
    assert req.method == "GET" and req.path.startswith("/api/vote") and req.tls
    assert req.headers["authorization"] == REDACTED and req.headers["cookie"] == REDACTED
    assert req.headers["x-api-key"] == REDACTED and req.headers["x-trace"] == "t1"
    assert req.headers["accept"] == "a, b" and req.body == ""
    assert isinstance(rsp, TapResponseStart) and rsp.status == 200
    assert rsp.headers["set-cookie"] == REDACTED and rsp.latency_us >= 0
    assert isinstance(end, TapResponseEnd) and end.grpc_status == 2
    assert end.response_bytes == 42 and end.duration_us >= rsp.latency_us


def test_the_rate_cap_holds_per_session() -> None:
    registry, out = _registry()
    registry.apply("slow", _session("slow", max_rps=10), T0)
    registry.apply("fast", _session("fast", max_rps=1000), T0)
    tapped = [registry.request_start(_request(), now=T0 + i * 0.001) for i in range(500)]
    starts = [EVENTS.decode(b) for _, b in out]
    assert len(starts) == 500  # "fast" takes them all (burst 1000)
    slow = [e for e in starts if "slow" in e.sessions]
    assert 14 <= len(slow) <= 15  # a burst of one second's worth (10), + 0.5 s at 10/s
    assert registry.rate_limited == 500 - len(slow) and all(tapped)
    # One second later the slow session has ten more tokens.
    registry.apply("fast", None, T0)
    later = [registry.request_start(_request(), now=T0 + 2.0 + i * 1e-4) for i in range(50)]
    assert sum(1 for r in later if r is not None) == 10


def test_token_bucket() -> None:
    bucket = TokenBucket(100.0, 0.0)
    assert sum(bucket.take(0.0) for _ in range(1000)) == 100
    assert sum(bucket.take(0.5) for _ in range(1000)) == 50


def test_expiry_stops_events_and_clears_the_flag() -> None:
    registry, out = _registry()
    registry.apply("s1", _session("s1", expires=T0 + 5), T0)
    assert registry.request_start(_request(), now=T0 + 1) is not None
    registry.expire(T0 + 6)
    assert registry.active is False
    assert registry.request_start(_request(), now=T0 + 6) is None
    assert len(out) == 1


def test_an_extension_keeps_the_token_bucket() -> None:
    registry, _ = _registry()
    registry.apply("s1", _session("s1", max_rps=2), T0)
    assert registry.request_start(_request(), now=T0) is not None
    assert registry.request_start(_request(), now=T0) is not None
    registry.apply("s1", _session("s1", max_rps=2, expires=T0 + 60), T0)  # extended
    assert registry.request_start(_request(), now=T0) is None


def test_body_capture_needs_the_session_and_policy() -> None:
    body = b"x" * 100_000
    for asked, allowed, expected in [(False, True, 0), (True, False, 0), (True, True, 1000)]:
        registry, out = _registry(body_allowed=lambda _r, ok=allowed: ok)
        registry.apply("s1", _session("s1", capture_body=asked, max_body_bytes=1000), T0)
        registry.request_start(_request(method="POST"), body=body, now=T0)
        event = EVENTS.decode(out[0][1])
        assert isinstance(event, TapRequestStart) and len(event.body) == expected
    assert len(capture_body(body, 10**9)) == MAX_BODY_CAPTURE_BYTES
    assert capture_body(b"\xff\xfeok", 10) == "\ufffd\ufffdok"


def test_redaction_bounds() -> None:
    many = [(f"x-{i}", "v" * 10_000) for i in range(500)]
    shown = redact(many)
    assert len(shown) == MAX_EVENT_HEADERS and all(len(v) <= 512 for v in shown.values())
    assert redact([("Proxy-Authorization", "p")]) == {"proxy-authorization": REDACTED}


def test_a_malformed_session_is_ignored() -> None:
    registry, _ = _registry()
    registry.apply("bad", b'{"id": 5}', T0)
    assert registry.active is False and registry.sessions == []
    assert msgspec.json.decode(_session())["id"] == "s1"
