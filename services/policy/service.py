"""Wires validation to the bus: ``shoal.v1.policy.apply`` in, ``shoal_policy`` out.

Versions are per service and strictly increasing; replicas store with compare-and-set
on the key's last revision, so two replicas applying at once never lose an update.
"""

from __future__ import annotations

import logging
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.events import PolicyApplied, PolicyRejectedEvent
from shoal.schemas.policy import (
    PolicyAccepted,
    PolicyApplyReply,
    PolicyApplyRequest,
    PolicyRejected,
    StoredPolicy,
)

from ..runtime import ServiceContext, ServiceRuntime, Unavailable
from .validate import validate_text

log = logging.getLogger("shoal.policy")

CAS_ATTEMPTS = 5  # concurrent applies to one key retry this many times


class PolicyService:
    def __init__(self, replica: str = "policy") -> None:
        self.replica = replica
        self._kv: KeyValue | None = None
        self._ctx: ServiceContext | None = None
        self._stored: Decoder[StoredPolicy] = Decoder(StoredPolicy, names.BUCKET_POLICY)

    def install(self, runtime: ServiceRuntime) -> None:
        runtime.on_setup(self._setup)
        runtime.add_request_handler("apply", names.POLICY_APPLY, PolicyApplyRequest,
                                    self.apply, names.QUEUE_POLICY)

    async def _setup(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._kv = await ctx.js.key_value(names.BUCKET_POLICY)

    async def apply(self, request: PolicyApplyRequest) -> PolicyApplyReply:
        assert self._kv is not None and self._ctx is not None
        document, errors = validate_text(request.text, request.format)
        now = time.time()
        if document is None:
            await self._ctx.nc.publish(names.event_subject("policy"), encode(
                PolicyRejectedEvent(at=now, source=self.replica, error_count=len(errors),
                                    applied_by=request.applied_by)))
            return PolicyRejected(errors=errors)
        if request.dry_run:
            return PolicyAccepted(namespace=document.namespace, service=document.service,
                                  version=0)
        key = names.service_key(document.namespace, document.service)
        for _ in range(CAS_ATTEMPTS):
            version, last_revision = 1, 0
            try:
                entry = await self._kv.get(key)
                last_revision = entry.revision or 0
                if entry.value:
                    version = self._stored.decode(entry.value).version + 1
            except KeyNotFoundError:
                pass
            stored = StoredPolicy(version=version, applied_at=now,
                                  applied_by=request.applied_by, document=document)
            try:
                if last_revision:
                    await self._kv.update(key, encode(stored), last=last_revision)
                else:
                    await self._kv.create(key, encode(stored))
            except KeyWrongLastSequenceError:
                continue
            except Exception as error:
                if "wrong last sequence" in str(error):
                    continue
                raise Unavailable(f"could not store policy: {error}") from None
            log.info("policy %s stored as version %d", key, version)
            await self._ctx.nc.publish(names.event_subject("policy"), encode(
                PolicyApplied(at=now, source=self.replica, namespace=document.namespace,
                              service=document.service, version=version,
                              applied_by=request.applied_by)))
            return PolicyAccepted(namespace=document.namespace, service=document.service,
                                  version=version)
        raise Unavailable(f"policy {key} is being changed concurrently; try again")
