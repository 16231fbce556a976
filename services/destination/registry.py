"""Registrations -> endpoint sets, as plain code over plain values.

Each instance is known by (namespace, service, address, port). A heartbeat refreshes it,
a deregistration removes it at once, and ``expire`` drops those whose heartbeats stopped.
Every method returns the service keys whose endpoint set changed, so the caller writes
only those.

A replica that starts late (or restarts) seeds itself from the bucket with ``adopt``:
adopted instances get one TTL to heartbeat before they are dropped, so a new replica
never empties a service it simply has not heard from yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.schemas import names
from shoal.schemas.endpoints import (
    LABEL_POD,
    LABEL_WORKLOAD,
    Deregistration,
    Endpoint,
    EndpointSet,
    Registration,
)

ADOPTED_TTL_SECONDS = 15.0
MAX_INSTANCES_PER_SERVICE = 10_000  # a bound on memory per key; further ones are refused


@dataclass
class Instance:
    endpoint: Endpoint
    last_seen: float
    ttl: float


InstanceKey = tuple[str, int]


class Registry:
    def __init__(self) -> None:
        self._services: dict[str, dict[InstanceKey, Instance]] = {}

    def keys(self) -> list[str]:
        return sorted(self._services)

    def register(self, reg: Registration, now: float) -> list[str]:
        key = names.service_key(reg.namespace, reg.service)
        instances = self._services.setdefault(key, {})
        endpoint = Endpoint(
            address=reg.address, port=reg.port, identity=reg.identity, weight=reg.weight,
            zone=reg.zone, protocol_hint=reg.protocol_hint,
            labels={LABEL_POD: reg.pod, LABEL_WORKLOAD: reg.workload},
        )
        instance_key = (reg.address, reg.port)
        existing = instances.get(instance_key)
        if existing is None and len(instances) >= MAX_INSTANCES_PER_SERVICE:
            return []
        instances[instance_key] = Instance(endpoint, now, reg.ttl_seconds)
        if existing is not None and existing.endpoint == endpoint:
            return []
        return [key]

    def deregister(self, dereg: Deregistration) -> list[str]:
        key = names.service_key(dereg.namespace, dereg.service)
        instances = self._services.get(key)
        if not instances or instances.pop((dereg.address, dereg.port), None) is None:
            return []
        return [key]

    def adopt(self, endpoints: EndpointSet, now: float) -> None:
        key = names.service_key(endpoints.namespace, endpoints.service)
        instances = self._services.setdefault(key, {})
        for endpoint in endpoints.endpoints:
            instances.setdefault((endpoint.address, endpoint.port),
                                 Instance(endpoint, now, ADOPTED_TTL_SECONDS))

    def expire(self, now: float) -> list[str]:
        changed = []
        for key, instances in self._services.items():
            stale = [k for k, inst in instances.items() if now - inst.last_seen > inst.ttl]
            for instance_key in stale:
                del instances[instance_key]
            if stale:
                changed.append(key)
        return changed

    def endpoint_set(self, key: str, now: float) -> EndpointSet:
        namespace, service = names.split_service_key(key)
        instances = self._services.get(key, {})
        endpoints = sorted((inst.endpoint for inst in instances.values()),
                           key=lambda e: (e.address, e.port))
        return EndpointSet(namespace=namespace, service=service, endpoints=endpoints,
                           updated_at=now)


def same_endpoints(a: EndpointSet, b: EndpointSet) -> bool:
    """Equal but for the timestamp: replicas skip writes that would change nothing."""
    return a.endpoints == b.endpoints and (a.namespace, a.service) == (b.namespace, b.service)
