"""X.509 primitives of Shoal's identity system: names, the trust anchor and issuer, CSRs
and their checks, leaf signing and chain verification. Plain code over plain values (no
files, no sockets); the clock is always passed in.

The hierarchy is Linkerd's: a trust anchor (root, self-signed) signs an issuer
(intermediate, path length 0), the issuer signs 24-hour leaves for workload identities.
Every key is ECDSA P-256 and every signature ECDSA with SHA-256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

# Defaults, from Linkerd (LINKERD-REFERENCE.md "Identity").
DEFAULT_CONTROL_PLANE_NAMESPACE = "shoal"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ANCHOR_DAYS = 365
DEFAULT_ISSUER_DAYS = 365
DEFAULT_LEAF_LIFETIME = dt.timedelta(hours=24)
CLOCK_SKEW = dt.timedelta(seconds=20)  # NotBefore = now - skew, as Linkerd's identity
MAX_CSR_PEM_BYTES = 8 * 1024  # a P-256 CSR with one SAN is ~600 bytes; 8 KiB is generous
MAX_IDENTITY_LENGTH = 253  # a DNS name (RFC 1035 2.3.4)
MAX_COMMON_NAME_LENGTH = 64  # ub-common-name (RFC 5280 appendix A.1)
SIGNATURE_HASH = hashes.SHA256()
IDENTITY_LABEL = "serviceaccount"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class PkiError(ValueError):
    """Bad X.509 input; ``str()`` is a sentence an operator or a proxy log can show."""


class InvalidIdentityName(PkiError):
    pass


class CsrRejected(PkiError):
    """A CSR the issuer will not sign: the requester's fault."""


class ChainInvalid(PkiError):
    """A certificate does not chain to a trusted anchor for the expected name."""


# --- names ------------------------------------------------------------------------------


def _is_dns_name(value: str) -> bool:
    labels = value.split(".")
    return 0 < len(value) <= MAX_IDENTITY_LENGTH and all(_LABEL.match(lb) for lb in labels)


@dataclass(frozen=True)
class NameScheme:
    """How identity names are formed in one mesh: control-plane namespace + trust domain."""

    control_plane_namespace: str = DEFAULT_CONTROL_PLANE_NAMESPACE
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def __post_init__(self) -> None:
        if not _LABEL.match(self.control_plane_namespace):
            raise InvalidIdentityName(
                f"control-plane namespace {self.control_plane_namespace!r} is not a DNS label")
        if not _is_dns_name(self.trust_domain):
            raise InvalidIdentityName(f"trust domain {self.trust_domain!r} is not a DNS name")

    @property
    def suffix(self) -> str:
        return f"{IDENTITY_LABEL}.identity.{self.control_plane_namespace}.{self.trust_domain}"

    def identity(self, serviceaccount: str, namespace: str) -> str:
        """``<sa>.<ns>.serviceaccount.identity.<cp-ns>.<trust-domain>``."""
        name = f"{serviceaccount}.{namespace}.{self.suffix}"
        self.parse(name)  # validates both parts and the length
        return name

    def parse(self, name: str) -> WorkloadIdentity:
        """Split an identity name into service account and namespace, or raise."""
        tail = "." + self.suffix
        if not name.endswith(tail):
            raise InvalidIdentityName(
                f"{name!r} is not an identity of this mesh (expected <sa>.<ns>{tail})")
        if len(name) > MAX_IDENTITY_LENGTH:
            raise InvalidIdentityName(f"{name!r} is longer than {MAX_IDENTITY_LENGTH} bytes")
        # Namespaces are DNS labels, service account names DNS subdomains (Kubernetes):
        # the namespace is the last label before the suffix; the rest is the account.
        head = name[: -len(tail)]
        serviceaccount, _, namespace = head.rpartition(".")
        if not _LABEL.match(namespace):
            raise InvalidIdentityName(f"{name!r}: namespace {namespace!r} is not a DNS label")
        if not serviceaccount or not _is_dns_name(serviceaccount):
            raise InvalidIdentityName(
                f"{name!r}: service account {serviceaccount!r} is not a DNS subdomain")
        return WorkloadIdentity(serviceaccount=serviceaccount, namespace=namespace, name=name)

    def anchor_common_name(self) -> str:
        return f"root.identity.{self.control_plane_namespace}.{self.trust_domain}"

    def issuer_common_name(self) -> str:
        return f"identity.{self.control_plane_namespace}.{self.trust_domain}"


@dataclass(frozen=True)
class WorkloadIdentity:
    serviceaccount: str
    namespace: str
    name: str


# --- keys and PEM -----------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def key_from_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise PkiError(f"not a PEM private key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PkiError("the key is not an ECDSA P-256 key")
    return key


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def certs_from_pem(data: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; raises on garbage or an empty bundle."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as error:
        raise PkiError(f"not a PEM certificate bundle: {error}") from None
    if not certs:
        raise PkiError("the PEM bundle holds no certificate")
    return certs


def bundle_pem(certs: Iterable[x509.Certificate]) -> str:
    return "".join(cert_to_pem(cert) for cert in certs)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, hex: how operators tell two anchors with one name apart."""
    return cert.fingerprint(hashes.SHA256()).hex()


def key_matches(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(der, spki)
                == key.public_key().public_bytes(der, spki))


def public_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


# --- certificate authorities ----------------------------------------------------------------


def _utc(now: dt.datetime) -> dt.datetime:
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _name(common_name: str) -> x509.Name:
    if not common_name or len(common_name) > MAX_COMMON_NAME_LENGTH:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate with its private key (an anchor or an issuer)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_anchor(scheme: NameScheme, days: int, now: dt.datetime) -> CertifiedKey:
    """A self-signed trust anchor (root CA)."""
    if days < 1:
        raise PkiError("the trust anchor must be valid for at least one day")
    now = _utc(now)
    key = generate_key()
    name = _name(scheme.anchor_common_name())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, SIGNATURE_HASH)
    )
    return CertifiedKey(cert=cert, key=key)


def make_issuer(scheme: NameScheme, anchor: CertifiedKey, days: int,
                now: dt.datetime) -> CertifiedKey:
    """An issuer (intermediate CA, path length 0) signed by ``anchor``; its validity is
    cut to the anchor's, since a chain is only as valid as its shortest link."""
    if days < 1:
        raise PkiError("the issuer must be valid for at least one day")
    now = _utc(now)
    key = generate_key()
    not_after = min(now + dt.timedelta(days=days), anchor.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(scheme.issuer_common_name()))
        .issuer_name(anchor.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(_aki_of(anchor.cert), critical=False)
        .sign(anchor.key, SIGNATURE_HASH)
    )
    return CertifiedKey(cert=cert, key=key)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False)


def _aki_of(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key())  # type: ignore[arg-type]


def is_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- CSRs ---------------------------------------------------------------------------------


def build_csr(key: ec.EllipticCurvePrivateKey, identity: str) -> str:
    """The proxy's CSR: exactly one DNS SAN (the identity), CN the identity if it fits."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(identity))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]),
                       critical=len(identity) > MAX_COMMON_NAME_LENGTH)
        .sign(key, SIGNATURE_HASH)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def check_csr(csr_pem: str, identity: str) -> ec.EllipticCurvePublicKey:
    """The rules of Linkerd's identity service; returns the key to certify, or raises
    ``CsrRejected`` with the reason: exactly one SAN, a DNS name equal to ``identity``;
    CN empty or equal; an ECDSA P-256 key; a valid self-signature."""
    if len(csr_pem) > MAX_CSR_PEM_BYTES:
        raise CsrRejected(f"CSR is {len(csr_pem)} bytes, over the {MAX_CSR_PEM_BYTES} limit")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as error:
        raise CsrRejected(f"CSR is not a PEM certificate request: {error}") from None
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError) as error:
        raise CsrRejected(f"CSR public key unreadable: {error}") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        kind = type(public_key).__name__.removeprefix("_").replace("PublicKey", "")
        raise CsrRejected(f"CSR key is {kind or 'unknown'}, must be ECDSA P-256")
    if public_key.curve.name != "secp256r1":
        raise CsrRejected(f"CSR key is ECDSA {public_key.curve.name}, must be P-256")
    if not csr.is_signature_valid:
        raise CsrRejected("CSR signature is not valid (not signed by the key it carries)")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRejected(f"CSR has no subject alternative name; it needs exactly "
                          f"one DNS SAN {identity!r}") from None
    except ValueError as error:  # duplicate or malformed extensions
        raise CsrRejected(f"CSR extensions malformed: {error}") from None
    names = list(sans)
    if len(names) != 1:
        shown = ", ".join(_general_name(name) for name in names)
        raise CsrRejected(f"CSR has {len(names)} SANs ({shown}); it must have exactly one, "
                          f"the DNS name {identity!r}")
    only = names[0]
    if not isinstance(only, x509.DNSName):
        raise CsrRejected(f"CSR SAN is {_general_name(only)}; it must be the DNS name "
                          f"{identity!r}")
    if only.value != identity:
        raise CsrRejected(f"CSR SAN DNS {only.value!r} does not match the requested "
                          f"identity {identity!r}")
    common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    for attribute in common_names:
        if attribute.value not in ("", identity):
            raise CsrRejected(f"CSR common name {attribute.value!r} is neither empty nor "
                              f"the identity {identity!r}")
    return public_key


def _general_name(name: x509.GeneralName) -> str:
    kind = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email",
            x509.UniformResourceIdentifier: "URI"}.get(type(name), type(name).__name__)
    return f"{kind}:{getattr(name, 'value', name)}"


# --- leaves ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedLeaf:
    cert: x509.Certificate
    leaf_pem: str
    intermediates_pem: tuple[str, ...]
    serial: str  # hex
    not_after: dt.datetime


class Issuer:
    """Signs leaves with the issuer key; holds the chain sent along with each leaf."""

    def __init__(self, issuer: CertifiedKey, intermediates: Sequence[x509.Certificate] = ()):
        if not key_matches(issuer.cert, issuer.key):
            raise PkiError("the issuer key does not belong to the issuer certificate")
        self.cert = issuer.cert
        self._key = issuer.key
        self._aki = _aki_of(issuer.cert)
        # What the peer needs to build the chain to an anchor: the issuer, plus any
        # certificates between it and the anchor (none in the default hierarchy).
        self.chain: tuple[x509.Certificate, ...] = (issuer.cert, *intermediates)
        self.chain_pem = tuple(cert_to_pem(cert) for cert in self.chain)

    def sign(self, public_key: ec.EllipticCurvePublicKey, identity: str,
             lifetime: dt.timedelta, now: dt.datetime,
             skew: dt.timedelta = CLOCK_SKEW) -> IssuedLeaf:
        now = _utc(now)
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        if not_after <= now:
            raise PkiError("the issuer certificate has expired: rotate the issuer")
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(identity))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - skew)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            # RFC 5280 4.2.1.6: with an empty subject the SAN must be critical.
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]),
                           critical=len(identity) > MAX_COMMON_NAME_LENGTH)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, SIGNATURE_HASH)
        )
        return IssuedLeaf(cert=cert, leaf_pem=cert_to_pem(cert),
                          intermediates_pem=self.chain_pem,
                          serial=format(cert.serial_number, "x"), not_after=not_after)


# --- reading and verifying certificates --------------------------------------------------


def dns_identity(cert: x509.Certificate) -> str | None:
    """The single DNS SAN of a Shoal certificate, else None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    names = sans.get_values_for_type(x509.DNSName)
    return names[0] if len(names) == 1 else None


@dataclass(frozen=True)
class CertSummary:
    subject: str
    issuer: str
    identity: str | None
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    is_ca: bool


def summarize(cert: x509.Certificate) -> CertSummary:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertSummary(
        subject=cert.subject.rfc4514_string() or "(empty)",
        issuer=cert.issuer.rfc4514_string() or "(empty)",
        identity=dns_identity(cert), serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(cert), is_ca=is_ca)


def verify_leaf(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                anchors: Sequence[x509.Certificate], identity: str,
                now: dt.datetime) -> None:
    """Check ``leaf`` chains to one of ``anchors`` and carries ``identity``, as both a
    server and a client certificate (a Shoal leaf is both). Raises ``ChainInvalid``."""
    if not anchors:
        raise ChainInvalid("no trust anchors to verify against")
    if dns_identity(leaf) != identity:
        raise ChainInvalid(f"certificate identity {dns_identity(leaf)!r} is not {identity!r}")
    builder = PolicyBuilder().store(Store(list(anchors))).time(_utc(now))
    try:
        builder.build_server_verifier(x509.DNSName(identity)).verify(leaf, list(intermediates))
        builder.build_client_verifier().verify(leaf, list(intermediates))
    except VerificationError as error:
        raise ChainInvalid(f"certificate does not verify: {error}") from None


def verify_issuer(issuer: x509.Certificate, anchors: Sequence[x509.Certificate],
                  now: dt.datetime) -> x509.Certificate:
    """The anchor that signed ``issuer`` (which must be a CA valid at ``now``)."""
    now = _utc(now)
    if not issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc:
        raise ChainInvalid(f"the issuer is not valid now (valid "
                           f"{issuer.not_valid_before_utc:%Y-%m-%d} to "
                           f"{issuer.not_valid_after_utc:%Y-%m-%d})")
    for anchor in anchors:
        if anchor.subject == issuer.issuer and is_signed_by(issuer, anchor):
            return anchor
    raise ChainInvalid("the issuer is not signed by any anchor of the trust bundle")
