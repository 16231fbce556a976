"""Policy: validation lists every error (pure), and the service stores good documents
with increasing versions over a real NATS server."""

from __future__ import annotations

import json

import pytest
from nats.aio.client import Client

from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.errors import ErrorReply
from shoal.schemas.policy import (
    PolicyAccepted,
    PolicyApplyReply,
    PolicyApplyRequest,
    PolicyRejected,
    StoredPolicy,
)
from shoal.services.policy.service import PolicyService
from shoal.services.policy.validate import MAX_DOCUMENT_BYTES, validate_text

from .conftest import Bus
from .services import in_process

GOOD = """
namespace: emojivoto
service: voting
authorization:
  default: all-authenticated
  rules:
    - name: web-only
      identities: ["web.emojivoto.serviceaccount.identity.shoal.cluster.local"]
      networks: ["127.0.0.0/8"]
      routes: [vote]
routes:
  - name: vote
    path_prefix: /emojivoto.v1.VotingService/
    timeout_ms: 500
    retries: {limit: 2, retry_on: [unavailable]}
traffic_split:
  - {service: voting, weight: 9}
  - {service: voting-v2.emojivoto, weight: 1}
rate_limit: {total_rps: 100}
"""

BAD = """
namespace: EmojiVoto
service: voting
colour: blue
routes:
  - name: vote
    path_prefix: api
    timeout_ms: -5
  - name: vote
    methods: [FETCH]
authorization:
  rules:
    - name: r
      networks: ["300.1.1.1/8"]
      routes: [missing]
failure_accrual: {min_backoff_ms: 5000, max_backoff_ms: 10}
"""


def test_good_document_validates() -> None:
    document, errors = validate_text(GOOD, "yaml")
    assert errors == []
    assert document is not None and document.routes[0].retries is not None
    assert document.routes[0].retries.retry_on == ["unavailable"]


def test_every_error_is_listed_with_its_path() -> None:
    document, errors = validate_text(BAD, "yaml")
    assert document is None
    paths = {e.path for e in errors}
    # schema errors: unknown field, a negative timeout, an unknown method
    assert "$.colour" in paths
    assert "$.routes[0].timeout_ms" in paths
    assert "$.routes[1].methods[0]" in paths
    # the schema errors stop semantic checks; fix them and the semantic ones show
    fixed = BAD.replace("colour: blue\n", "").replace("timeout_ms: -5", "timeout_ms: 5") \
               .replace("[FETCH]", "[GET]")
    _, errors = validate_text(fixed, "yaml")
    paths = {e.path for e in errors}
    assert {"$.namespace", "$.routes[0].path_prefix", "$.routes[1].name",
            "$.authorization.rules[0].networks[0]", "$.authorization.rules[0].routes[0]",
            "$.failure_accrual"} <= paths
    assert len(errors) >= 6


@pytest.mark.parametrize("text,fmt,fragment", [
    ("namespace: [unclosed", "yaml", "not valid yaml"),
    ("{\"namespace\": ", "json", "not valid json"),
    ("- a\n- b\n", "yaml", "must be a mapping"),
    ("", "yaml", "must be a mapping"),
    ("x" * (MAX_DOCUMENT_BYTES + 1), "yaml", "larger than"),
])
def test_unparsable_documents(text: str, fmt: str, fragment: str) -> None:
    document, errors = validate_text(text, fmt)  # type: ignore[arg-type]
    assert document is None and len(errors) == 1 and fragment in errors[0].message


def test_missing_required_fields() -> None:
    _, errors = validate_text("routes: []", "yaml")
    assert {e.path for e in errors} == {"$.namespace", "$.service"}


async def _apply(nc: Client, request: PolicyApplyRequest) -> PolicyApplyReply:
    msg = await nc.request(names.POLICY_APPLY, encode(request), timeout=5)
    return Decoder(PolicyApplyReply, names.POLICY_APPLY).decode(msg.data)


async def test_service_stores_versions_and_rejects_bad(bus: Bus, operator: Client) -> None:
    events = await operator.subscribe(names.event_subject("policy"))
    async with in_process(bus, "policy", PolicyService().install):
        first = await _apply(operator, PolicyApplyRequest(text=GOOD, applied_by="alice"))
        second = await _apply(operator, PolicyApplyRequest(
            text=json.dumps({"namespace": "emojivoto", "service": "voting"}), format="json"))
        assert isinstance(first, PolicyAccepted) and isinstance(second, PolicyAccepted)
        assert second.version == first.version + 1
        kv = await operator.jetstream().key_value(names.BUCKET_POLICY)
        stored_policy: Decoder[StoredPolicy] = Decoder(StoredPolicy, names.BUCKET_POLICY)
        stored = stored_policy.decode((await kv.get("emojivoto.voting")).value or b"")
        assert stored.version == second.version and stored.document.routes == []
        history = await kv.history("emojivoto.voting")
        assert len(history) >= 2  # kept for rollback

        rejected = await _apply(operator, PolicyApplyRequest(text=BAD))
        assert isinstance(rejected, PolicyRejected) and len(rejected.errors) >= 3
        dry = await _apply(operator, PolicyApplyRequest(text=GOOD, dry_run=True))
        assert isinstance(dry, PolicyAccepted) and dry.version == 0
        after = stored_policy.decode((await kv.get("emojivoto.voting")).value or b"")
        assert after.version == second.version  # neither the bad one nor the dry run stored

        # a malformed request gets a typed error reply, and the service keeps serving
        msg = await operator.request(names.POLICY_APPLY, b'{"text": 5', timeout=5)
        assert msg.headers is not None and msg.headers["Nats-Service-Error-Code"] == "400"
        error: ErrorReply = Decoder(ErrorReply, "").decode(msg.data)
        assert error.code == "bad_request" and names.POLICY_APPLY in error.message
        again = await _apply(operator, PolicyApplyRequest(text=GOOD))
        assert isinstance(again, PolicyAccepted)
    seen = []
    while True:
        try:
            seen.append((await events.next_msg(timeout=0.5)).data)
        except Exception:
            break
    assert any(b"policy_applied" in m for m in seen) and any(b"policy_rejected" in m for m in seen)
    await events.unsubscribe()
