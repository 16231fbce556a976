"""Wires the authority to the bus: ``shoal.v1.identity.certify`` in, a reply and an event
out; the trust bundle file into ``shoal_trust``; the identity files polled for rotations.

Refusals are ordinary replies (``CertifyRefused`` with a code and a reason), not service
errors: a refused proxy learns why and retries with backoff. Only a request that does
not decode gets the runtime's ``bad_request`` error reply.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shoal.kernel import pki
from shoal.kernel.identity_store import (
    IdentityMaterialError,
    ServiceMaterial,
    load_service_material,
    material_version,
)
from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.events import CertificateIssued, CertificateRefused
from shoal.schemas.identity import (
    CertifyIssued,
    CertifyRefused,
    CertifyReply,
    CertifyRequest,
    TrustBundle,
)

from ..runtime import ServiceContext, ServiceRuntime
from .authority import Authority
from .tokencheck import BootstrapTokens, TokenRefused, TokenReviewer

log = logging.getLogger("shoal.identity")

RELOAD_INTERVAL_SECONDS = 2.0  # how often the identity files are checked for a rotation
BUNDLE_WRITE_ATTEMPTS = 3  # compare-and-set races with another replica, then give up

Clock = Callable[[], float]


def bundle_of(material: ServiceMaterial, now: float) -> TrustBundle:
    return TrustBundle(anchors_pem=[pki.cert_to_pem(a) for a in material.anchors],
                       trust_domain=material.settings.trust_domain, updated_at=now)


def anchor_fingerprints(pems: list[str]) -> frozenset[str] | None:
    try:
        return frozenset(pki.fingerprint(c) for pem in pems for c in pki.certs_from_pem(pem))
    except pki.PkiError:
        return None


def should_publish(stored: TrustBundle | None, material: ServiceMaterial) -> bool:
    """Write the file's bundle to the bus when the bus has none (or garbage), or when
    they differ and the file is newer than the stored bundle: newer wins, so a replica
    whose files lag behind a rotation never puts the old bundle back."""
    if stored is None:
        return True
    stored_set = anchor_fingerprints(stored.anchors_pem)
    if stored_set is None or not stored_set:
        return True
    if stored_set == frozenset(pki.fingerprint(a) for a in material.anchors):
        return False
    return material.bundle_mtime > stored.updated_at


class IdentityService:
    def __init__(self, identity_dir: Path, material: ServiceMaterial, replica: str = "identity",
                 *, leaf_lifetime: dt.timedelta | None = None,
                 reviewer: TokenReviewer | None = None,
                 reload_interval: float = RELOAD_INTERVAL_SECONDS,
                 clock: Clock = time.time) -> None:
        self.identity_dir = identity_dir
        self.replica = replica
        self.leaf_lifetime = leaf_lifetime
        self.authority = Authority(material, leaf_lifetime)
        self.tokens = BootstrapTokens(lambda: self.authority.material.token_keys, reviewer)
        self.reload_interval = reload_interval
        self.clock = clock
        self.issued = 0
        self.refused = 0
        self._ctx: ServiceContext | None = None
        self._kv: KeyValue | None = None
        self._bundle_decoder: Decoder[TrustBundle] = Decoder(TrustBundle, names.BUCKET_TRUST)
        self._failed_version = ""
        self._bundle_pending = False

    def install(self, runtime: ServiceRuntime) -> None:
        runtime.on_setup(self._setup)
        runtime.add_request_handler("certify", names.IDENTITY_CERTIFY, CertifyRequest,
                                    self.certify, names.QUEUE_IDENTITY)
        runtime.add_task(self._watch_files)

    async def _setup(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._kv = await ctx.js.key_value(names.BUCKET_TRUST)
        await self.publish_bundle()

    # --- certify ---------------------------------------------------------------------------

    async def certify(self, request: CertifyRequest) -> CertifyReply:
        now = self.clock()
        reply = await self._decide(request, now)
        if isinstance(reply, CertifyIssued):
            self.issued += 1
            log.debug("issued %s serial %s", request.identity, reply.serial)
            event: CertificateIssued | CertificateRefused = CertificateIssued(
                at=now, source=self.replica, identity=request.identity, serial=reply.serial,
                not_after=reply.valid_until)
        else:
            self.refused += 1
            log.info("refused %s: %s: %s", request.identity[:200], reply.code, reply.reason)
            event = CertificateRefused(at=now, source=self.replica,
                                       identity=request.identity[:pki.MAX_IDENTITY_LENGTH],
                                       code=reply.code, reason=reply.reason)
        if self._ctx is not None:
            try:
                await self._ctx.nc.publish(names.event_subject("identity"), encode(event))
            except Exception as error:  # the reply matters more than the audit event
                log.warning("could not publish %s event: %s", type(event).__name__, error)
        return reply

    async def _decide(self, request: CertifyRequest, now: float) -> CertifyReply:
        authority = self.authority  # one generation for the whole request
        workload = authority.workload(request.identity)
        if isinstance(workload, CertifyRefused):
            return workload
        verdict = await self.tokens.check(request.token, workload, now)
        if isinstance(verdict, TokenRefused):
            return CertifyRefused(code=verdict.code, reason=verdict.reason)
        return authority.issue(request.identity, request.csr_pem,
                               dt.datetime.fromtimestamp(now, dt.UTC))

    # --- trust bundle ----------------------------------------------------------------------

    async def publish_bundle(self) -> bool:
        """Bring ``shoal_trust`` key ``bundle`` in step with the file (see should_publish)."""
        assert self._kv is not None
        material = self.authority.material
        for _ in range(BUNDLE_WRITE_ATTEMPTS):
            stored: TrustBundle | None = None
            revision = 0
            try:
                entry = await self._kv.get(names.TRUST_BUNDLE_KEY)
                revision = entry.revision or 0
                if entry.value:
                    stored = self._bundle_decoder.decode(entry.value)
            except KeyNotFoundError:
                pass
            except WireDecodeError as error:
                log.warning("replacing malformed trust bundle: %s", error)
            if not should_publish(stored, material):
                return False
            value = encode(bundle_of(material, self.clock()))
            try:
                if revision:
                    await self._kv.update(names.TRUST_BUNDLE_KEY, value, last=revision)
                else:
                    await self._kv.create(names.TRUST_BUNDLE_KEY, value)
            except KeyWrongLastSequenceError:
                continue  # another replica wrote first: look again
            log.info("trust bundle published: %d anchor(s)", len(material.anchors))
            return True
        return False

    # --- rotations -------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the identity files again if they changed; keep the old generation (and
        say why, once) when the new files are not usable yet."""
        version = material_version(self.identity_dir)
        if version in (self.authority.material.version, self._failed_version):
            return False
        try:
            material = load_service_material(self.identity_dir, dt.datetime.now(dt.UTC))
            authority = Authority(material, self.leaf_lifetime)
        except (IdentityMaterialError, ValueError) as error:
            self._failed_version = version
            log.warning("identity files changed but cannot be used yet (keeping the "
                        "current issuer): %s", error)
            return False
        old = self.authority.material.issuer.cert
        self.authority = authority
        self._failed_version = ""
        if pki.fingerprint(old) != pki.fingerprint(material.issuer.cert):
            log.info("issuer reloaded: %s, valid until %s",
                     material.issuer.cert.subject.rfc4514_string(),
                     material.issuer.cert.not_valid_after_utc.isoformat())
        return True

    async def _watch_files(self, ctx: ServiceContext) -> None:
        while not ctx.stopping.is_set():
            try:
                await asyncio.wait_for(ctx.stopping.wait(), self.reload_interval)
            except TimeoutError:
                pass
            if ctx.stopping.is_set():
                return
            if self.reload():
                self._bundle_pending = True
            if self._bundle_pending:
                try:
                    await self.publish_bundle()
                    self._bundle_pending = False
                except Exception as error:  # bus away: retried at the next check
                    log.warning("could not publish the trust bundle: %s", error)
