"""Policy validation as plain code: text in, a document or every error found out.

msgspec stops at the first error, so each top-level field (and each list item) is
converted on its own and the errors are collected; semantic checks that span fields
(unique route names, CIDRs, references between rules and routes) run afterwards.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, get_args, get_origin

import msgspec
import yaml

from shoal.schemas import names
from shoal.schemas.policy import PolicyDocument, PolicyError, PolicyFormat

MAX_DOCUMENT_BYTES = 256 * 1024  # a policy for one service; larger is a mistake
_IDENTITY = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class _Collector:
    def __init__(self) -> None:
        self.errors: list[PolicyError] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(PolicyError(path=path, message=message))


def _msgspec_error(path: str, error: msgspec.ValidationError) -> tuple[str, str]:
    text = str(error)
    marker = " - at `$"
    if marker in text:
        message, _, rest = text.rpartition(marker)
        return path + rest.rstrip("`"), message
    return path, text


def parse_text(text: str, fmt: PolicyFormat) -> tuple[Any, list[PolicyError]]:
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        message = f"document larger than {MAX_DOCUMENT_BYTES} bytes"
        return None, [PolicyError(path="$", message=message)]
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        return None, [PolicyError(path="$", message=f"not valid {fmt}: {error}")]
    if not isinstance(data, dict):
        return None, [PolicyError(path="$", message="a policy document must be a mapping")]
    return data, []


def validate_document(data: dict[str, Any]) -> tuple[PolicyDocument | None, list[PolicyError]]:
    found = _Collector()
    fields = {f.encode_name: f for f in msgspec.structs.fields(PolicyDocument)}
    for key in data:
        if key not in fields:
            found.add(f"$.{key}", f"unknown field (known: {', '.join(sorted(fields))})")
    for name, info in fields.items():
        if name not in data:
            if info.required:
                found.add(f"$.{name}", "required field missing")
            continue
        value = data[name]
        if get_origin(info.type) is list and isinstance(value, list):
            (item_type,) = get_args(info.type)
            for index, item in enumerate(value):
                _convert(found, f"$.{name}[{index}]", item, item_type)
        else:
            _convert(found, f"$.{name}", value, info.type)
    if found.errors:
        return None, found.errors
    document = msgspec.convert(data, PolicyDocument)
    _check_semantics(found, document)
    return (None, found.errors) if found.errors else (document, [])


def _convert(found: _Collector, path: str, value: Any, target: Any) -> None:
    try:
        msgspec.convert(value, target)
    except msgspec.ValidationError as error:
        found.add(*_msgspec_error(path, error))


def _check_semantics(found: _Collector, doc: PolicyDocument) -> None:
    if not names.is_dns_label(doc.namespace):
        found.add("$.namespace", "must be a DNS label (lowercase letters, digits, '-')")
    if not names.is_dns_label(doc.service):
        found.add("$.service", "must be a DNS label (lowercase letters, digits, '-')")
    route_names: set[str] = set()
    for i, route in enumerate(doc.routes):
        path = f"$.routes[{i}]"
        if route.name in route_names:
            found.add(f"{path}.name", f"duplicate route name {route.name!r}")
        route_names.add(route.name)
        if route.path_prefix and route.path_exact:
            found.add(path, "give path_prefix or path_exact, not both")
        for key, value in (("path_prefix", route.path_prefix), ("path_exact", route.path_exact)):
            if value and not value.startswith("/"):
                found.add(f"{path}.{key}", "must start with '/'")
    for i, rule in enumerate(doc.authorization.rules):
        path = f"$.authorization.rules[{i}]"
        for j, identity in enumerate(rule.identities):
            if identity != "*" and not _IDENTITY.match(identity):
                found.add(f"{path}.identities[{j}]", f"not an identity or wildcard: {identity!r}")
        for key, cidrs in (("networks", rule.networks), ("except_networks", rule.except_networks)):
            for j, cidr in enumerate(cidrs):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    found.add(f"{path}.{key}[{j}]", f"not a CIDR: {cidr!r}")
        for j, route_name in enumerate(rule.routes):
            if route_name not in route_names:
                found.add(f"{path}.routes[{j}]", f"no route named {route_name!r}")
    if doc.traffic_split and sum(b.weight for b in doc.traffic_split) == 0:
        found.add("$.traffic_split", "weights must not all be zero")
    for i, backend in enumerate(doc.traffic_split):
        service = backend.service.split(".")
        if not 1 <= len(service) <= 2 or not all(names.is_dns_label(p) for p in service):
            found.add(f"$.traffic_split[{i}].service", "must be <service> or <service>.<ns>")
    accrual = doc.failure_accrual
    if accrual.min_backoff_ms > accrual.max_backoff_ms:
        found.add("$.failure_accrual", "min_backoff_ms is greater than max_backoff_ms")


def validate_text(text: str, fmt: PolicyFormat) -> tuple[PolicyDocument | None, list[PolicyError]]:
    data, errors = parse_text(text, fmt)
    if errors:
        return None, errors
    return validate_document(data)
