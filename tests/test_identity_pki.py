"""Identity primitives as plain code: names, CSR checks (forged CSRs of every kind), leaf
signing and chain verification, join tokens, and the proxy client's timing rules."""

from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shoal.kernel import identity_store as store
from shoal.kernel import pki, tokens
from shoal.proxy.identity import (
    IdentityConfig,
    IdentityError,
    accept_issued,
    backoff_delay,
    refresh_delay,
)
from shoal.schemas.identity import CertifyIssued, TrustBundle
from shoal.services.identity.authority import Authority
from shoal.services.identity.service import should_publish
from shoal.services.identity.tokencheck import (
    ReviewOutcome,
    TokenAccepted,
    TokenRefused,
    judge_review,
)

from .identity_support import make_material

SCHEME = pki.NameScheme()
WEB = SCHEME.identity("web", "emojivoto")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def hierarchy() -> tuple[pki.CertifiedKey, pki.CertifiedKey, pki.Issuer]:
    anchor = pki.make_anchor(SCHEME, 365, NOW)
    issuer = pki.make_issuer(SCHEME, anchor, 365, NOW)
    return anchor, issuer, pki.Issuer(issuer)


# --- names -----------------------------------------------------------------------------------


def test_identity_names_follow_linkerd() -> None:
    assert WEB == "web.emojivoto.serviceaccount.identity.shoal.cluster.local"
    other = pki.NameScheme("linkerd", "example.org").identity("db", "prod")
    assert other == "db.prod.serviceaccount.identity.linkerd.example.org"
    parsed = SCHEME.parse("ns-reader.v2.emojivoto.serviceaccount.identity.shoal.cluster.local")
    assert (parsed.serviceaccount, parsed.namespace) == ("ns-reader.v2", "emojivoto")


@pytest.mark.parametrize("name", [
    "web.emojivoto.serviceaccount.identity.linkerd.cluster.local",  # other control plane
    "web.emojivoto.serviceaccount.identity.shoal.example.org",  # other trust domain
    "emojivoto.serviceaccount.identity.shoal.cluster.local",  # no service account
    "web.Emoji_Voto.serviceaccount.identity.shoal.cluster.local",  # not a DNS label
    "a" * 250 + ".ns.serviceaccount.identity.shoal.cluster.local",  # too long
])
def test_foreign_or_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(pki.InvalidIdentityName):
        SCHEME.parse(name)


def test_bad_trust_domain_is_refused() -> None:
    with pytest.raises(pki.InvalidIdentityName, match="trust domain"):
        pki.NameScheme("shoal", "not a domain")


# --- CSRs ------------------------------------------------------------------------------------


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, sans: list[x509.GeneralName],
         common_name: str | None = None) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_a_proper_csr_passes() -> None:
    key = pki.generate_key()
    public = pki.check_csr(pki.build_csr(key, WEB), WEB)
    assert public.public_numbers() == key.public_key().public_numbers()
    assert pki.check_csr(_csr(key, [x509.DNSName(WEB)]), WEB)  # empty CN is fine too


def _flip_signature(csr_pem: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(
        serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature's last INTEGER
    forged = x509.load_der_x509_csr(bytes(der))
    return forged.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("case, reason", [
    ("wrong_san", "does not match the requested identity"),
    ("extra_dns_san", "has 2 SANs"),
    ("ip_san", "has 2 SANs"),
    ("uri_only", "must be the DNS name"),
    ("no_san", "no subject alternative name"),
    ("other_cn", "common name"),
    ("rsa_key", "must be ECDSA P-256"),
    ("p384_key", "must be P-256"),
    ("bad_signature", "signature is not valid"),
    ("garbage", "not a PEM certificate request"),
])
def test_forged_csrs_are_refused_with_the_reason(case: str, reason: str) -> None:
    import ipaddress

    key = pki.generate_key()
    other = SCHEME.identity("voting", "emojivoto")
    csr = {
        "wrong_san": lambda: _csr(key, [x509.DNSName(other)]),
        "extra_dns_san": lambda: _csr(key, [x509.DNSName(WEB), x509.DNSName(other)]),
        "ip_san": lambda: _csr(key, [x509.DNSName(WEB),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        "uri_only": lambda: _csr(key, [x509.UniformResourceIdentifier("spiffe://x/y")]),
        "no_san": lambda: _csr(key, [], WEB),
        "other_cn": lambda: _csr(key, [x509.DNSName(WEB)], "admin"),
        "rsa_key": lambda: _csr(rsa.generate_private_key(65537, 2048), [x509.DNSName(WEB)]),
        "p384_key": lambda: _csr(ec.generate_private_key(ec.SECP384R1()), [x509.DNSName(WEB)]),
        "bad_signature": lambda: _flip_signature(pki.build_csr(key, WEB)),
        "garbage": lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE "
                           "REQUEST-----\n",
    }[case]()
    with pytest.raises(pki.CsrRejected, match=reason):
        pki.check_csr(csr, WEB)


def test_oversized_csr_is_refused() -> None:
    with pytest.raises(pki.CsrRejected, match="over the"):
        pki.check_csr("x" * (pki.MAX_CSR_PEM_BYTES + 1), WEB)


# --- leaves and chains ---------------------------------------------------------------------------


def test_issued_leaf_verifies_against_the_anchor_through_the_issuer(hierarchy) -> None:
    anchor, issuer_pair, issuer = hierarchy
    key = pki.generate_key()
    leaf = issuer.sign(pki.check_csr(pki.build_csr(key, WEB), WEB), WEB,
                       pki.DEFAULT_LEAF_LIFETIME, NOW)
    assert leaf.cert.not_valid_before_utc == NOW - pki.CLOCK_SKEW
    assert leaf.cert.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    assert pki.dns_identity(leaf.cert) == WEB
    assert leaf.intermediates_pem == (pki.cert_to_pem(issuer_pair.cert),)
    pki.verify_leaf(leaf.cert, [issuer_pair.cert], [anchor.cert], WEB, NOW)
    # The chain needs the issuer: the leaf alone does not reach the anchor.
    with pytest.raises(pki.ChainInvalid):
        pki.verify_leaf(leaf.cert, [], [anchor.cert], WEB, NOW)
    # Another anchor does not vouch for it, and it expires.
    stranger = pki.make_anchor(SCHEME, 365, NOW)
    with pytest.raises(pki.ChainInvalid):
        pki.verify_leaf(leaf.cert, [issuer_pair.cert], [stranger.cert], WEB, NOW)
    with pytest.raises(pki.ChainInvalid):
        pki.verify_leaf(leaf.cert, [issuer_pair.cert], [anchor.cert], WEB,
                        NOW + dt.timedelta(hours=25))
    with pytest.raises(pki.ChainInvalid, match="identity"):
        pki.verify_leaf(leaf.cert, [issuer_pair.cert], [anchor.cert],
                        SCHEME.identity("voting", "emojivoto"), NOW)


def test_long_identities_get_an_empty_subject_and_a_critical_san(hierarchy) -> None:
    anchor, issuer_pair, issuer = hierarchy
    long_name = SCHEME.identity("a-rather-long-service-account-name", "emojivoto")
    assert len(long_name) > pki.MAX_COMMON_NAME_LENGTH
    key = pki.generate_key()
    leaf = issuer.sign(pki.check_csr(pki.build_csr(key, long_name), long_name), long_name,
                       pki.DEFAULT_LEAF_LIFETIME, NOW)
    assert len(leaf.cert.subject) == 0
    assert leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    pki.verify_leaf(leaf.cert, [issuer_pair.cert], [anchor.cert], long_name, NOW)


def test_validity_is_cut_to_the_parent(hierarchy) -> None:
    anchor, _, _ = hierarchy
    issuer = pki.make_issuer(SCHEME, anchor, 1000, NOW)
    assert issuer.cert.not_valid_after_utc == anchor.cert.not_valid_after_utc
    short = pki.Issuer(pki.make_issuer(SCHEME, anchor, 1, NOW))
    leaf = short.sign(pki.generate_key().public_key(), WEB, dt.timedelta(days=30), NOW)
    assert leaf.not_after == NOW + dt.timedelta(days=1)
    with pytest.raises(pki.PkiError, match="expired"):
        short.sign(pki.generate_key().public_key(), WEB, dt.timedelta(hours=1),
                   NOW + dt.timedelta(days=2))


def test_issuer_checks(hierarchy) -> None:
    anchor, issuer_pair, _ = hierarchy
    assert pki.verify_issuer(issuer_pair.cert, [anchor.cert], NOW) == anchor.cert
    with pytest.raises(pki.ChainInvalid, match="not signed"):
        pki.verify_issuer(issuer_pair.cert, [pki.make_anchor(SCHEME, 1, NOW).cert], NOW)
    with pytest.raises(pki.PkiError, match="does not belong"):
        pki.Issuer(pki.CertifiedKey(cert=issuer_pair.cert, key=pki.generate_key()))


# --- the authority's decisions -------------------------------------------------------------


def test_authority_issues_and_refuses(tmp_path: Path) -> None:
    identity_dir, _ = make_material(tmp_path)
    material = store.load_service_material(identity_dir, dt.datetime.now(dt.UTC))
    authority = Authority(material)
    assert authority.leaf_lifetime == dt.timedelta(hours=24)
    key = pki.generate_key()
    reply = authority.issue(WEB, pki.build_csr(key, WEB), dt.datetime.now(dt.UTC))
    assert isinstance(reply, CertifyIssued)
    creds = accept_issued(reply, key, WEB, time.time())
    assert creds.serial == reply.serial and creds.identity == WEB
    # The proxy refuses a leaf for someone else's key or name.
    with pytest.raises(IdentityError, match="not for this proxy's key"):
        accept_issued(reply, pki.generate_key(), WEB, time.time())
    refused = authority.issue(WEB, pki.build_csr(key, SCHEME.identity("x", "y")),
                              dt.datetime.now(dt.UTC))
    assert not isinstance(refused, CertifyIssued) and refused.code == "invalid_csr"
    foreign = authority.workload("web.emojivoto.serviceaccount.identity.other.cluster.local")
    assert not isinstance(foreign, pki.WorkloadIdentity) and foreign.code == "bad_request"


def test_bundle_publication_rule(tmp_path: Path) -> None:
    identity_dir, _ = make_material(tmp_path)
    material = store.load_service_material(identity_dir, dt.datetime.now(dt.UTC))
    mine = [pki.cert_to_pem(a) for a in material.anchors]
    other = [pki.cert_to_pem(pki.make_anchor(SCHEME, 1, NOW).cert)]
    assert should_publish(None, material)
    assert should_publish(TrustBundle(anchors_pem=["garbage"]), material)
    assert not should_publish(TrustBundle(anchors_pem=mine, updated_at=0.0), material)
    # Differing: the newer one wins.
    assert should_publish(TrustBundle(anchors_pem=other, updated_at=0.0), material)
    assert not should_publish(TrustBundle(anchors_pem=other, updated_at=time.time() + 60),
                              material)


# --- join tokens ---------------------------------------------------------------------------


def test_join_tokens() -> None:
    key = tokens.generate_signing_key()
    keys = {tokens.key_id(key.public_key()): key.public_key()}
    now = 1_900_000_000.0
    token = tokens.mint(key, "emojivoto", "web", 3600, now)
    assert token.startswith("shoal-jt1.") and len(token) < 400
    claims = tokens.verify(token, keys, now + 10, "emojivoto", "web")
    assert isinstance(claims, tokens.JoinClaims) and (claims.ns, claims.sa) == ("emojivoto", "web")

    def reason(result: tokens.JoinClaims | tokens.TokenRejected) -> str:
        assert isinstance(result, tokens.TokenRejected), result
        return result.reason

    assert reason(tokens.verify(token, keys, now + 3600)) == "expired"
    assert reason(tokens.verify(token, keys, now - 3600)) == "not_yet_valid"
    assert reason(tokens.verify(token, keys, now, "emojivoto", "voting")) == "wrong_identity"
    assert reason(tokens.verify(token, keys, now, "other", "web")) == "wrong_identity"
    other = tokens.generate_signing_key()
    assert reason(tokens.verify(token, {tokens.key_id(other.public_key()): other.public_key()},
                                now)) == "unknown_key"
    head, _payload, signature = token.split(".")
    forged_claims = tokens.JoinClaims(ns="kube-system", sa="admin", iat=now, exp=now + 60,
                                      kid=tokens.key_id(key.public_key()))
    import base64

    import msgspec

    forged_payload = base64.urlsafe_b64encode(msgspec.json.encode(forged_claims)).decode()
    forged = f"{head}.{forged_payload.rstrip('=')}.{signature}"
    assert reason(tokens.verify(forged, keys, now)) == "bad_signature"
    assert reason(tokens.verify("eyJhbGciOiJSUzI1NiJ9.e30.sig", keys, now)) == "malformed"
    assert reason(tokens.verify("shoal-jt1.%%%.x", keys, now)) == "malformed"
    assert reason(tokens.verify("shoal-jt1." + "A" * 5000, keys, now)) == "malformed"
    text = str(tokens.verify(token, keys, now + 7200))
    assert "expired" in text and "shoal identity token" in text


@pytest.mark.parametrize("text, seconds", [("30d", 2592000), ("12h", 43200), ("90m", 5400),
                                           ("45s", 45), ("2.5", 2.5)])
def test_durations(text: str, seconds: float) -> None:
    assert tokens.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1h", "0", "infd", "nan"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        tokens.parse_duration(text)


# --- TokenReview rules ---------------------------------------------------------------------------


def test_token_review_judgement() -> None:
    wanted = SCHEME.parse(WEB)
    ok = judge_review(ReviewOutcome(True, "system:serviceaccount:emojivoto:web",
                                    ("identity.shoal.io",)), wanted)
    assert ok == TokenAccepted("emojivoto", "web", "kubernetes")
    cases = {
        ReviewOutcome(False, error="token expired"): ("invalid_token", "token expired"),
        ReviewOutcome(True, "system:serviceaccount:emojivoto:web", ("kubernetes",)):
            ("invalid_token", "audience"),
        ReviewOutcome(True, "alice"): ("invalid_token", "not to a service account"),
        ReviewOutcome(True, "system:serviceaccount:emojivoto:voting"):
            ("token_identity_mismatch", "voting"),
    }
    for outcome, (code, fragment) in cases.items():
        verdict = judge_review(outcome, wanted)
        assert isinstance(verdict, TokenRefused) and verdict.code == code
        assert fragment in verdict.reason


# --- the proxy client's timing rules ------------------------------------------------------------


def test_refresh_at_seventy_percent_within_bounds() -> None:
    config = IdentityConfig(identity=WEB)
    now = 1000.0
    assert refresh_delay(now + 24 * 3600, now, config) == pytest.approx(0.7 * 24 * 3600)
    assert refresh_delay(now + 5, now, config) == 10.0  # min 10 s
    assert refresh_delay(now + 10 * 24 * 3600, now, config) == 24 * 3600  # max 24 h
    assert refresh_delay(now - 5, now, config) == 10.0  # already expired: soon
    fast = IdentityConfig(identity=WEB, min_refresh_s=0.1)
    assert refresh_delay(now + 3, now, fast) == pytest.approx(2.1)


def test_backoff_grows_and_is_capped() -> None:
    config = IdentityConfig(identity=WEB)
    rng = random.Random(7)
    delays = [backoff_delay(n, config, rng) for n in range(1, 12)]
    assert 0.25 <= delays[0] <= 0.75
    assert all(d <= 45.0 for d in delays)
    assert delays[-1] >= 15.0  # the cap (30 s) jittered by +-50%


# --- rotation steps on disk ----------------------------------------------------------------------


def test_anchor_rotation_steps_keep_their_order_and_need_no_old_key(tmp_path: Path) -> None:
    identity_dir, anchor_dir = make_material(tmp_path)
    now = dt.datetime.now(dt.UTC)
    old = store.read_bundle(identity_dir)[0]
    (anchor_dir / store.ANCHOR_KEY_FILE).unlink()  # lost: a reason to rotate
    with pytest.raises(store.IdentityMaterialError, match="anchor key is not in"):
        store.rotate_issuer(identity_dir, anchor_dir, 30, now)
    with pytest.raises(store.IdentityMaterialError, match="no anchor rotation"):
        store.rotate_anchor_issuer(identity_dir, anchor_dir, 30, now)
    new = store.rotate_anchor_add(identity_dir, anchor_dir, 30, now)
    assert [pki.fingerprint(a) for a in store.read_bundle(identity_dir)] == [
        pki.fingerprint(old), new.fingerprint]
    with pytest.raises(store.IdentityMaterialError, match="already under way"):
        store.rotate_anchor_add(identity_dir, anchor_dir, 30, now)
    with pytest.raises(store.IdentityMaterialError, match="after --step issuer"):
        store.rotate_anchor_remove(identity_dir, anchor_dir, now, force=True)
    store.rotate_anchor_issuer(identity_dir, anchor_dir, 30, now)
    material = store.load_service_material(identity_dir, now)  # issuer under the new anchor
    assert pki.verify_issuer(material.issuer.cert, material.anchors, now).fingerprint(
        hashes.SHA256()).hex() == new.fingerprint
    later = now + dt.timedelta(hours=25)  # one leaf lifetime later: no --force needed
    store.rotate_anchor_remove(identity_dir, anchor_dir, later)
    assert [pki.fingerprint(a) for a in store.read_bundle(identity_dir)] == [new.fingerprint]
    assert pki.fingerprint(store.load_anchor(anchor_dir).cert) == new.fingerprint
    assert store.read_rotation(anchor_dir) is None
    assert len(list((anchor_dir / store.RETIRED_DIR).iterdir())) == 1  # the old certificate


def test_service_material_is_checked(tmp_path: Path) -> None:
    identity_dir, _ = make_material(tmp_path)
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(store.IdentityMaterialError, match="does not exist"):
        store.load_service_material(tmp_path / "nowhere", now)
    stranger = pki.make_anchor(SCHEME, 1, now)
    store.write_bundle(identity_dir, [stranger.cert])
    with pytest.raises(store.IdentityMaterialError, match="not signed by any anchor"):
        store.load_service_material(identity_dir, now)
    (identity_dir / store.ISSUER_KEY_FILE).write_text("garbage")
    with pytest.raises(store.IdentityMaterialError, match=r"issuer\.key"):
        store.load_service_material(identity_dir, now)
