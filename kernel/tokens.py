"""Join tokens: the bootstrap credential of a workload on one machine (where there is no
Kubernetes to vouch for a service account), minted by ``shoal identity token``.

A join token says "whoever holds this may be <serviceaccount> in <namespace> until
<expiry>". It is signed with Ed25519 by a key kept in the identity directory. Ed25519
rather than HMAC: verifying needs only the public key, so a replica (or any other
checker) can verify tokens without being able to mint them, and the key id in the token
lets several keys be accepted while the signing key is rotated.

Format (URL- and header-safe ASCII, ~230 bytes)::

    shoal-jt1.<base64url(JSON claims)>.<base64url(Ed25519 signature of everything before
    the last dot)>

Verification never raises on bad input: it returns a ``TokenRejected`` whose ``reason``
says why (malformed, unknown key, bad signature, expired, not yet valid, wrong identity).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

JOIN_TOKEN_PREFIX = "shoal-jt1"
MAX_TOKEN_BYTES = 4096  # a join token is ~230 bytes; anything far longer is not one
CLOCK_SKEW_SECONDS = 20.0  # as the certificates' NotBefore allowance
DEFAULT_TOKEN_TTL_SECONDS = 30 * 24 * 3600.0  # see docs/identity.md ("Join tokens")

TokenFailure = Literal[
    "malformed",  # not a join token, or its parts do not decode
    "unknown_key",  # signed by a key this checker does not hold
    "bad_signature",  # the signature does not match the claims
    "expired",
    "not_yet_valid",  # issued in the future (beyond the clock-skew allowance)
    "wrong_identity",  # valid, but for another namespace or service account
]


class JoinClaims(msgspec.Struct, frozen=True, kw_only=True):
    """The signed part of a join token (not a bus message: it travels inside one)."""

    ns: str  # namespace
    sa: str  # service account
    iat: float  # issued at, unix seconds
    exp: float  # expires at, unix seconds
    kid: str  # key id: public_key_id() of the signing key
    jti: str = ""  # random id, for audit logs


@dataclass(frozen=True)
class TokenRejected:
    reason: TokenFailure
    detail: str

    def __str__(self) -> str:
        return f"join token {self.reason.replace('_', ' ')}: {self.detail}"


_claims_decoder = msgspec.json.Decoder(JoinClaims)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signing_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def signing_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a PEM private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the token signing key is not an Ed25519 key")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def is_join_token(token: str) -> bool:
    return token.startswith(JOIN_TOKEN_PREFIX + ".")


def mint(key: Ed25519PrivateKey, namespace: str, serviceaccount: str, ttl_seconds: float,
         now: float) -> str:
    """A join token for ``serviceaccount`` in ``namespace``, valid ``ttl_seconds``."""
    if ttl_seconds <= 0:
        raise ValueError("a join token needs a positive lifetime")
    claims = JoinClaims(ns=namespace, sa=serviceaccount, iat=now, exp=now + ttl_seconds,
                        kid=key_id(key.public_key()), jti=secrets.token_hex(8))
    signed = f"{JOIN_TOKEN_PREFIX}.{_b64encode(msgspec.json.encode(claims))}"
    return f"{signed}.{_b64encode(key.sign(signed.encode()))}"


def verify(token: str, keys: Mapping[str, Ed25519PublicKey], now: float,
           namespace: str | None = None,
           serviceaccount: str | None = None) -> JoinClaims | TokenRejected:
    """The claims of a valid token, else the reason it is not. ``keys`` maps key id to
    public key. Given ``namespace``/``serviceaccount``, the token must be for those."""
    if len(token) > MAX_TOKEN_BYTES:
        return TokenRejected("malformed", f"{len(token)} bytes, over {MAX_TOKEN_BYTES}")
    if not is_join_token(token):
        return TokenRejected("malformed", f"does not start with {JOIN_TOKEN_PREFIX}.")
    signed, _, signature_text = token.rpartition(".")
    payload_text = signed[len(JOIN_TOKEN_PREFIX) + 1:]
    try:
        claims = _claims_decoder.decode(_b64decode(payload_text))
        signature = _b64decode(signature_text)
    except (msgspec.DecodeError, binascii.Error, ValueError) as error:
        return TokenRejected("malformed", f"claims do not decode ({error})")
    public_key = keys.get(claims.kid)
    if public_key is None:
        return TokenRejected("unknown_key", f"signed by key {claims.kid!r}, which this "
                             "identity service does not hold (minted for another mesh, or "
                             "the signing key was rotated)")
    try:
        public_key.verify(signature, signed.encode())
    except InvalidSignature:
        return TokenRejected("bad_signature", "the signature does not match the claims")
    if now >= claims.exp:
        return TokenRejected("expired", f"expired {now - claims.exp:.0f} s ago "
                             f"(mint a new one with `shoal identity token`)")
    if claims.iat > now + CLOCK_SKEW_SECONDS:
        return TokenRejected("not_yet_valid", f"issued {claims.iat - now:.0f} s in the "
                             "future (check the clocks)")
    if ((namespace is not None and claims.ns != namespace)
            or (serviceaccount is not None and claims.sa != serviceaccount)):
        return TokenRejected("wrong_identity", f"the token is for service account "
                             f"{claims.sa!r} in namespace {claims.ns!r}, not {serviceaccount!r} "
                             f"in {namespace!r}")
    return claims


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` or plain seconds -> seconds (ValueError if bad)."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    value = text.strip().lower()
    try:
        if value and value[-1] in units:
            seconds = float(value[:-1]) * units[value[-1]]
        else:
            seconds = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (like 30d, 12h, 90m, 45s)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be positive and finite")
    return seconds
