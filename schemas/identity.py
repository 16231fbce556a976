"""Identity: certificate requests and replies, and the trust bundle.

The proxy makes its own key and sends only a CSR; key material never crosses the bus.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class CertifyRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``shoal.v1.identity.certify`` request: a PEM CSR and a bootstrap token."""

    identity: str  # <sa>.<ns>.serviceaccount.identity.<cp-ns>.<trust-domain>
    token: str  # join token (one machine) or service account token (Kubernetes)
    csr_pem: str


class CertifyIssued(msgspec.Struct, frozen=True, kw_only=True, tag="issued"):
    leaf_pem: str
    intermediates_pem: list[str]
    valid_until: float  # unix seconds (the leaf's NotAfter)
    serial: str = ""  # hex


CertifyRefusalCode = Literal[
    "bad_request",  # the request could not be decoded
    "invalid_token",  # token malformed, wrongly signed or expired
    "token_identity_mismatch",  # token valid, but for another identity
    "invalid_csr",  # CSR unparsable, wrong SANs, wrong key type, bad signature
    "unavailable",  # the issuer is not loaded or a dependency (TokenReview) failed
]


class CertifyRefused(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    """A typed refusal that says why; the proxy logs it and retries with backoff."""

    code: CertifyRefusalCode
    reason: str


CertifyReply = CertifyIssued | CertifyRefused


class TrustBundle(msgspec.Struct, frozen=True, kw_only=True):
    """``shoal_trust`` key ``bundle``: every anchor a proxy must accept right now.

    During an anchor rotation both the old and the new anchor are listed.
    """

    anchors_pem: list[str]
    trust_domain: str = "cluster.local"
    updated_at: float = 0.0
