"""Subject and bucket names: Shoal's public API on the bus (see docs/bus-contract.md).

Operators subscribe to these names and publish to them from their own code, so they
change only with a reason written in docs/. Subjects carry the version token ``v1``.
"""

from __future__ import annotations

import re

VERSION = "v1"

# JetStream key-value buckets: state that a late joiner must see whole.
BUCKET_ENDPOINTS = "shoal_endpoints"
BUCKET_POLICY = "shoal_policy"
BUCKET_TRUST = "shoal_trust"
BUCKET_TAP = "shoal_tap"
ALL_BUCKETS = (BUCKET_ENDPOINTS, BUCKET_POLICY, BUCKET_TRUST, BUCKET_TAP)

TRUST_BUNDLE_KEY = "bundle"

# Subjects.
PREFIX = f"shoal.{VERSION}"
IDENTITY_CERTIFY = f"{PREFIX}.identity.certify"
REGISTER = f"{PREFIX}.register"
TAP_PREFIX = f"{PREFIX}.tap"
METRICS_PREFIX = f"{PREFIX}.metrics"
METRICS_QUERY = f"{PREFIX}.metrics.query"
POLICY_APPLY = f"{PREFIX}.policy.apply"
# Tap sessions are opened through the tap service; not under `shoal.v1.tap.>`, so that a
# subscriber to every tap event never sees session requests, and proxies (which may
# publish tap events) cannot open sessions.
TAP_SESSION = f"{PREFIX}.tapctl.session"
EVENTS_PREFIX = f"{PREFIX}.events"

# Wildcards a subscriber uses. Metrics reports have three tokens after the prefix, so
# `shoal.v1.metrics.*.*.*` never matches the query subject `shoal.v1.metrics.query`.
TAP_ALL = f"{TAP_PREFIX}.>"
METRICS_REPORTS_ALL = f"{METRICS_PREFIX}.*.*.*"
EVENTS_ALL = f"{EVENTS_PREFIX}.>"

# Queue groups: replicas of one service share its request subjects.
QUEUE_IDENTITY = "shoal-identity"
QUEUE_DESTINATION = "shoal-destination"
QUEUE_POLICY = "shoal-policy"
QUEUE_METRICS = "shoal-metrics"
QUEUE_TAP = "shoal-tap"

# JetStream stream that keeps the last hour of metrics reports, so a metrics replica that
# starts late replays it and answers like the others (docs/observability.md).
STREAM_METRICS = "SHOAL_METRICS"

_UNSAFE_TOKEN = re.compile(r"[^A-Za-z0-9_\-]")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def subject_token(value: str) -> str:
    """Make one subject token from a name: dots, wildcards and spaces become ``_``.

    Kubernetes pod names may contain dots, which NATS would read as token separators.
    """
    token = _UNSAFE_TOKEN.sub("_", value)
    return token or "_"


def is_dns_label(value: str) -> bool:
    """Namespaces and service names are DNS labels (RFC 1123), as in Kubernetes."""
    return bool(_NAME.match(value))


def service_key(namespace: str, service: str) -> str:
    """The key of a service in ``shoal_endpoints`` and ``shoal_policy``: ``<ns>.<service>``."""
    return f"{namespace}.{service}"


def split_service_key(key: str) -> tuple[str, str]:
    namespace, _, service = key.partition(".")
    return namespace, service


def tap_subject(namespace: str, workload: str, pod: str) -> str:
    return f"{TAP_PREFIX}.{subject_token(namespace)}.{subject_token(workload)}.{subject_token(pod)}"


def metrics_subject(namespace: str, workload: str, pod: str) -> str:
    return (
        f"{METRICS_PREFIX}.{subject_token(namespace)}.{subject_token(workload)}."
        f"{subject_token(pod)}"
    )


def event_subject(kind: str) -> str:
    """Control-plane events: ``shoal.v1.events.<kind>`` (endpoints, certificate, policy)."""
    return f"{EVENTS_PREFIX}.{subject_token(kind)}"
