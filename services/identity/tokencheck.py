"""Bootstrap tokens: who does this token vouch for, and is it the identity requested?

Two kinds, told apart by their prefix: Shoal join tokens (``shoal-jt1.``; checked here
with the public keys of the identity directory) and Kubernetes service account tokens
(anything else; checked by a ``TokenReviewer``, when one is configured). Both end in a
``TokenVerdict``: accepted with the namespace and service account, or refused with the
``CertifyRefused`` code and a reason the proxy can log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shoal.kernel import tokens
from shoal.kernel.pki import WorkloadIdentity
from shoal.schemas.identity import CertifyRefusalCode

AUDIENCE = "identity.shoal.io"  # Linkerd uses identity.l5d.io
SERVICE_ACCOUNT_USER_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class TokenAccepted:
    namespace: str
    serviceaccount: str
    kind: str  # "join" or "kubernetes"


@dataclass(frozen=True)
class TokenRefused:
    code: CertifyRefusalCode
    reason: str


TokenVerdict = TokenAccepted | TokenRefused


@dataclass(frozen=True)
class ReviewOutcome:
    """What the Kubernetes API said about a token (TokenReview ``status``)."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""


class ReviewUnavailable(Exception):
    """The API server could not be asked (down, timeout, forbidden): not the token's fault."""


class TokenReviewer(Protocol):
    async def review(self, token: str) -> ReviewOutcome: ...


def judge_review(outcome: ReviewOutcome, wanted: WorkloadIdentity,
                 audience: str = AUDIENCE) -> TokenVerdict:
    """Plain rules over a TokenReview answer."""
    if not outcome.authenticated:
        why = outcome.error or "not authenticated"
        return TokenRefused("invalid_token", f"service account token rejected by the "
                            f"Kubernetes API: {why}")
    if outcome.audiences and audience not in outcome.audiences:
        return TokenRefused("invalid_token", f"service account token is not for audience "
                            f"{audience!r} (it is for {', '.join(outcome.audiences)})")
    if not outcome.username.startswith(SERVICE_ACCOUNT_USER_PREFIX):
        return TokenRefused("invalid_token", f"token belongs to {outcome.username!r}, not "
                            "to a service account")
    namespace, _, serviceaccount = outcome.username[
        len(SERVICE_ACCOUNT_USER_PREFIX):].partition(":")
    if (namespace, serviceaccount) != (wanted.namespace, wanted.serviceaccount):
        return TokenRefused("token_identity_mismatch", f"token is for service account "
                            f"{serviceaccount!r} in {namespace!r}, but the request is for "
                            f"{wanted.name!r}")
    return TokenAccepted(namespace=namespace, serviceaccount=serviceaccount,
                         kind="kubernetes")


def judge_join_token(token: str, keys: Mapping[str, Ed25519PublicKey],
                     wanted: WorkloadIdentity, now: float) -> TokenVerdict:
    result = tokens.verify(token, keys, now, wanted.namespace, wanted.serviceaccount)
    if isinstance(result, tokens.TokenRejected):
        code: CertifyRefusalCode = ("token_identity_mismatch"
                                    if result.reason == "wrong_identity" else "invalid_token")
        return TokenRefused(code, str(result))
    return TokenAccepted(namespace=result.ns, serviceaccount=result.sa, kind="join")


class BootstrapTokens:
    """Join tokens always; service account tokens when a reviewer is configured."""

    def __init__(self, keys: Callable[[], Mapping[str, Ed25519PublicKey]],
                 reviewer: TokenReviewer | None = None, audience: str = AUDIENCE) -> None:
        self._keys = keys  # read at each check: the keys reload with the identity files
        self.reviewer = reviewer
        self.audience = audience

    async def check(self, token: str, wanted: WorkloadIdentity, now: float) -> TokenVerdict:
        if not token:
            return TokenRefused("invalid_token", "no token in the request")
        if tokens.is_join_token(token):
            return judge_join_token(token, self._keys(), wanted, now)
        if self.reviewer is None:
            return TokenRefused("invalid_token", "not a Shoal join token, and this identity "
                                "service does not check Kubernetes service account tokens "
                                "(start it with --token-review)")
        if len(token) > tokens.MAX_TOKEN_BYTES * 4:  # projected tokens are ~1 KiB
            return TokenRefused("invalid_token", f"token is {len(token)} bytes long")
        try:
            outcome = await self.reviewer.review(token)
        except ReviewUnavailable as error:
            return TokenRefused("unavailable", f"cannot check the service account token: "
                                f"{error}")
        return judge_review(outcome, wanted, self.audience)
