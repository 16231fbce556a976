"""The bus contract as data: every subject and bucket, who writes, who reads, and the
message type. docs/bus-contract.md shows the same table; a test keeps the two equal, and
``shoal schema export`` writes the JSON Schema of every message listed here."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from . import names
from .endpoints import EndpointSet, RegisterMessage
from .errors import ErrorReply
from .events import ControlEvent
from .identity import CertifyReply, CertifyRequest, TrustBundle
from .metrics import MetricsAnswer, MetricsQuery, MetricsReport
from .policy import PolicyApplyReply, PolicyApplyRequest, PolicyDocument, StoredPolicy
from .tap import TapEvent, TapSession, TapSessionReply, TapSessionRequest

Kind = Literal["kv", "publish", "request/reply"]


class ContractRow(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: Kind
    writer: str
    readers: str
    message: str  # type names, "request -> reply" for request/reply


CONTRACT: tuple[ContractRow, ...] = (
    ContractRow(name=f"{names.BUCKET_ENDPOINTS} key <ns>.<service>", kind="kv",
                writer="destination", readers="proxies, CLI", message="EndpointSet"),
    ContractRow(name=f"{names.BUCKET_POLICY} key <ns>.<service>", kind="kv",
                writer="policy", readers="proxies, CLI", message="StoredPolicy"),
    ContractRow(name=f"{names.BUCKET_TRUST} key {names.TRUST_BUNDLE_KEY}", kind="kv",
                writer="identity (operator tools on rotation)", readers="proxies",
                message="TrustBundle"),
    ContractRow(name=f"{names.BUCKET_TAP} key <session>", kind="kv",
                writer="tap (operator tools)", readers="proxies", message="TapSession"),
    ContractRow(name=names.IDENTITY_CERTIFY, kind="request/reply", writer="proxies",
                readers="identity", message="CertifyRequest -> CertifyIssued | CertifyRefused"),
    ContractRow(name=names.REGISTER, kind="publish", writer="proxies (local mode)",
                readers="destination", message="Registration | Deregistration"),
    ContractRow(name=f"{names.TAP_PREFIX}.<ns>.<workload>.<pod>", kind="publish",
                writer="proxies", readers="tap, CLI, dashboard, any subscriber",
                message="TapRequestStart | TapResponseStart | TapResponseEnd"),
    ContractRow(name=names.TAP_SESSION, kind="request/reply", writer="CLI, dashboard",
                readers="tap",
                message="TapOpen | TapExtend | TapClose -> TapSessionGranted | "
                        "TapSessionClosed"),
    ContractRow(name=f"{names.METRICS_PREFIX}.<ns>.<workload>.<pod>", kind="publish",
                writer="proxies", readers="metrics", message="MetricsReport"),
    ContractRow(name=names.METRICS_QUERY, kind="request/reply", writer="CLI, dashboard",
                readers="metrics",
                message="StatQuery | TopQuery | EdgesQuery | RoutesQuery -> "
                        "StatAnswer | TopAnswer | EdgesAnswer | RoutesAnswer"),
    ContractRow(name=names.POLICY_APPLY, kind="request/reply", writer="operators",
                readers="policy",
                message="PolicyApplyRequest -> PolicyAccepted | PolicyRejected"),
    ContractRow(name=f"{names.EVENTS_PREFIX}.<kind>", kind="publish",
                writer="every service", readers="audit, dashboard, any subscriber",
                message="EndpointsChanged | CertificateIssued | CertificateRefused | "
                        "PolicyApplied | PolicyRejectedEvent"),
)

# Every exported message type, by the file name of its JSON Schema.
MESSAGE_TYPES: dict[str, Any] = {
    "EndpointSet": EndpointSet,
    "RegisterMessage": RegisterMessage,
    "CertifyRequest": CertifyRequest,
    "CertifyReply": CertifyReply,
    "TrustBundle": TrustBundle,
    "PolicyDocument": PolicyDocument,
    "StoredPolicy": StoredPolicy,
    "PolicyApplyRequest": PolicyApplyRequest,
    "PolicyApplyReply": PolicyApplyReply,
    "TapSession": TapSession,
    "TapEvent": TapEvent,
    "TapSessionRequest": TapSessionRequest,
    "TapSessionReply": TapSessionReply,
    "MetricsReport": MetricsReport,
    "MetricsQuery": MetricsQuery,
    "MetricsAnswer": MetricsAnswer,
    "ControlEvent": ControlEvent,
    "ErrorReply": ErrorReply,
}


def json_schemas() -> dict[str, bytes]:
    """File name -> JSON Schema text (sorted keys, stable across runs)."""
    out: dict[str, bytes] = {}
    for name, message_type in MESSAGE_TYPES.items():
        schema = msgspec.json.schema(message_type)
        schema["title"] = name
        text = msgspec.json.format(msgspec.json.encode(schema, order="sorted"), indent=2)
        out[f"{name}.json"] = text + b"\n"
    return out


def markdown_table() -> str:
    """The contract table as docs/bus-contract.md shows it (a test keeps them equal)."""
    lines = [
        "| name | kind | writer | readers | message |",
        "|---|---|---|---|---|",
    ]
    for row in CONTRACT:
        lines.append(f"| `{row.name}` | {row.kind} | {row.writer} | {row.readers} | "
                     f"{row.message} |")
    return "\n".join(lines) + "\n"
