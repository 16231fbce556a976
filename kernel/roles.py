"""NATS users per role and what each may publish and subscribe to (DESIGN.md, "Security
on the bus"). The embedded server's configuration is generated from this table, and a
NATS cluster run by the operator uses the same lists (docs/operations.md).

A proxy reads every bucket, publishes metrics, tap events and registrations, and asks
for certificates; it can never write endpoints, policy or trust, nor call policy apply.
A controller (a control-plane service) writes state but may not call policy apply; only
an operator may.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shoal.schemas import names

Role = Literal["proxy", "controller", "operator"]
ROLES: tuple[Role, ...] = ("proxy", "controller", "operator")


def _kv_read(bucket: str) -> list[str]:
    """The JetStream API subjects behind `key_value()`, `get()` and `watch()` of a bucket."""
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
    ]


@dataclass(frozen=True)
class Permissions:
    publish_allow: tuple[str, ...]
    publish_deny: tuple[str, ...]
    subscribe_allow: tuple[str, ...]
    subscribe_deny: tuple[str, ...] = ()


_PROXY = Permissions(
    publish_allow=(
        "$JS.API.INFO",
        *[subject for bucket in names.ALL_BUCKETS for subject in _kv_read(bucket)],
        names.METRICS_REPORTS_ALL,
        names.TAP_ALL,
        names.REGISTER,
        names.IDENTITY_CERTIFY,
    ),
    publish_deny=(
        "$KV.>",
        names.POLICY_APPLY,
        names.METRICS_QUERY,
        names.EVENTS_ALL,
        "$JS.API.STREAM.CREATE.>",
        "$JS.API.STREAM.UPDATE.>",
        "$JS.API.STREAM.DELETE.>",
        "$JS.API.STREAM.PURGE.>",
    ),
    subscribe_allow=("_INBOX.>",),
)

_CONTROLLER = Permissions(
    publish_allow=("shoal.>", "$KV.>", "$JS.>", "$SRV.>", "_INBOX.>"),
    publish_deny=(names.POLICY_APPLY,),
    subscribe_allow=("shoal.>", "$KV.>", "$SRV.>", "_INBOX.>"),
)

_OPERATOR = Permissions(
    publish_allow=(">",),
    publish_deny=(),
    subscribe_allow=(">",),
)

PERMISSIONS: dict[Role, Permissions] = {
    "proxy": _PROXY,
    "controller": _CONTROLLER,
    "operator": _OPERATOR,
}
