"""Identity material on disk: what ``shoal identity init`` writes, what the identity
service reads, and the rotation steps of the issuer and the trust anchor.

Two directories, so that the running control plane never needs the anchor's key:

- the identity directory (default ``<state>/identity``; a Kubernetes Secret in a
  cluster) holds what the identity service needs: the issuer certificate and key, the
  trust bundle (the anchors proxies must trust), the join-token signing key, and
  ``identity.json`` (trust domain, control-plane namespace, leaf lifetime);
- the anchor directory (default ``<state>/identity-anchor``) holds the anchor's key,
  needed only to sign a new issuer. Outside a laptop, move it offline after ``init``
  and bring it back only for ``rotate-issuer`` and ``rotate-anchor``.

Files are written whole and atomically (temporary file + rename) with private keys 0600
in 0700 directories, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from . import pki, tokens

IDENTITY_DIR_NAME = "identity"
ANCHOR_DIR_NAME = "identity-anchor"

SETTINGS_FILE = "identity.json"
ISSUER_CERT_FILE = "issuer.crt"  # the issuer first, then any intermediates up to an anchor
ISSUER_KEY_FILE = "issuer.key"
TRUST_BUNDLE_FILE = "trust-bundle.pem"
TOKEN_KEY_FILE = "token-signing.key"
SERVICE_FILES = (SETTINGS_FILE, ISSUER_CERT_FILE, ISSUER_KEY_FILE, TRUST_BUNDLE_FILE,
                 TOKEN_KEY_FILE)

ANCHOR_CERT_FILE = "anchor.crt"
ANCHOR_KEY_FILE = "anchor.key"
NEXT_ANCHOR_CERT_FILE = "anchor-next.crt"
NEXT_ANCHOR_KEY_FILE = "anchor-next.key"
ROTATION_FILE = "rotation.json"
RETIRED_DIR = "retired"

MAX_MATERIAL_FILE_BYTES = 1024 * 1024  # PEM files are a few KiB; refuse anything huge


class IdentityMaterialError(RuntimeError):
    """Identity material missing, unreadable or inconsistent; says which file and why."""


class IdentitySettings(msgspec.Struct, frozen=True, kw_only=True):
    """``identity.json``: the mesh's naming and the default leaf lifetime."""

    trust_domain: str = pki.DEFAULT_TRUST_DOMAIN
    control_plane_namespace: str = pki.DEFAULT_CONTROL_PLANE_NAMESPACE
    leaf_lifetime_seconds: float = pki.DEFAULT_LEAF_LIFETIME.total_seconds()
    created_at: float = 0.0

    @property
    def scheme(self) -> pki.NameScheme:
        return pki.NameScheme(self.control_plane_namespace, self.trust_domain)


RotationPhase = Literal["anchor_added", "issuer_replaced"]


class RotationState(msgspec.Struct, frozen=True, kw_only=True):
    """``rotation.json`` in the anchor directory while an anchor rotation is under way."""

    phase: RotationPhase
    new_anchor_fingerprint: str
    anchor_added_at: float
    issuer_replaced_at: float = 0.0


def default_identity_dir(state_dir: Path) -> Path:
    return state_dir / IDENTITY_DIR_NAME


def default_anchor_dir(state_dir: Path) -> Path:
    return state_dir / ANCHOR_DIR_NAME


# --- files ----------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MATERIAL_FILE_BYTES + 1)
    except FileNotFoundError:
        raise IdentityMaterialError(f"{path} is missing") from None
    except OSError as error:
        raise IdentityMaterialError(f"{path}: {error.strerror or error}") from None
    if len(data) > MAX_MATERIAL_FILE_BYTES:
        raise IdentityMaterialError(f"{path} is over {MAX_MATERIAL_FILE_BYTES} bytes")
    return data


def _certs(path: Path) -> list[x509.Certificate]:
    try:
        return pki.certs_from_pem(_read(path))
    except pki.PkiError as error:
        raise IdentityMaterialError(f"{path}: {error}") from None


def _key(path: Path) -> EllipticCurvePrivateKey:
    try:
        return pki.key_from_pem(_read(path))
    except pki.PkiError as error:
        raise IdentityMaterialError(f"{path}: {error}") from None


def _write_certified(directory: Path, cert_file: str, key_file: str,
                     pair: pki.CertifiedKey, chain: tuple[x509.Certificate, ...] = ()) -> None:
    # Key first: a reader that sees the new certificate with the old key refuses the pair
    # (the key does not match) and tries again, never signing with a mismatched pair.
    _write(directory / key_file, pki.key_to_pem(pair.key), 0o600)
    _write(directory / cert_file, pki.bundle_pem((pair.cert, *chain)).encode())


def read_settings(identity_dir: Path) -> IdentitySettings:
    path = identity_dir / SETTINGS_FILE
    try:
        settings = msgspec.json.decode(_read(path), type=IdentitySettings)
        settings.scheme  # noqa: B018  (validates the names)
    except (msgspec.DecodeError, pki.PkiError) as error:
        raise IdentityMaterialError(f"{path}: {error}") from None
    return settings


def read_bundle(identity_dir: Path) -> list[x509.Certificate]:
    return _certs(identity_dir / TRUST_BUNDLE_FILE)


def write_bundle(identity_dir: Path, anchors: list[x509.Certificate]) -> None:
    _write(identity_dir / TRUST_BUNDLE_FILE, pki.bundle_pem(anchors).encode())


def bundle_mtime(identity_dir: Path) -> float:
    try:
        return (identity_dir / TRUST_BUNDLE_FILE).stat().st_mtime
    except OSError:
        return 0.0


def material_exists(identity_dir: Path) -> bool:
    return (identity_dir / ISSUER_KEY_FILE).exists()


def material_version(identity_dir: Path) -> str:
    """A cheap token that changes whenever a service file changes (size, mtime, inode),
    so the service can poll for rotations without re-reading keys."""
    digest = hashlib.sha256()
    for name in SERVICE_FILES:
        try:
            st = (identity_dir / name).stat()
            digest.update(f"{name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            digest.update(f"{name}:missing;".encode())
    return digest.hexdigest()


# --- what the identity service loads -------------------------------------------------------


@dataclass(frozen=True)
class ServiceMaterial:
    settings: IdentitySettings
    issuer: pki.Issuer
    anchors: tuple[x509.Certificate, ...]
    bundle_pem: str
    bundle_mtime: float
    token_keys: dict[str, Ed25519PublicKey]
    version: str


def load_service_material(identity_dir: Path, now: dt.datetime) -> ServiceMaterial:
    """Everything the identity service needs, checked for consistency: the issuer key
    matches its certificate, the issuer is valid now and signed by an anchor of the
    bundle. Raises ``IdentityMaterialError`` saying what is wrong and where."""
    version = material_version(identity_dir)
    if not identity_dir.is_dir():
        raise IdentityMaterialError(
            f"{identity_dir} does not exist: create it with `shoal identity init`")
    settings = read_settings(identity_dir)
    chain = _certs(identity_dir / ISSUER_CERT_FILE)
    key = _key(identity_dir / ISSUER_KEY_FILE)
    anchors = read_bundle(identity_dir)
    try:
        issuer = pki.Issuer(pki.CertifiedKey(cert=chain[0], key=key), chain[1:])
    except pki.PkiError as error:
        raise IdentityMaterialError(f"{identity_dir}: {error}") from None
    top = chain[-1]
    try:
        if len(chain) == 1:
            pki.verify_issuer(top, anchors, now)
        elif not any(pki.is_signed_by(top, anchor) for anchor in anchors):
            raise pki.ChainInvalid("the issuer chain does not end at an anchor of the bundle")
    except pki.ChainInvalid as error:
        raise IdentityMaterialError(f"{identity_dir / ISSUER_CERT_FILE}: {error}") from None
    try:
        signing_key = tokens.signing_key_from_pem(_read(identity_dir / TOKEN_KEY_FILE))
    except ValueError as error:
        raise IdentityMaterialError(f"{identity_dir / TOKEN_KEY_FILE}: {error}") from None
    public = signing_key.public_key()
    return ServiceMaterial(
        settings=settings, issuer=issuer, anchors=tuple(anchors),
        bundle_pem=pki.bundle_pem(anchors), bundle_mtime=bundle_mtime(identity_dir),
        token_keys={tokens.key_id(public): public}, version=version)


def load_signing_key(identity_dir: Path) -> Ed25519PrivateKey:
    path = identity_dir / TOKEN_KEY_FILE
    try:
        return tokens.signing_key_from_pem(_read(path))
    except ValueError as error:
        raise IdentityMaterialError(f"{path}: {error}") from None


@dataclass(frozen=True)
class MintedToken:
    token: str
    identity: str  # the identity name the token vouches for
    expires_at: float  # unix seconds


def mint_join_token(identity_dir: Path, namespace: str, serviceaccount: str,
                    ttl_seconds: float = tokens.DEFAULT_TOKEN_TTL_SECONDS,
                    now: float | None = None) -> MintedToken:
    """A join token for ``serviceaccount`` in ``namespace``, signed with the identity
    directory's token key: what ``shoal identity token`` prints, for code that starts
    proxies (``shoal run``, tests, benchmarks) and hands them the token in
    ``SHOAL_PROXY_IDENTITY_TOKEN``. Raises ``IdentityMaterialError`` (no material, say),
    ``pki.InvalidIdentityName`` or ``ValueError`` (a lifetime that is not positive)."""
    settings = read_settings(identity_dir)
    identity = settings.scheme.identity(serviceaccount, namespace)
    key = load_signing_key(identity_dir)
    issued = time.time() if now is None else now
    token = tokens.mint(key, namespace, serviceaccount, ttl_seconds, issued)
    return MintedToken(token=token, identity=identity, expires_at=issued + ttl_seconds)


def load_anchor(anchor_dir: Path, next_anchor: bool = False) -> pki.CertifiedKey:
    cert_file, key_file = ((NEXT_ANCHOR_CERT_FILE, NEXT_ANCHOR_KEY_FILE) if next_anchor
                           else (ANCHOR_CERT_FILE, ANCHOR_KEY_FILE))
    if not (anchor_dir / key_file).exists():
        raise IdentityMaterialError(
            f"the trust anchor key is not in {anchor_dir} ({key_file} missing): bring it "
            "back from where you keep it offline, or pass --anchor-dir")
    pair = pki.CertifiedKey(cert=_certs(anchor_dir / cert_file)[0],
                            key=_key(anchor_dir / key_file))
    if not pki.key_matches(pair.cert, pair.key):
        raise IdentityMaterialError(f"{anchor_dir}: {key_file} does not belong to {cert_file}")
    return pair


# --- init and rotations --------------------------------------------------------------------


@dataclass(frozen=True)
class InitResult:
    anchor: pki.CertSummary
    issuer: pki.CertSummary
    identity_dir: Path
    anchor_dir: Path


def init_identity(identity_dir: Path, anchor_dir: Path, settings: IdentitySettings,
                  anchor_days: int, issuer_days: int, now: dt.datetime,
                  force: bool = False) -> InitResult:
    """A new trust anchor, an issuer under it, a token signing key, and the settings."""
    if material_exists(identity_dir) and not force:
        raise IdentityMaterialError(
            f"identity material already exists in {identity_dir}; rotate it with `shoal "
            "identity rotate-issuer` / `rotate-anchor`, or pass --force to start over "
            "(every proxy will then need new certificates)")
    scheme = settings.scheme
    try:
        anchor = pki.make_anchor(scheme, anchor_days, now)
        issuer = pki.make_issuer(scheme, anchor, issuer_days, now)
    except pki.PkiError as error:
        raise IdentityMaterialError(str(error)) from None
    for directory in (identity_dir, anchor_dir):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
    _write_certified(anchor_dir, ANCHOR_CERT_FILE, ANCHOR_KEY_FILE, anchor)
    (anchor_dir / ROTATION_FILE).unlink(missing_ok=True)
    _write(identity_dir / TOKEN_KEY_FILE,
           tokens.signing_key_to_pem(tokens.generate_signing_key()), 0o600)
    write_bundle(identity_dir, [anchor.cert])
    _write_certified(identity_dir, ISSUER_CERT_FILE, ISSUER_KEY_FILE, issuer)
    stamped = msgspec.structs.replace(settings, created_at=now.timestamp())
    _write(identity_dir / SETTINGS_FILE, msgspec.json.format(msgspec.json.encode(stamped)))
    return InitResult(anchor=pki.summarize(anchor.cert), issuer=pki.summarize(issuer.cert),
                      identity_dir=identity_dir, anchor_dir=anchor_dir)


def rotate_issuer(identity_dir: Path, anchor_dir: Path, issuer_days: int,
                  now: dt.datetime, next_anchor: bool | None = None) -> pki.CertSummary:
    """A new issuer signed by the current anchor (or, once an anchor rotation has moved
    the issuer to the new anchor, by the new one). Leaves signed by the old issuer stay
    valid: peers verify them up to the same anchor, with the old issuer sent along in
    each handshake."""
    settings = read_settings(identity_dir)
    if next_anchor is None:
        state = read_rotation(anchor_dir)
        next_anchor = state is not None and state.phase == "issuer_replaced"
    anchor = load_anchor(anchor_dir, next_anchor=next_anchor)
    if not any(pki.fingerprint(a) == pki.fingerprint(anchor.cert)
               for a in read_bundle(identity_dir)):
        raise IdentityMaterialError(
            "the anchor that would sign the new issuer is not in the trust bundle yet; "
            "proxies would refuse its leaves")
    try:
        issuer = pki.make_issuer(settings.scheme, anchor, issuer_days, now)
    except pki.PkiError as error:
        raise IdentityMaterialError(str(error)) from None
    _write_certified(identity_dir, ISSUER_CERT_FILE, ISSUER_KEY_FILE, issuer)
    return pki.summarize(issuer.cert)


def read_rotation(anchor_dir: Path) -> RotationState | None:
    path = anchor_dir / ROTATION_FILE
    if not path.exists():
        return None
    try:
        return msgspec.json.decode(_read(path), type=RotationState)
    except msgspec.DecodeError as error:
        raise IdentityMaterialError(f"{path}: {error}") from None


def _write_rotation(anchor_dir: Path, state: RotationState) -> None:
    _write(anchor_dir / ROTATION_FILE, msgspec.json.format(msgspec.json.encode(state)))


def rotate_anchor_add(identity_dir: Path, anchor_dir: Path, anchor_days: int,
                      now: dt.datetime) -> pki.CertSummary:
    """Step 1: a new anchor, added to the trust bundle beside the current one."""
    if read_rotation(anchor_dir) is not None:
        raise IdentityMaterialError("an anchor rotation is already under way; see `shoal "
                                    "identity rotate-anchor` for the next step")
    settings = read_settings(identity_dir)
    # The old anchor's key is not needed to rotate away from it (it may be lost: a reason
    # to rotate); its certificate is kept in the bundle until step 3.
    current = (_certs(anchor_dir / ANCHOR_CERT_FILE)[0]
               if (anchor_dir / ANCHOR_CERT_FILE).exists() else None)
    try:
        new = pki.make_anchor(settings.scheme, anchor_days, now)
    except pki.PkiError as error:
        raise IdentityMaterialError(str(error)) from None
    _write_certified(anchor_dir, NEXT_ANCHOR_CERT_FILE, NEXT_ANCHOR_KEY_FILE, new)
    bundle = [a for a in read_bundle(identity_dir)
              if pki.fingerprint(a) != pki.fingerprint(new.cert)]
    if current is not None and not any(
            pki.fingerprint(a) == pki.fingerprint(current) for a in bundle):
        bundle.insert(0, current)
    write_bundle(identity_dir, [*bundle, new.cert])
    _write_rotation(anchor_dir, RotationState(
        phase="anchor_added", new_anchor_fingerprint=pki.fingerprint(new.cert),
        anchor_added_at=now.timestamp()))
    return pki.summarize(new.cert)


def rotate_anchor_issuer(identity_dir: Path, anchor_dir: Path, issuer_days: int,
                         now: dt.datetime) -> pki.CertSummary:
    """Step 2: a new issuer signed by the new anchor; proxies move to it as they renew."""
    state = read_rotation(anchor_dir)
    if state is None:
        raise IdentityMaterialError("no anchor rotation under way: start with --step add")
    summary = rotate_issuer(identity_dir, anchor_dir, issuer_days, now, next_anchor=True)
    _write_rotation(anchor_dir, msgspec.structs.replace(
        state, phase="issuer_replaced", issuer_replaced_at=now.timestamp()))
    return summary


def rotate_anchor_remove(identity_dir: Path, anchor_dir: Path, now: dt.datetime,
                         force: bool = False) -> pki.CertSummary:
    """Step 3: the old anchor leaves the bundle; the new one becomes the anchor.

    Refused until one leaf lifetime has passed since step 2 (every proxy has renewed
    under the new issuer by then), unless ``force``."""
    state = read_rotation(anchor_dir)
    if state is None or state.phase != "issuer_replaced":
        raise IdentityMaterialError(
            "the old anchor can only be removed after --step issuer (proxies still hold "
            "leaves that chain to it)")
    settings = read_settings(identity_dir)
    waited = now.timestamp() - state.issuer_replaced_at
    if waited < settings.leaf_lifetime_seconds and not force:
        left = settings.leaf_lifetime_seconds - waited
        raise IdentityMaterialError(
            f"only {waited:.0f} s since the new issuer; leaves from the old one may live "
            f"{left:.0f} s more. Wait (or restart every proxy) and run this again, or pass "
            "--force")
    new = load_anchor(anchor_dir, next_anchor=True)
    # The bundle keeps the new anchor and any other anchor the operator added on purpose;
    # the one that goes is the anchor being replaced (every other one, if its
    # certificate is not at hand).
    keep = {pki.fingerprint(new.cert)}
    if not (anchor_dir / ANCHOR_CERT_FILE).exists():
        old_fingerprints = {pki.fingerprint(a) for a in read_bundle(identity_dir)} - keep
    else:
        old_fingerprints = {pki.fingerprint(_certs(anchor_dir / ANCHOR_CERT_FILE)[0])} - keep
    write_bundle(identity_dir, [a for a in read_bundle(identity_dir)
                                if pki.fingerprint(a) not in old_fingerprints])
    retired = anchor_dir / RETIRED_DIR
    retired.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now.timestamp()))
    for name in (ANCHOR_CERT_FILE, ANCHOR_KEY_FILE):
        if (anchor_dir / name).exists():
            os.replace(anchor_dir / name, retired / f"{stamp}-{name}")
    _write_certified(anchor_dir, ANCHOR_CERT_FILE, ANCHOR_KEY_FILE, new)
    for name in (NEXT_ANCHOR_CERT_FILE, NEXT_ANCHOR_KEY_FILE, ROTATION_FILE):
        (anchor_dir / name).unlink(missing_ok=True)
    return pki.summarize(new.cert)
