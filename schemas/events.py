"""Control-plane events on ``shoal.v1.events.<kind>``: an audit trail and a feed for the
dashboard. Never carries key material or tokens."""

from __future__ import annotations

import msgspec


class _EventBase(msgspec.Struct, frozen=True, kw_only=True):
    at: float  # unix seconds
    source: str  # the service and replica that emitted it


class EndpointsChanged(_EventBase, frozen=True, kw_only=True, tag="endpoints_changed"):
    namespace: str
    service: str
    count: int
    added: list[str] = msgspec.field(default_factory=list)  # "address:port"
    removed: list[str] = msgspec.field(default_factory=list)


class CertificateIssued(_EventBase, frozen=True, kw_only=True, tag="certificate_issued"):
    identity: str
    serial: str
    not_after: float


class CertificateRefused(_EventBase, frozen=True, kw_only=True, tag="certificate_refused"):
    identity: str
    code: str
    reason: str


class PolicyApplied(_EventBase, frozen=True, kw_only=True, tag="policy_applied"):
    namespace: str
    service: str
    version: int
    applied_by: str = ""


class PolicyRejectedEvent(_EventBase, frozen=True, kw_only=True, tag="policy_rejected"):
    error_count: int
    applied_by: str = ""


ControlEvent = (
    EndpointsChanged | CertificateIssued | CertificateRefused | PolicyApplied
    | PolicyRejectedEvent
)

# The <kind> token of each event's subject.
EVENT_KINDS: dict[type[msgspec.Struct], str] = {
    EndpointsChanged: "endpoints",
    CertificateIssued: "identity",
    CertificateRefused: "identity",
    PolicyApplied: "policy",
    PolicyRejectedEvent: "policy",
}
