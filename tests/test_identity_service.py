"""The identity service on a real NATS server: certify requests from a proxy-role
connection, every kind of refusal with its reason, events without key material, the
trust bundle in shoal_trust, issuer rotation without a restart, and TokenReview."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client
from nats.aio.msg import Msg

from shoal.kernel import identity_store as store
from shoal.kernel import pki
from shoal.schemas import names
from shoal.schemas.codec import Decoder, encode
from shoal.schemas.events import CertificateIssued, CertificateRefused, ControlEvent
from shoal.schemas.identity import (
    CertifyIssued,
    CertifyRefused,
    CertifyReply,
    CertifyRequest,
    TrustBundle,
)
from shoal.services.identity.kube import KubernetesTokenReviewer

from .conftest import Bus
from .identity_support import SCHEME, clear_trust_bundle, join_token, make_material, running_service

pytestmark = pytest.mark.usefixtures("buckets")

WEB = SCHEME.identity("web", "emojivoto")
REPLY: Decoder[CertifyIssued | CertifyRefused] = Decoder(CertifyReply, names.IDENTITY_CERTIFY)
EVENT: Decoder[ControlEvent] = Decoder(ControlEvent, names.EVENTS_ALL)


async def certify(nc: Client, request: CertifyRequest) -> CertifyIssued | CertifyRefused:
    msg = await nc.request(names.IDENTITY_CERTIFY, encode(request), timeout=5.0)
    return REPLY.decode(msg.data)


@pytest.fixture
async def material(bus: Bus, tmp_path: Path) -> tuple[Path, Path]:
    await clear_trust_bundle(bus)
    return make_material(tmp_path)


async def test_certify_issues_a_leaf_that_chains_to_the_bundle_anchor(
        bus: Bus, material: tuple[Path, Path], operator: Client) -> None:
    identity_dir, _ = material
    events: list[bytes] = []

    async def on_event(msg: Msg) -> None:
        events.append(msg.data)

    await operator.subscribe(names.event_subject("identity"), cb=on_event)
    async with running_service(bus, identity_dir, replica="identity-a"):
        proxy = await bus.client("proxy")  # proxies may ask; they use their own role
        try:
            key = pki.generate_key()
            token = join_token(identity_dir, "emojivoto", "web")
            reply = await certify(proxy, CertifyRequest(
                identity=WEB, token=token, csr_pem=pki.build_csr(key, WEB)))
        finally:
            await proxy.close()
        assert isinstance(reply, CertifyIssued), reply
        # The trust bundle is on the bus, written by the service at start.
        kv = await operator.jetstream().key_value(names.BUCKET_TRUST)
        entry = await kv.get(names.TRUST_BUNDLE_KEY)
        assert entry.value is not None
        bundle: TrustBundle = Decoder(TrustBundle, names.BUCKET_TRUST).decode(entry.value)
    anchors = [c for pem in bundle.anchors_pem for c in pki.certs_from_pem(pem)]
    assert [pki.fingerprint(a) for a in anchors] == [
        pki.fingerprint(a) for a in store.read_bundle(identity_dir)]
    leaf = pki.certs_from_pem(reply.leaf_pem)[0]
    intermediates = [c for pem in reply.intermediates_pem for c in pki.certs_from_pem(pem)]
    pki.verify_leaf(leaf, intermediates, anchors, WEB, dt.datetime.now(dt.UTC))
    assert pki.key_matches(leaf, key)
    assert reply.serial == format(leaf.serial_number, "x")
    assert reply.valid_until == pytest.approx(time.time() + 24 * 3600, abs=30)
    assert leaf.not_valid_before_utc.timestamp() == pytest.approx(time.time() - 20, abs=10)
    # Announced on the events subject, with no key material.
    async with asyncio.timeout(3):
        while not events:
            await asyncio.sleep(0.02)
    event = EVENT.decode(events[0])
    assert isinstance(event, CertificateIssued)
    assert (event.identity, event.serial, event.source) == (WEB, reply.serial, "identity-a")
    assert event.not_after == pytest.approx(reply.valid_until)
    assert b"BEGIN" not in events[0] and token.encode() not in events[0]


def _forged_csr(case: str, key: ec.EllipticCurvePrivateKey) -> str:
    import ipaddress

    from cryptography.hazmat.primitives.asymmetric import rsa

    def build(signing_key, sans: list[x509.GeneralName]) -> str:
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName(sans), critical=False)
               .sign(signing_key, hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    if case == "wrong SAN":
        return build(key, [x509.DNSName(SCHEME.identity("voting", "emojivoto"))])
    if case == "extra SAN":
        return build(key, [x509.DNSName(WEB), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))])
    if case == "RSA key":
        return build(rsa.generate_private_key(65537, 2048), [x509.DNSName(WEB)])
    der = bytearray(x509.load_pem_x509_csr(pki.build_csr(key, WEB).encode()).public_bytes(
        serialization.Encoding.DER))
    der[-3] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


async def test_every_refusal_is_a_typed_reply_with_a_reason(
        bus: Bus, material: tuple[Path, Path], operator: Client) -> None:
    identity_dir, _ = material
    key = pki.generate_key()
    good_csr = pki.build_csr(key, WEB)
    good_token = join_token(identity_dir, "emojivoto", "web")
    cases: list[tuple[str, CertifyRequest, str, str]] = [
        (case, CertifyRequest(identity=WEB, token=good_token, csr_pem=_forged_csr(case, key)),
         "invalid_csr", fragment)
        for case, fragment in [("wrong SAN", "does not match"), ("extra SAN", "2 SANs"),
                               ("RSA key", "must be ECDSA P-256"),
                               ("bad signature", "signature is not valid")]
    ]
    cases += [
        ("expired token", CertifyRequest(
            identity=WEB, csr_pem=good_csr,
            token=join_token(identity_dir, "emojivoto", "web", ttl=60, at=time.time() - 120)),
         "invalid_token", "expired"),
        ("token for another identity", CertifyRequest(
            identity=WEB, csr_pem=good_csr,
            token=join_token(identity_dir, "emojivoto", "voting")),
         "token_identity_mismatch", "'voting'"),
        ("token from another mesh", CertifyRequest(
            identity=WEB, csr_pem=good_csr,
            token=join_token(make_material(identity_dir.parent / "other")[0],
                             "emojivoto", "web")),
         "invalid_token", "unknown key"),
        ("service account token without TokenReview", CertifyRequest(
            identity=WEB, csr_pem=good_csr, token="eyJhbGciOiJSUzI1NiJ9.e30.c2ln"),
         "invalid_token", "--token-review"),
        ("no token", CertifyRequest(identity=WEB, csr_pem=good_csr, token=""),
         "invalid_token", "no token"),
        ("foreign identity", CertifyRequest(
            identity="web.emojivoto.serviceaccount.identity.other.example.org",
            csr_pem=good_csr, token=good_token),
         "bad_request", "not an identity of this mesh"),
    ]
    refusals: list[CertificateRefused] = []

    async def on_event(msg: Msg) -> None:
        event = EVENT.decode(msg.data)
        if isinstance(event, CertificateRefused):
            refusals.append(event)

    await operator.subscribe(names.event_subject("identity"), cb=on_event)
    async with running_service(bus, identity_dir) as service:
        proxy = await bus.client("proxy")
        try:
            for label, request, code, fragment in cases:
                reply = await certify(proxy, request)
                assert isinstance(reply, CertifyRefused), label
                assert reply.code == code, (label, reply)
                assert fragment in reply.reason, (label, reply.reason)
            # A request that does not decode gets the runtime's error reply, not silence.
            msg = await proxy.request(names.IDENTITY_CERTIFY, b"{not json", timeout=5.0)
            assert msg.headers and msg.headers.get("Nats-Service-Error-Code") == "400"
        finally:
            await proxy.close()
        assert service.refused == len(cases) and service.issued == 0
    async with asyncio.timeout(3):
        while len(refusals) < len(cases):
            await asyncio.sleep(0.02)
    assert {r.code for r in refusals} == {code for _, _, code, _ in cases}


async def test_issuer_rotation_is_picked_up_without_restart(
        bus: Bus, material: tuple[Path, Path]) -> None:
    identity_dir, anchor_dir = material
    first_issuer = pki.certs_from_pem((identity_dir / store.ISSUER_CERT_FILE).read_bytes())[0]
    key = pki.generate_key()
    request = CertifyRequest(identity=WEB, token=join_token(identity_dir, "emojivoto", "web"),
                             csr_pem=pki.build_csr(key, WEB))
    async with running_service(bus, identity_dir, reload_interval=0.1) as service:
        nc = await bus.client("proxy")
        try:
            before = await certify(nc, request)
            assert isinstance(before, CertifyIssued)
            assert pki.certs_from_pem(before.intermediates_pem[0])[0] == first_issuer
            summary = store.rotate_issuer(identity_dir, anchor_dir, 30, dt.datetime.now(dt.UTC))
            async with asyncio.timeout(5):
                while (pki.fingerprint(service.authority.material.issuer.cert)
                       != summary.fingerprint):
                    await asyncio.sleep(0.05)
            after = await certify(nc, request)
        finally:
            await nc.close()
    assert isinstance(after, CertifyIssued)
    new_issuer = pki.certs_from_pem(after.intermediates_pem[0])[0]
    assert pki.fingerprint(new_issuer) == summary.fingerprint != pki.fingerprint(first_issuer)
    anchors = store.read_bundle(identity_dir)
    now = dt.datetime.now(dt.UTC)
    # Old and new leaves both verify against the one anchor.
    pki.verify_leaf(pki.certs_from_pem(before.leaf_pem)[0], [first_issuer], anchors, WEB, now)
    pki.verify_leaf(pki.certs_from_pem(after.leaf_pem)[0], [new_issuer], anchors, WEB, now)


async def test_half_written_material_keeps_the_current_issuer(
        bus: Bus, material: tuple[Path, Path]) -> None:
    identity_dir, _ = material
    async with running_service(bus, identity_dir) as service:
        current = service.authority
        (identity_dir / store.ISSUER_KEY_FILE).write_bytes(
            pki.key_to_pem(pki.generate_key()))  # a key that does not match the cert
        assert service.reload() is False
        assert service.authority is current


async def test_trust_bundle_is_not_overwritten_by_a_stale_replica(
        bus: Bus, material: tuple[Path, Path], operator: Client) -> None:
    identity_dir, _ = material
    kv = await operator.jetstream().key_value(names.BUCKET_TRUST)
    newer = TrustBundle(anchors_pem=[pki.cert_to_pem(pki.make_anchor(
        SCHEME, 1, dt.datetime.now(dt.UTC)).cert)], updated_at=time.time() + 3600)
    await kv.put(names.TRUST_BUNDLE_KEY, encode(newer))
    async with running_service(bus, identity_dir):
        entry = await kv.get(names.TRUST_BUNDLE_KEY)
    assert entry.value == encode(newer)


# --- TokenReview ---------------------------------------------------------------------------------


class FakeTokenReviewApi(BaseHTTPRequestHandler):
    """Stands in for the Kubernetes API server's TokenReview endpoint: no cluster runs
    here, so the `kubernetes` client talks HTTP to this instead. Tokens it knows:
    ``sa-web`` (web in emojivoto), ``sa-wrong-audience``; anything else is rejected."""

    reviews: list[dict[str, object]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeTokenReviewApi.reviews.append({"path": self.path, "body": body,
                                           "auth": self.headers.get("Authorization")})
        token = body["spec"]["token"]
        audiences = body["spec"].get("audiences") or []
        if token == "sa-web":
            status = {"authenticated": True, "audiences": audiences,
                      "user": {"username": "system:serviceaccount:emojivoto:web"}}
        elif token == "sa-wrong-audience":
            status = {"authenticated": True, "audiences": ["kubernetes"],
                      "user": {"username": "system:serviceaccount:emojivoto:web"}}
        else:
            status = {"authenticated": False, "error": "token has been invalidated"}
        answer = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                             "spec": body["spec"], "status": status}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTokenReviewApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeTokenReviewApi.reviews = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _reviewer(url: str) -> KubernetesTokenReviewer:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    configuration.api_key = {"BearerToken": "identity-service-token"}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return KubernetesTokenReviewer(client.ApiClient(configuration), timeout=2.0)


async def test_service_account_tokens_through_token_review(
        bus: Bus, material: tuple[Path, Path], fake_api: str) -> None:
    identity_dir, _ = material
    csr = pki.build_csr(pki.generate_key(), WEB)
    async with running_service(bus, identity_dir, reviewer=_reviewer(fake_api)):
        nc = await bus.client("proxy")
        try:
            ok = await certify(nc, CertifyRequest(identity=WEB, token="sa-web", csr_pem=csr))
            wrong_audience = await certify(nc, CertifyRequest(
                identity=WEB, token="sa-wrong-audience", csr_pem=csr))
            invalid = await certify(nc, CertifyRequest(identity=WEB, token="sa-forged",
                                                       csr_pem=csr))
            voting = SCHEME.identity("voting", "emojivoto")
            mismatch = await certify(nc, CertifyRequest(
                identity=voting, token="sa-web",
                csr_pem=pki.build_csr(pki.generate_key(), voting)))
            # Join tokens still work beside TokenReview.
            joined = await certify(nc, CertifyRequest(
                identity=WEB, token=join_token(identity_dir, "emojivoto", "web"), csr_pem=csr))
        finally:
            await nc.close()
    assert isinstance(ok, CertifyIssued) and isinstance(joined, CertifyIssued)
    assert isinstance(wrong_audience, CertifyRefused) and "audience" in wrong_audience.reason
    assert isinstance(invalid, CertifyRefused) and invalid.code == "invalid_token"
    assert "token has been invalidated" in invalid.reason
    assert isinstance(mismatch, CertifyRefused) and mismatch.code == "token_identity_mismatch"
    review = FakeTokenReviewApi.reviews[0]
    assert review["path"] == "/apis/authentication.k8s.io/v1/tokenreviews"
    assert review["body"]["spec"]["audiences"] == ["identity.shoal.io"]  # type: ignore[index]
    assert review["auth"] == "Bearer identity-service-token"
    assert len(FakeTokenReviewApi.reviews) == 4  # the join token never reached the API


async def test_token_review_outage_is_unavailable_not_invalid(
        bus: Bus, material: tuple[Path, Path]) -> None:
    identity_dir, _ = material
    from .identity_support import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with running_service(bus, identity_dir, reviewer=_reviewer(dead)):
        nc = await bus.client("proxy")
        try:
            reply = await certify(nc, CertifyRequest(
                identity=WEB, token="sa-web", csr_pem=pki.build_csr(pki.generate_key(), WEB)))
        finally:
            await nc.close()
    assert isinstance(reply, CertifyRefused) and reply.code == "unavailable"
    assert "TokenReview failed" in reply.reason
