"""Endpoints: what the destination service publishes and proxies balance over.

``EndpointSet`` is the value under ``shoal_endpoints`` key ``<ns>.<service>``;
``Registration`` and ``Deregistration`` travel on ``shoal.v1.register`` in local mode.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Weight = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
ProtocolHint = Literal["", "http1", "http2", "opaque"]

# Label keys every endpoint carries where known, as Linkerd's dst_* metric labels.
LABEL_POD = "pod"
LABEL_WORKLOAD = "workload"


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One ready endpoint of a service."""

    address: str
    port: Port
    identity: str = ""  # empty: not meshed, so the proxy connects without TLS
    weight: Weight = 100
    zone: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    protocol_hint: ProtocolHint = ""


class EndpointSet(msgspec.Struct, frozen=True, kw_only=True):
    """All ready endpoints of one service, replaced whole on every change."""

    namespace: str
    service: str
    endpoints: list[Endpoint] = msgspec.field(default_factory=list)
    updated_at: float = 0.0  # unix seconds, the writer's clock


class Registration(msgspec.Struct, frozen=True, kw_only=True, tag="register"):
    """"This workload instance serves this port", repeated as a heartbeat.

    The destination service drops an instance when no heartbeat arrives for
    ``ttl_seconds``. Heartbeats are idempotent: a duplicate changes nothing.
    """

    namespace: str
    service: str
    workload: str
    pod: str
    address: str
    port: Port
    identity: str = ""
    protocol_hint: ProtocolHint = ""
    zone: str = ""
    weight: Weight = 100
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 15.0


class Deregistration(msgspec.Struct, frozen=True, kw_only=True, tag="deregister"):
    """Sent by an instance shutting down, before it stops serving."""

    namespace: str
    service: str
    pod: str
    address: str
    port: Port


RegisterMessage = Registration | Deregistration
