"""The wire contract: every message round-trips through JSON, malformed and truncated
messages give typed errors naming the subject and field, and the checked-in JSON Schemas
match the code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shoal.schemas import contract, names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.endpoints import Deregistration, Endpoint, EndpointSet, Registration
from shoal.schemas.errors import ErrorReply
from shoal.schemas.events import (
    CertificateIssued,
    CertificateRefused,
    EndpointsChanged,
    PolicyApplied,
    PolicyRejectedEvent,
)
from shoal.schemas.identity import CertifyIssued, CertifyRefused, CertifyRequest, TrustBundle
from shoal.schemas.metrics import (
    EdgeRow,
    EdgesAnswer,
    EdgesQuery,
    MetricsReport,
    RequestRow,
    RouteRow,
    RoutesAnswer,
    RoutesQuery,
    StatAnswer,
    StatQuery,
    StatRow,
    TcpRow,
    TopAnswer,
    TopQuery,
    TopRow,
)
from shoal.schemas.policy import (
    Authorization,
    AuthorizationRule,
    PolicyAccepted,
    PolicyApplyRequest,
    PolicyDocument,
    PolicyError,
    PolicyRejected,
    RateLimit,
    RetryPolicy,
    Route,
    SplitBackend,
    StoredPolicy,
)
from shoal.schemas.tap import (
    Peer,
    TapClose,
    TapExtend,
    TapFilter,
    TapOpen,
    TapRequestStart,
    TapResponseEnd,
    TapResponseStart,
    TapSession,
    TapSessionClosed,
    TapSessionGranted,
)

REPO = Path(__file__).resolve().parent.parent

_document = PolicyDocument(
    namespace="emojivoto", service="voting",
    authorization=Authorization(default="all-authenticated", rules=[
        AuthorizationRule(name="web", identities=["web.emojivoto.serviceaccount.identity."
                                                  "shoal.cluster.local"])]),
    routes=[Route(name="vote", path_prefix="/emojivoto.v1.VotingService/", timeout_ms=500,
                  retries=RetryPolicy(limit=2))],
    traffic_split=[SplitBackend(service="voting", weight=90),
                   SplitBackend(service="voting-v2", weight=10)],
    rate_limit=RateLimit(total_rps=100),
)
_peer = Peer(address="127.0.0.1", port=4143, namespace="emojivoto", workload="web")

# One sample of every message, by the exported type it belongs to.
SAMPLES: dict[str, list[Any]] = {
    "EndpointSet": [EndpointSet(namespace="emojivoto", service="web", endpoints=[
        Endpoint(address="127.0.0.1", port=4143, identity="web.emojivoto", weight=50,
                 zone="a", labels={"pod": "web-1"}, protocol_hint="http1")])],
    "RegisterMessage": [
        Registration(namespace="emojivoto", service="web", workload="web", pod="web-1",
                     address="127.0.0.1", port=4143),
        Deregistration(namespace="emojivoto", service="web", pod="web-1",
                       address="127.0.0.1", port=4143)],
    "CertifyRequest": [CertifyRequest(identity="a.b", token="t", csr_pem="-----BEGIN")],
    "CertifyReply": [CertifyIssued(leaf_pem="x", intermediates_pem=["y"], valid_until=1.5),
                     CertifyRefused(code="invalid_csr", reason="two SANs")],
    "TrustBundle": [TrustBundle(anchors_pem=["a", "b"])],
    "PolicyDocument": [_document],
    "StoredPolicy": [StoredPolicy(version=3, applied_at=1.0, applied_by="op",
                                  document=_document)],
    "PolicyApplyRequest": [PolicyApplyRequest(text="namespace: a", format="yaml")],
    "PolicyApplyReply": [PolicyAccepted(namespace="a", service="b", version=2),
                         PolicyRejected(errors=[PolicyError(path="$.x", message="bad")])],
    "TapSession": [TapSession(id="s1", filter=TapFilter(namespace="emojivoto",
                                                        path_prefix="/api"))],
    "TapSessionRequest": [TapOpen(filter=TapFilter(workload="web"), max_rps=10),
                          TapExtend(id="s1"), TapClose(id="s1")],
    "TapSessionReply": [TapSessionGranted(session=TapSession(id="s1"),
                                          subject="shoal.v1.tap.emojivoto.>"),
                        TapSessionClosed(id="s1")],
    "TapEvent": [
        TapRequestStart(id="1:1", direction="inbound", source=_peer, method="GET",
                        path="/api/vote", headers={"authorization": "<redacted>"}),
        TapResponseStart(id="1:1", direction="inbound", status=500, latency_us=1200),
        TapResponseEnd(id="1:1", direction="inbound", grpc_status=2, duration_us=1500,
                       response_bytes=42)],
    "MetricsReport": [MetricsReport(
        namespace="emojivoto", workload="web", pod="web-1", instance="abc", seq=7,
        interval_start=1.0, interval_end=6.0,
        requests=[RequestRow(direction="outbound", route="GET /api/list",
                             status_class="2xx", status_code=200, success=True, requests=3,
                             latency_counts=[0] * 26, latency_sum_ms=3.0)],
        tcp=[TcpRow(direction="inbound", opens=1, read_bytes=10)])],
    "MetricsQuery": [StatQuery(namespace="emojivoto"), TopQuery(name="web"),
                     EdgesQuery(), RoutesQuery(name="web")],
    "MetricsAnswer": [
        StatAnswer(rows=[StatRow(name="web", namespace="emojivoto", meshed="1/1",
                                 success_rate=0.9, rps=1.0, latency_p50_ms=1,
                                 latency_p95_ms=2, latency_p99_ms=3, tcp_conn=1)],
                   window_seconds=60),
        TopAnswer(rows=[TopRow(source="vote-bot", destination="web", method="GET",
                               path="/api/vote", count=3, best_ms=1, worst_ms=2, last_ms=1,
                               success_rate=0.5)], window_seconds=60),
        EdgesAnswer(rows=[EdgeRow(src="web", dst="voting", src_namespace="e",
                                  dst_namespace="e", secured=True)], window_seconds=60),
        RoutesAnswer(rows=[RouteRow(route="vote", service="voting", success_rate=None,
                                    rps=0, latency_p50_ms=None, latency_p95_ms=None,
                                    latency_p99_ms=None)], window_seconds=60)],
    "ControlEvent": [
        EndpointsChanged(at=1, source="d", namespace="a", service="b", count=1),
        CertificateIssued(at=1, source="i", identity="x", serial="ab", not_after=2),
        CertificateRefused(at=1, source="i", identity="x", code="invalid_csr", reason="r"),
        PolicyApplied(at=1, source="p", namespace="a", service="b", version=1),
        PolicyRejectedEvent(at=1, source="p", error_count=2)],
    "ErrorReply": [ErrorReply(code="bad_request", message="m")],
}


def test_every_exported_type_has_samples() -> None:
    assert set(SAMPLES) == set(contract.MESSAGE_TYPES)


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_round_trip(type_name: str) -> None:
    decoder: Decoder[Any] = Decoder(contract.MESSAGE_TYPES[type_name], "test.subject")
    for sample in SAMPLES[type_name]:
        data = encode(sample)
        json.loads(data)  # plain JSON for any client
        assert decoder.decode(data) == sample


def test_tagged_unions_carry_kind() -> None:
    data = json.loads(encode(SAMPLES["TapEvent"][2]))
    assert data["type"] == "response_end" and data["grpc_status"] == 2


def test_unknown_fields_are_tolerated_on_the_bus() -> None:
    data = json.loads(encode(SAMPLES["EndpointSet"][0]))
    data["added_in_v1_1"] = {"anything": True}
    data["endpoints"][0]["future"] = 1
    decoder: Decoder[EndpointSet] = Decoder(EndpointSet, names.BUCKET_ENDPOINTS)
    decoded = decoder.decode(json.dumps(data).encode())
    assert decoded == SAMPLES["EndpointSet"][0]


def test_wrong_type_names_subject_and_field() -> None:
    bad = b'{"namespace":"a","service":"b","endpoints":[{"address":"x","port":"80"}]}'
    with pytest.raises(WireDecodeError) as caught:
        Decoder(EndpointSet, "shoal_endpoints").decode(bad, "$KV.shoal_endpoints.a.b")
    assert caught.value.subject == "$KV.shoal_endpoints.a.b"
    assert caught.value.field == "$.endpoints[0].port"
    assert "$KV.shoal_endpoints.a.b" in str(caught.value)


def test_out_of_range_port_is_rejected() -> None:
    bad = b'{"type":"register","namespace":"a","service":"b","workload":"w","pod":"p",' \
          b'"address":"x","port":70000}'
    with pytest.raises(WireDecodeError) as caught:
        Decoder(contract.MESSAGE_TYPES["RegisterMessage"], names.REGISTER).decode(bad)
    assert caught.value.field == "$.port"


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_truncated_messages_give_typed_errors(type_name: str) -> None:
    decoder: Decoder[Any] = Decoder(contract.MESSAGE_TYPES[type_name], "test.subject")
    data = encode(SAMPLES[type_name][0])
    for cut in range(0, len(data) - 1, max(1, len(data) // 25)):
        with pytest.raises(WireDecodeError) as caught:
            decoder.decode(data[:cut])
        assert caught.value.subject == "test.subject"


def test_missing_tag_and_unknown_tag() -> None:
    decoder: Decoder[Any] = Decoder(contract.MESSAGE_TYPES["TapEvent"], "shoal.v1.tap.a.b.c")
    with pytest.raises(WireDecodeError):
        decoder.decode(b'{"id":"1","direction":"inbound","method":"GET"}')
    with pytest.raises(WireDecodeError):
        decoder.decode(b'{"type":"nonsense","id":"1","direction":"inbound"}')


def test_checked_in_json_schemas_match_the_code() -> None:
    directory = REPO / "schemas" / "json"
    exported = contract.json_schemas()
    on_disk = {p.name: p.read_bytes() for p in directory.glob("*.json")}
    assert set(on_disk) == set(exported), "run `make schemas` to re-export"
    for name, text in exported.items():
        assert on_disk[name] == text, f"{name} drifted from the code: run `make schemas`"


def test_json_schemas_validate_samples_structurally() -> None:
    # Every required property of each schema is present in the encoded sample.
    for type_name, samples in SAMPLES.items():
        schema = json.loads(contract.json_schemas()[f"{type_name}.json"])
        defs = schema.get("$defs", {})
        for sample in samples:
            encoded = json.loads(encode(sample))
            name = type(sample).__name__
            required = defs.get(name, {}).get("required", [])
            assert set(required) <= set(encoded), (type_name, name)


def test_subject_tokens_are_safe() -> None:
    assert names.tap_subject("ns", "web", "web.pod-1") == "shoal.v1.tap.ns.web.web_pod-1"
    assert names.metrics_subject("a", "*", ">") == "shoal.v1.metrics.a._._"
    assert names.service_key("emojivoto", "web") == "emojivoto.web"
    assert names.split_service_key("emojivoto.web") == ("emojivoto", "web")


def test_msgspec_structs_are_frozen() -> None:
    for samples in SAMPLES.values():
        for sample in samples:
            with pytest.raises(AttributeError):
                setattr(sample, msgspec.structs.fields(sample)[0].name, None)
