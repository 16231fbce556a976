"""Policy: the document an operator applies, what is stored, and the apply reply.

A ``PolicyDocument`` covers one service (``<ns>.<service>``): inbound authorization,
routes with timeouts and retries, traffic split, rate limit and failure accrual. The
policy service validates it, stores it under ``shoal_policy`` with a version, and keeps
the bucket's history for rollback. Defaults follow Linkerd's (docs/policy.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PositiveMs = Annotated[int, msgspec.Meta(ge=1, le=3_600_000)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]

DefaultInboundPolicy = Literal[
    "all-unauthenticated",
    "all-authenticated",
    "cluster-authenticated",
    "cluster-unauthenticated",
    "deny",
    "audit",
]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"]
RetryCondition = Literal[
    "5xx", "gateway-error", "cancelled", "deadline-exceeded", "internal",
    "resource-exhausted", "unavailable",
]


class AuthorizationRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Allow clients that match every given condition (Linkerd's AuthorizationPolicy).

    ``identities`` takes exact names or wildcards (``*.emojivoto.serviceaccount...``);
    ``networks`` takes CIDRs; ``except_networks`` carves out of them.
    """

    name: str
    identities: list[str] = msgspec.field(default_factory=list)
    networks: list[str] = msgspec.field(default_factory=list)
    except_networks: list[str] = msgspec.field(default_factory=list)
    ports: list[Annotated[int, msgspec.Meta(ge=1, le=65535)]] = msgspec.field(
        default_factory=list
    )
    routes: list[str] = msgspec.field(default_factory=list)  # route names; empty: all


class Authorization(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    default: DefaultInboundPolicy = "all-unauthenticated"
    rules: list[AuthorizationRule] = msgspec.field(default_factory=list)
    allow_probes: bool = True  # /live, /ready, /healthz: Linkerd allows probes by default


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    limit: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1
    retry_on: list[RetryCondition] = msgspec.field(default_factory=lambda: ["5xx"])
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0, le=16 * 1024 * 1024)] = 64 * 1024
    non_idempotent: bool = False  # retry POST and friends too
    budget_ratio: Fraction = 0.2
    budget_min_per_second: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 10
    budget_ttl_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0


class Route(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An HTTP or gRPC route: matched by path (exact, prefix) and methods."""

    name: str
    path_prefix: str = ""
    path_exact: str = ""
    methods: list[HttpMethod] = msgspec.field(default_factory=list)
    timeout_ms: PositiveMs | None = None
    retries: RetryPolicy | None = None


class SplitBackend(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    service: str  # <service> or <service>.<ns>
    weight: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class RateLimitOverride(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    identities: list[str]
    requests_per_second: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]


class RateLimit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Linkerd's HTTPLocalRateLimitPolicy: GCRA, 1 s tolerance, answers 429."""

    total_rps: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] | None = None
    per_identity_rps: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] | None = None
    overrides: list[RateLimitOverride] = msgspec.field(default_factory=list)


class FailureAccrual(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    consecutive_failures: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 7
    min_backoff_ms: PositiveMs = 1_000
    max_backoff_ms: PositiveMs = 60_000
    jitter: Fraction = 0.5


class PolicyDocument(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What an operator applies for one service. Unknown fields are errors here (a typo
    in a policy must not be silently ignored), unlike bus messages."""

    namespace: str
    service: str
    authorization: Authorization = msgspec.field(default_factory=Authorization)
    routes: list[Route] = msgspec.field(default_factory=list)
    traffic_split: list[SplitBackend] = msgspec.field(default_factory=list)
    rate_limit: RateLimit | None = None
    failure_accrual: FailureAccrual = msgspec.field(default_factory=FailureAccrual)
    opaque_ports: list[Annotated[int, msgspec.Meta(ge=1, le=65535)]] = msgspec.field(
        default_factory=list
    )


class StoredPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The value under ``shoal_policy`` key ``<ns>.<service>``."""

    version: int  # the KV revision it was stored at
    applied_at: float
    applied_by: str
    document: PolicyDocument


PolicyFormat = Literal["yaml", "json"]


class PolicyApplyRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``shoal.v1.policy.apply``: a document as text, so errors can point into it."""

    text: str
    format: PolicyFormat = "yaml"
    applied_by: str = ""
    dry_run: bool = False


class PolicyError(msgspec.Struct, frozen=True, kw_only=True):
    path: str  # $.routes[0].timeout_ms
    message: str


class PolicyAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="accepted"):
    namespace: str
    service: str
    version: int  # 0 on a dry run


class PolicyRejected(msgspec.Struct, frozen=True, kw_only=True, tag="rejected"):
    errors: list[PolicyError]


PolicyApplyReply = PolicyAccepted | PolicyRejected
