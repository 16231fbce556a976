"""The proxy's identity: its private key, its certificate from the identity service, the
trust anchors from ``shoal_trust``, and the TLS contexts built from them.

Lifecycle (Linkerd's): the key is generated in memory when the proxy starts and never
leaves the process; a CSR for the proxy's identity is sent with the bootstrap token on
``shoal.v1.identity.certify``; the leaf is renewed at 70% of its remaining life (at least
10 s, at most 24 h later), with jittered exponential backoff on refusals and timeouts;
the current certificate is kept until a new one is in hand. The trust bundle is watched,
and every change (renewal, new anchors) builds fresh ``ssl.SSLContext`` objects: new
connections use them at once, established ones keep theirs, nothing restarts.

Server side, ``server_context()`` is one stable context to give a listener once: its SNI
callback (which OpenSSL runs for every ClientHello, with or without SNI) switches each
handshake to the newest generation before the certificate is chosen and the client's
chain verified. Client side, ``client_context()`` returns the newest generation for each
new connection; connect with ``server_hostname`` = the identity the destination said the
server has, and OpenSSL checks the server's DNS SAN against it.

Key material and ``ssl``: ``load_cert_chain`` only reads files, so the key is handed to
OpenSSL through an anonymous memory file (``memfd_create``, opened via
``/proc/self/fd/N`` and closed right after loading: it never has a name on any
filesystem). Where memfd does not exist, a 0600 file in a private 0700 directory
(``/dev/shm`` if present) is unlinked immediately after loading. Either way the PEM is
encrypted with a random one-time passphrase that exists only in this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import random
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from nats.aio.client import Client

from shoal.kernel import pki
from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.errors import ErrorReply
from shoal.schemas.identity import CertifyIssued, CertifyRefused, CertifyRequest, TrustBundle

log = logging.getLogger("shoal.proxy.identity")

# Linkerd's proxy identity settings (LINKERD-REFERENCE.md "Identity").
REFRESH_FRACTION = 0.7
MIN_REFRESH_SECONDS = 10.0
MAX_REFRESH_SECONDS = 24 * 3600.0
# A certify call may wait for a TokenReview (5 s, services/identity/kube.py) plus the bus.
CERTIFY_TIMEOUT_SECONDS = 10.0
MIN_BACKOFF_SECONDS = 0.5  # first retry after a refusal or timeout
MAX_BACKOFF_SECONDS = 30.0  # cap: a refused proxy asks at most twice a minute
BACKOFF_JITTER = 0.5  # +-50%, so proxies refused together do not retry together
TRUST_WATCH_RETRY_SECONDS = 1.0  # the watch restarts after this when the bus fails it
TLS_MINIMUM_VERSION = ssl.TLSVersion.TLSv1_3

RequestFn = Callable[[str, bytes, float], Awaitable[bytes]]
TokenSource = Callable[[], str]
Clock = Callable[[], float]

_reply_decoder: Decoder[CertifyIssued | CertifyRefused | ErrorReply] = Decoder(
    CertifyIssued | CertifyRefused | ErrorReply, names.IDENTITY_CERTIFY)
_bundle_decoder: Decoder[TrustBundle] = Decoder(TrustBundle, names.BUCKET_TRUST)


@dataclasses.dataclass(frozen=True)
class IdentityConfig:
    identity: str  # <sa>.<ns>.serviceaccount.identity.<cp-ns>.<trust-domain>
    alpn_protocols: tuple[str, ...] = ()  # offered (client) / accepted (server), in order
    require_client_certificate: bool = True  # inbound mTLS: a TLS client must present one
    certify_timeout_s: float = CERTIFY_TIMEOUT_SECONDS
    refresh_fraction: float = REFRESH_FRACTION
    min_refresh_s: float = MIN_REFRESH_SECONDS
    max_refresh_s: float = MAX_REFRESH_SECONDS
    min_backoff_s: float = MIN_BACKOFF_SECONDS
    max_backoff_s: float = MAX_BACKOFF_SECONDS


# --- plain rules ----------------------------------------------------------------------------


def refresh_delay(valid_until: float, now: float, config: IdentityConfig) -> float:
    """Seconds until renewal: ``fraction`` of the remaining life, within [min, max]."""
    remaining = max(0.0, valid_until - now)
    return min(max(remaining * config.refresh_fraction, config.min_refresh_s),
               config.max_refresh_s)


def backoff_delay(failures: int, config: IdentityConfig, rng: random.Random) -> float:
    """Exponential from ``min_backoff_s`` (doubling per failure) up to ``max_backoff_s``,
    jittered by +-``BACKOFF_JITTER``."""
    base = min(config.max_backoff_s, config.min_backoff_s * 2.0 ** max(0, failures - 1))
    return base * (1.0 + BACKOFF_JITTER * (2.0 * rng.random() - 1.0))


class IdentityError(Exception):
    """Getting or using a certificate failed; ``code`` is a ``CertifyRefused`` code, or
    ``timeout``, ``error`` (a service error reply) or ``bad_leaf``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class PeerIdentityMismatch(ssl.SSLError):
    """The peer's certificate does not carry the identity expected of it."""

    def __init__(self, expected: str, actual: str | None) -> None:
        super().__init__(f"peer identity {actual or '(none)'} is not the expected {expected}")
        self.expected = expected
        self.actual = actual


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A leaf in hand: what is presented in handshakes until the next one arrives."""

    identity: str
    leaf: x509.Certificate
    chain_pem: str  # leaf then intermediates
    serial: str
    not_after: float  # unix seconds
    received_at: float


def accept_issued(reply: CertifyIssued, key: EllipticCurvePrivateKey, identity: str,
                  now: float) -> Credentials:
    """Check what the identity service sent before trusting it with our key."""
    try:
        leaf = pki.certs_from_pem(reply.leaf_pem)[0]
        intermediates = [c for pem in reply.intermediates_pem for c in pki.certs_from_pem(pem)]
    except pki.PkiError as error:
        raise IdentityError("bad_leaf", str(error)) from None
    if not pki.key_matches(leaf, key):
        raise IdentityError("bad_leaf", "the leaf is not for this proxy's key")
    if pki.dns_identity(leaf) != identity:
        raise IdentityError("bad_leaf", f"the leaf is for {pki.dns_identity(leaf)!r}, "
                                        f"not {identity!r}")
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise IdentityError("bad_leaf", "the leaf has already expired")
    return Credentials(identity=identity, leaf=leaf,
                       chain_pem=pki.bundle_pem([leaf, *intermediates]),
                       serial=format(leaf.serial_number, "x"), not_after=not_after,
                       received_at=now)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The single DNS SAN of the verified peer certificate, or None (no TLS, no cert)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    sans = cert.get("subjectAltName", ())
    dns = [pair[1] for pair in sans if isinstance(pair, tuple) and pair[0] == "DNS"]
    return str(dns[0]) if len(dns) == 1 else None


def check_peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
                        expected: str) -> str:
    """Return the peer's identity if it is ``expected``; raise ``PeerIdentityMismatch``."""
    actual = peer_identity(ssl_object)
    if actual != expected:
        raise PeerIdentityMismatch(expected, actual)
    return actual


# --- TLS contexts -----------------------------------------------------------------------------


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data``, gone when the block ends."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("shoal-identity", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    directory = tempfile.mkdtemp(prefix="shoal-identity-", dir=base)  # 0700
    path = Path(directory) / "credentials.pem"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield str(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _base_context(purpose: int, anchors_pem: str, config: IdentityConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = TLS_MINIMUM_VERSION
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if anchors_pem:
        context.load_verify_locations(cadata=anchors_pem)
    if config.alpn_protocols:
        context.set_alpn_protocols(list(config.alpn_protocols))
    return context


def _load_credentials(context: ssl.SSLContext, creds: Credentials,
                      key: EllipticCurvePrivateKey) -> None:
    password = secrets.token_bytes(32)
    blob = creds.chain_pem.encode() + pki.key_to_pem(key, password)
    with _private_file(blob) as path:
        context.load_cert_chain(path, password=password)


def build_contexts(creds: Credentials, key: EllipticCurvePrivateKey,
                   anchors_pem: str, config: IdentityConfig
                   ) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.3, mutual, trusting exactly ``anchors_pem``."""
    server = _base_context(ssl.PROTOCOL_TLS_SERVER, anchors_pem, config)
    server.verify_mode = (ssl.CERT_REQUIRED if config.require_client_certificate
                          else ssl.CERT_OPTIONAL)
    _load_credentials(server, creds, key)
    client = _base_context(ssl.PROTOCOL_TLS_CLIENT, anchors_pem, config)
    client.check_hostname = True  # the server's DNS SAN must be the expected identity
    client.verify_mode = ssl.CERT_REQUIRED
    _load_credentials(client, creds, key)
    return server, client


# --- the client ---------------------------------------------------------------------------------


def nats_request(client: Client) -> RequestFn:
    """A ``RequestFn`` over a nats-py connection (the proxy's BusLink has its own)."""

    async def request(subject: str, data: bytes, timeout: float) -> bytes:
        msg = await client.request(subject, data, timeout=timeout)
        return bytes(msg.data)

    return request


@dataclasses.dataclass(frozen=True)
class IdentityStatus:
    """What ``shoal identity show`` and the admin endpoint print about a proxy."""

    identity: str
    ready: bool
    serial: str
    not_after: float
    refresh_count: int
    anchors: tuple[pki.CertSummary, ...]
    last_error: str


class IdentityClient:
    """Owns the key, the current certificate, the trust anchors and the TLS contexts."""

    def __init__(self, config: IdentityConfig, request: RequestFn, token: TokenSource,
                 *, clock: Clock = time.time, rng: random.Random | None = None) -> None:
        self.config = config
        self._request = request
        self._token = token
        self._clock = clock
        self._rng = rng or random.Random()
        self._key = pki.generate_key()  # in memory only; see the module docstring
        self._csr_pem = pki.build_csr(self._key, config.identity)
        self._credentials: Credentials | None = None
        self._anchors: tuple[x509.Certificate, ...] = ()
        self._anchors_pem = ""
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self._client_variants: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._front = self._front_server_context()
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._trust_task: asyncio.Task[None] | None = None
        self.refresh_count = 0  # identity_cert_refresh_count
        self.last_error = ""

    # --- what the rest of the proxy reads ---

    @property
    def identity(self) -> str:
        return self.config.identity

    @property
    def ready(self) -> bool:
        """A certificate and trust anchors in hand: TLS can be served and originated."""
        return self._server is not None

    @property
    def credentials(self) -> Credentials | None:
        return self._credentials

    @property
    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        return self._anchors

    @property
    def cert_expiration_timestamp_seconds(self) -> float:
        """identity_cert_expiration_timestamp_seconds (0 before the first certificate)."""
        return self._credentials.not_after if self._credentials else 0.0

    def metric_values(self) -> dict[str, float]:
        return {"identity_cert_expiration_timestamp_seconds":
                self.cert_expiration_timestamp_seconds,
                "identity_cert_refresh_count": float(self.refresh_count)}

    def server_context(self) -> ssl.SSLContext:
        """One context for the life of a listener; each handshake uses the newest
        certificate and anchors (see the module docstring)."""
        return self._front

    def current_server_context(self) -> ssl.SSLContext:
        if self._server is None:
            raise IdentityError("not_ready", "no certificate or trust anchors yet")
        return self._server

    def client_context(self, alpn: tuple[str, ...] | None = None) -> ssl.SSLContext:
        """The newest client context; take it per connection, not once. ``alpn``
        offers another protocol list than the configured one (say, the opaque transport
        instead of HTTP/2); such variants are built once per certificate generation."""
        if self._client is None or self._credentials is None:
            raise IdentityError("not_ready", "no certificate or trust anchors yet")
        if alpn is None or alpn == self.config.alpn_protocols:
            return self._client
        variant = self._client_variants.get(alpn)
        if variant is None:
            config = dataclasses.replace(self.config, alpn_protocols=alpn)
            _, variant = build_contexts(self._credentials, self._key, self._anchors_pem, config)
            self._client_variants[alpn] = variant
        return variant

    def status(self) -> IdentityStatus:
        creds = self._credentials
        return IdentityStatus(
            identity=self.identity, ready=self.ready, serial=creds.serial if creds else "",
            not_after=creds.not_after if creds else 0.0, refresh_count=self.refresh_count,
            anchors=tuple(pki.summarize(a) for a in self._anchors), last_error=self.last_error)

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_changed(self, timeout: float) -> bool:
        """Wait for the next new certificate or trust bundle (for tests and the admin)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- lifecycle ---

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="shoal-identity")

    def renew_soon(self) -> None:
        """Renew now instead of at the scheduled time (an operator asked)."""
        self._renew_now.set()

    async def close(self) -> None:
        for task in (self._task, self._trust_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._trust_task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self.certify_once()
                failures = 0
                assert self._credentials is not None
                delay = refresh_delay(self._credentials.not_after, self._clock(), self.config)
            except Exception as error:  # IdentityError, or a bug: never let the loop die
                failures += 1
                delay = backoff_delay(failures, self.config, self._rng)
                if not isinstance(error, IdentityError):
                    log.exception("certificate renewal failed unexpectedly")
                    self.last_error = f"error: {type(error).__name__}: {error}"
                if self._credentials is not None:
                    # Keep serving with the old certificate; but never sleep past its end.
                    left = self._credentials.not_after - self._clock()
                    delay = max(0.0, min(delay, left)) if left > 0 else delay
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "certificate for %s not renewed (attempt %d, next in %.1f s): %s",
                        self.identity, failures, delay, error)
            self._renew_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), delay)

    async def certify_once(self) -> Credentials:
        """One certify round trip; on success the new certificate is in use at once."""
        request = CertifyRequest(identity=self.identity, token=self._read_token(),
                                 csr_pem=self._csr_pem)
        try:
            data = await self._request(names.IDENTITY_CERTIFY, encode(request),
                                       self.config.certify_timeout_s)
        except TimeoutError as error:  # nats-py's TimeoutError is one too
            self.last_error = "timeout: the identity service did not answer"
            raise IdentityError("timeout", "the identity service did not answer") from error
        except Exception as error:  # nats errors (no responders, disconnected)
            self.last_error = f"error: {type(error).__name__}: {error}"
            raise IdentityError("error", f"{type(error).__name__}: {error}") from None
        try:
            reply = _reply_decoder.decode(data)
        except WireDecodeError as error:
            self.last_error = f"error: {error}"
            raise IdentityError("error", str(error)) from None
        if isinstance(reply, CertifyRefused):
            self.last_error = f"{reply.code}: {reply.reason}"
            raise IdentityError(reply.code, reply.reason)
        if isinstance(reply, ErrorReply):
            self.last_error = f"error: {reply.code}: {reply.message}"
            raise IdentityError("error", f"{reply.code}: {reply.message}")
        try:
            creds = accept_issued(reply, self._key, self.identity, self._clock())
        except IdentityError as error:
            self.last_error = str(error)
            raise
        self._adopt(creds)
        return creds

    def _read_token(self) -> str:
        try:
            return self._token()
        except OSError as error:  # a token file being rotated: send none, get refused
            log.warning("cannot read the bootstrap token: %s", error)
            return ""

    def _adopt(self, creds: Credentials) -> None:
        if self._anchors:
            try:
                pki.verify_leaf(creds.leaf, pki.certs_from_pem(creds.chain_pem)[1:],
                                self._anchors, self.identity,
                                dt.datetime.fromtimestamp(self._clock(), dt.UTC))
            except pki.ChainInvalid as error:
                # During an anchor rotation the bundle may reach us after the leaf; peers
                # with the new bundle accept it, so use it, but say so.
                log.warning("new certificate does not verify against the known anchors "
                            "yet: %s", error)
        first = self._credentials is None
        self._credentials = creds
        if not first:
            self.refresh_count += 1
        self.last_error = ""
        log.info("certificate for %s: serial %s, valid until %s", self.identity, creds.serial,
                 dt.datetime.fromtimestamp(creds.not_after, dt.UTC).isoformat())
        self._rebuild()

    # --- trust anchors ---

    def set_trust_bundle(self, bundle: TrustBundle) -> bool:
        """Use the anchors of ``bundle`` for new handshakes; False if unusable/unchanged."""
        anchors: list[x509.Certificate] = []
        for pem in bundle.anchors_pem:
            try:
                anchors.extend(pki.certs_from_pem(pem))
            except pki.PkiError as error:
                log.warning("ignoring a malformed anchor in the trust bundle: %s", error)
        if not anchors:
            log.warning("trust bundle has no usable anchor; keeping the current ones")
            return False
        if [pki.fingerprint(a) for a in anchors] == [pki.fingerprint(a) for a in self._anchors]:
            return False
        self._anchors = tuple(anchors)
        self._anchors_pem = pki.bundle_pem(anchors)
        log.info("trust anchors: %s", ", ".join(pki.fingerprint(a)[:16] for a in anchors))
        self._rebuild()
        return True

    def start_trust_watch(self, client: Client) -> None:
        """Watch ``shoal_trust`` over ``client``; call again after a reconnect (it
        replaces the previous watch)."""
        if self._trust_task is not None:
            self._trust_task.cancel()
        self._trust_task = asyncio.create_task(self._watch_trust(client),
                                               name="shoal-identity-trust")

    async def _watch_trust(self, client: Client) -> None:
        while True:
            try:
                kv = await client.jetstream().key_value(names.BUCKET_TRUST)
                watcher = await kv.watch(names.TRUST_BUNDLE_KEY)
                try:
                    async for entry in watcher:
                        if entry is None or not entry.value or entry.operation is not None:
                            continue  # the end-of-history marker, or a delete: keep anchors
                        try:
                            self.set_trust_bundle(_bundle_decoder.decode(entry.value))
                        except WireDecodeError as error:
                            log.warning("ignoring trust bundle: %s", error)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as error:  # bus away or bucket missing: fail static, retry
                log.debug("trust bundle watch failed (%s); retrying", error)
            await asyncio.sleep(TRUST_WATCH_RETRY_SECONDS)

    # --- contexts ---

    def _rebuild(self) -> None:
        creds = self._credentials
        if creds is None or not self._anchors_pem:
            return
        try:
            self._server, self._client = build_contexts(creds, self._key, self._anchors_pem,
                                                        self.config)
            self._client_variants = {}
        except (ssl.SSLError, OSError) as error:  # keep the previous generation
            log.error("cannot build TLS contexts: %s", error)
            return
        self._ready.set()
        self._changed.set()

    def _front_server_context(self) -> ssl.SSLContext:
        front = _base_context(ssl.PROTOCOL_TLS_SERVER, "", self.config)
        # verify_mode and verify flags stay those of the SSL object made from this
        # context; the certificate, key and trust store come from the one switched in.
        front.verify_mode = (ssl.CERT_REQUIRED if self.config.require_client_certificate
                             else ssl.CERT_OPTIONAL)

        def select(ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                   _context: ssl.SSLContext) -> int | None:
            current = self._server
            if current is None:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            ssl_object.context = current
            return None

        front.sni_callback = select
        return front

