"""The certificate authority's decisions, as plain code: is this a name of our mesh, is
the CSR acceptable, and the signed leaf as a ``CertifyIssued`` reply. No bus, no files:
the clock and the issuer are passed in."""

from __future__ import annotations

import datetime as dt

from shoal.kernel import pki
from shoal.kernel.identity_store import ServiceMaterial
from shoal.schemas.identity import CertifyIssued, CertifyRefused

MIN_LEAF_LIFETIME = dt.timedelta(seconds=1)  # tests use seconds; production uses 24 h


class Authority:
    """One loaded generation of identity material; replaced whole on reload."""

    def __init__(self, material: ServiceMaterial,
                 leaf_lifetime: dt.timedelta | None = None) -> None:
        lifetime = leaf_lifetime or dt.timedelta(
            seconds=material.settings.leaf_lifetime_seconds)
        if lifetime < MIN_LEAF_LIFETIME:
            raise ValueError(f"leaf lifetime {lifetime} is shorter than {MIN_LEAF_LIFETIME}")
        self.material = material
        self.scheme = material.settings.scheme
        self.leaf_lifetime = lifetime

    def workload(self, identity: str) -> pki.WorkloadIdentity | CertifyRefused:
        try:
            return self.scheme.parse(identity)
        except pki.InvalidIdentityName as error:
            return CertifyRefused(code="bad_request", reason=str(error))

    def issue(self, identity: str, csr_pem: str,
              now: dt.datetime) -> CertifyIssued | CertifyRefused:
        """Check the CSR against ``identity`` and sign it (the token is checked before)."""
        try:
            public_key = pki.check_csr(csr_pem, identity)
        except pki.CsrRejected as error:
            return CertifyRefused(code="invalid_csr", reason=str(error))
        try:
            leaf = self.material.issuer.sign(public_key, identity, self.leaf_lifetime, now)
        except pki.PkiError as error:
            return CertifyRefused(code="unavailable", reason=str(error))
        return CertifyIssued(leaf_pem=leaf.leaf_pem,
                             intermediates_pem=list(leaf.intermediates_pem),
                             valid_until=leaf.not_after.timestamp(), serial=leaf.serial)
