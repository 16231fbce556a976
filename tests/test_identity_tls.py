"""The proxy's identity client against the real identity service and NATS, with real
TLS 1.3 handshakes over loopback sockets: mutual authentication with identity checks,
renewal cycles with short leaves (the old certificate kept until the new one is in
hand), trust bundle changes and a whole anchor rotation taken up by a listener that is
never restarted."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import ssl
import time
from pathlib import Path

import pytest
from nats.aio.client import Client

from shoal.kernel import identity_store as store
from shoal.kernel import pki
from shoal.proxy.identity import (
    Credentials,
    IdentityConfig,
    PeerIdentityMismatch,
    build_contexts,
    check_peer_identity,
)
from shoal.schemas import names
from shoal.schemas.codec import encode
from shoal.schemas.identity import TrustBundle

from .conftest import Bus
from .identity_support import (
    SCHEME,
    Proxy,
    TlsServer,
    clear_trust_bundle,
    config,
    handshake,
    make_material,
    running_service,
    start_proxy,
)

pytestmark = pytest.mark.usefixtures("buckets")

READY_TIMEOUT_SECONDS = 5.0


@pytest.fixture
async def material(bus: Bus, tmp_path: Path) -> tuple[Path, Path]:
    await clear_trust_bundle(bus)
    return make_material(tmp_path)


async def _ready(*proxies: Proxy) -> None:
    for proxy in proxies:
        assert await proxy.client.wait_ready(READY_TIMEOUT_SECONDS), proxy.client.last_error


async def test_mutual_tls_between_two_proxies_checks_both_identities(
        bus: Bus, material: tuple[Path, Path]) -> None:
    identity_dir, _ = material
    async with running_service(bus, identity_dir):
        web = await start_proxy(bus, identity_dir, "web")
        voting = await start_proxy(bus, identity_dir, "voting")
        server = await TlsServer(voting.client.server_context()).start()
        try:
            await _ready(web, voting)
            # web -> voting: voting's certificate says voting; voting sees web.
            client_id, alpn = await handshake(server.port, web.client.client_context(),
                                              voting.identity)
            assert client_id == web.identity
            assert alpn == "shoal/h2"
            assert server.client_identities == [web.identity]
            # A client may offer another protocol list per connection; no overlap with
            # the server's list means no ALPN, not a failed handshake.
            _, other = await handshake(server.port, web.client.client_context(("h2",)),
                                       voting.identity)
            assert other == "None"
            assert web.client.client_context(("h2",)) is web.client.client_context(("h2",))
            # Expecting another identity than the server has: the client refuses.
            emoji = SCHEME.identity("emoji", "emojivoto")
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                await handshake(server.port, web.client.client_context(), emoji)
            # A client without a certificate: TLS 1.3 lets it finish its side, then the
            # server refuses it (certificate required) before any byte is answered.
            bare = ssl.create_default_context(cadata=pki.bundle_pem(web.client.trust_anchors))
            bare.check_hostname = False
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(server.port, bare, voting.identity)
            # A client from another mesh (another anchor) is refused too.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(server.port, _stranger_contexts("web")[1], voting.identity)
            # None of the refused connections reached the server's application side.
            assert server.client_identities == [web.identity] * 2
            # The metric values a proxy exposes.
            values = web.client.metric_values()
            assert values["identity_cert_expiration_timestamp_seconds"] == pytest.approx(
                time.time() + 24 * 3600, abs=60)
            assert values["identity_cert_refresh_count"] == 0
        finally:
            await server.close()
            await web.close()
            await voting.close()


def test_peer_identity_check_is_strict() -> None:
    with pytest.raises(PeerIdentityMismatch, match=r"\(none\)"):
        check_peer_identity(None, "web.emojivoto.serviceaccount.identity.shoal.cluster.local")


def _stranger_contexts(serviceaccount: str,
                       anchor: pki.CertifiedKey | None = None,
                       extra_anchors: tuple[str, ...] = ()
                       ) -> tuple[ssl.SSLContext, ssl.SSLContext, pki.CertifiedKey]:
    """Contexts for a workload of a mesh with another trust anchor (made here directly)."""
    now = dt.datetime.now(dt.UTC)
    anchor = anchor or pki.make_anchor(SCHEME, 1, now)
    issuer = pki.Issuer(pki.make_issuer(SCHEME, anchor, 1, now))
    identity = SCHEME.identity(serviceaccount, "emojivoto")
    key = pki.generate_key()
    leaf = issuer.sign(key.public_key(), identity, dt.timedelta(hours=1), now)
    creds = Credentials(identity=identity, leaf=leaf.cert,
                        chain_pem=leaf.leaf_pem + "".join(leaf.intermediates_pem),
                        serial=leaf.serial, not_after=leaf.not_after.timestamp(),
                        received_at=time.time())
    anchors = pki.cert_to_pem(anchor.cert) + "".join(extra_anchors)
    server, client = build_contexts(creds, key, anchors,
                                    IdentityConfig(identity=identity, alpn_protocols=("shoal/h2",)))
    return server, client, anchor


async def test_renewal_cycles_with_short_leaves_never_break_handshakes(
        bus: Bus, material: tuple[Path, Path]) -> None:
    """3-second leaves, renewed at 70% of their life: several cycles in a few seconds,
    a handshake every 50 ms through one listener that is never rebuilt, no failure."""
    identity_dir, _ = material
    async with running_service(bus, identity_dir, leaf_lifetime=dt.timedelta(seconds=3)):
        web = await start_proxy(bus, identity_dir, "web", fast=True)
        voting = await start_proxy(bus, identity_dir, "voting", fast=True)
        server = await TlsServer(voting.client.server_context()).start()
        try:
            await _ready(web, voting)
            seen: list[Credentials] = []
            handshakes = 0
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline:
                creds = web.client.credentials
                assert creds is not None
                if not seen or seen[-1].serial != creds.serial:
                    seen.append(creds)
                client_id, _ = await handshake(server.port, web.client.client_context(),
                                               voting.identity)
                assert client_id == web.identity
                handshakes += 1
                await asyncio.sleep(0.05)
        finally:
            await server.close()
        try:
            assert len(seen) >= 3, [c.serial for c in seen]
            assert handshakes > 30
            # Each new certificate arrived while the one before was still valid.
            for old, new in itertools.pairwise(seen):
                assert new.received_at < old.not_after, (old, new)
            assert web.client.refresh_count >= len(seen) - 1
            assert voting.client.refresh_count >= 2  # the server side renewed under us too
        finally:
            await web.close()
            await voting.close()


async def test_old_certificate_is_kept_while_the_service_is_away(
        bus: Bus, material: tuple[Path, Path]) -> None:
    identity_dir, _ = material
    async with running_service(bus, identity_dir, leaf_lifetime=dt.timedelta(seconds=4)):
        web = await start_proxy(bus, identity_dir, "web", fast=True)
        await _ready(web)
        held = web.client.credentials
        assert held is not None
    # The service is gone: renewals fail, the proxy keeps what it has.
    try:
        async with asyncio.timeout(held.not_after - time.time() - 0.2):
            while not web.client.last_error:  # the renewal at 70% of the life failed
                await asyncio.sleep(0.02)
        assert web.client.credentials is held
        assert web.client.last_error.startswith(("error", "timeout")), web.client.last_error
        assert web.client.refresh_count == 0
        async with running_service(bus, identity_dir, leaf_lifetime=dt.timedelta(seconds=4)):
            async with asyncio.timeout(3):
                while web.client.credentials is held:
                    await asyncio.sleep(0.02)
            renewed = web.client.credentials
            assert renewed is not None and renewed.serial != held.serial
            assert renewed.received_at < held.not_after  # in time: no gap
            assert web.client.refresh_count == 1 and web.client.last_error == ""
    finally:
        await web.close()


async def test_refused_renewal_is_retried_with_the_reason_kept(
        bus: Bus, material: tuple[Path, Path], tmp_path: Path) -> None:
    identity_dir, _ = material
    async with running_service(bus, identity_dir):
        nc = await bus.client("proxy")
        from shoal.proxy.identity import IdentityClient, nats_request

        token = "shoal-jt1.not-a-real-token.x"
        client = IdentityClient(config(SCHEME.identity("web", "emojivoto"), fast=True),
                                nats_request(nc), lambda: token)
        await client.start()
        try:
            assert not await client.wait_ready(1.0)
            assert client.last_error.startswith("invalid_token"), client.last_error
            assert client.status().ready is False
        finally:
            await client.close()
            await nc.close()


async def test_trust_bundle_change_is_picked_up_by_a_running_listener(
        bus: Bus, material: tuple[Path, Path], operator: Client) -> None:
    identity_dir, _ = material
    async with running_service(bus, identity_dir):
        voting = await start_proxy(bus, identity_dir, "voting")
        server = await TlsServer(voting.client.server_context()).start()
        try:
            await _ready(voting)
            ours = [pki.cert_to_pem(a) for a in voting.client.trust_anchors]
            stranger_server, stranger_client, stranger_anchor = _stranger_contexts(
                "web", extra_anchors=tuple(ours))
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(server.port, stranger_client, voting.identity)
            # The operator trusts the other anchor as well (what rotate-anchor --step add
            # does): the proxy sees it on the bus, the same listener accepts the stranger.
            kv = await operator.jetstream().key_value(names.BUCKET_TRUST)
            await kv.put(names.TRUST_BUNDLE_KEY, encode(TrustBundle(
                anchors_pem=[*ours, pki.cert_to_pem(stranger_anchor.cert)],
                updated_at=time.time())))
            async with asyncio.timeout(3):
                while len(voting.client.trust_anchors) != 2:
                    await asyncio.sleep(0.02)
            client_id, _ = await handshake(server.port, stranger_client, voting.identity)
            assert client_id == SCHEME.identity("web", "emojivoto")
            # And the proxy's client side now trusts servers of the other anchor.
            stranger = await TlsServer(stranger_server).start()
            try:
                await handshake(stranger.port, voting.client.client_context(),
                                SCHEME.identity("web", "emojivoto"))
            finally:
                await stranger.close()
            assert voting.client.status().anchors[1].fingerprint == pki.fingerprint(
                stranger_anchor.cert)
        finally:
            await server.close()
            await voting.close()


async def test_anchor_rotation_end_to_end_without_a_failed_handshake(
        bus: Bus, material: tuple[Path, Path]) -> None:
    """The documented three steps, with proxies renewing in between, while handshakes
    run both ways through listeners that are never restarted."""
    identity_dir, anchor_dir = material
    now = lambda: dt.datetime.now(dt.UTC)  # noqa: E731
    old_anchor = store.read_bundle(identity_dir)[0]
    old_pair = store.load_anchor(anchor_dir)
    async with running_service(bus, identity_dir, reload_interval=0.1) as service:
        web = await start_proxy(bus, identity_dir, "web")
        voting = await start_proxy(bus, identity_dir, "voting")
        web_server = await TlsServer(web.client.server_context()).start()
        voting_server = await TlsServer(voting.client.server_context()).start()
        failures: list[str] = []
        stop = asyncio.Event()
        count = 0

        async def traffic() -> None:
            nonlocal count
            while not stop.is_set():
                for src, dst, srv in ((web, voting, voting_server), (voting, web, web_server)):
                    try:
                        client_id, _ = await handshake(srv.port, src.client.client_context(),
                                                       dst.identity)
                        assert client_id == src.identity
                        count += 1
                    except Exception as error:
                        failures.append(f"{src.identity} -> {dst.identity}: {error!r}")
                await asyncio.sleep(0.02)

        async def anchors_seen(n: int) -> None:
            async with asyncio.timeout(5):
                while not all(len(p.client.trust_anchors) == n for p in (web, voting)):
                    await asyncio.sleep(0.02)

        async def renew(proxy: Proxy) -> Credentials:
            before = proxy.client.credentials
            proxy.client.renew_soon()
            async with asyncio.timeout(5):
                while proxy.client.credentials is before:
                    await asyncio.sleep(0.02)
            creds = proxy.client.credentials
            assert creds is not None
            return creds

        try:
            await _ready(web, voting)
            load = asyncio.create_task(traffic())
            await asyncio.sleep(0.2)
            # Step 1: the new anchor joins the bundle; the service publishes the file.
            new_anchor = store.rotate_anchor_add(identity_dir, anchor_dir, 365, now())
            await anchors_seen(2)
            # A workload still on the old anchor (trusting both) is accepted now...
            new_pem = pki.cert_to_pem(store.load_anchor(anchor_dir, next_anchor=True).cert)
            straggler = _stranger_contexts("emoji", anchor=old_pair, extra_anchors=(new_pem,))
            await handshake(voting_server.port, straggler[1], voting.identity)
            await asyncio.sleep(0.2)
            # Step 2: a new issuer under the new anchor; web renews first, voting later,
            # so for a while the two present leaves from different anchors.
            issuer = store.rotate_anchor_issuer(identity_dir, anchor_dir, 365, now())
            async with asyncio.timeout(5):
                while (pki.fingerprint(service.authority.material.issuer.cert)
                       != issuer.fingerprint):
                    await asyncio.sleep(0.05)
            web_creds = await renew(web)
            await asyncio.sleep(0.3)
            voting_creds = await renew(voting)
            await asyncio.sleep(0.2)
            # Step 3: the old anchor leaves (forced: nobody waits 24 h in a test).
            with pytest.raises(store.IdentityMaterialError, match=r"may live"):
                store.rotate_anchor_remove(identity_dir, anchor_dir, now())
            store.rotate_anchor_remove(identity_dir, anchor_dir, now(), force=True)
            await anchors_seen(1)
            await asyncio.sleep(0.3)
            # ...and refused by the same listener once the old anchor is gone.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(voting_server.port, straggler[1], voting.identity)
            stop.set()
            await load
        finally:
            stop.set()
            await web_server.close()
            await voting_server.close()
            await web.close()
            await voting.close()
    assert failures == []
    assert count > 20
    assert pki.fingerprint(web.client.trust_anchors[0]) == new_anchor.fingerprint
    assert pki.fingerprint(old_anchor) != new_anchor.fingerprint
    for creds in (web_creds, voting_creds):
        chain = pki.certs_from_pem(creds.chain_pem)
        pki.verify_leaf(chain[0], chain[1:], web.client.trust_anchors, creds.identity, now())
    assert store.read_rotation(anchor_dir) is None
    assert pki.fingerprint(store.load_anchor(anchor_dir).cert) == new_anchor.fingerprint
