"""``shoal identity``: create the trust hierarchy, mint join tokens, rotate the issuer and
the trust anchor, and show what the mesh trusts. docs/identity.md is the manual."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from cryptography import x509

from shoal.kernel import identity_store as store
from shoal.kernel import pki, tokens
from shoal.kernel.config import default_state_dir
from shoal.proxy.admin import ProxyIdentityInfo
from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.identity import TrustBundle

from .busclient import BusUnreachable, NatsCa, NatsPassword, NatsUrl, NatsUser, operator_connection

app = typer.Typer(no_args_is_help=True,
                  help="Workload identity: trust anchor, issuer, join tokens, rotation.")

StateDir = Annotated[Path | None, typer.Option(
    "--state-dir", envvar="SHOAL_STATE_DIR", help="default ~/.local/state/shoal")]
IdentityDir = Annotated[Path | None, typer.Option(
    "--dir", help="what the identity service reads (default <state>/identity)")]
AnchorDir = Annotated[Path | None, typer.Option(
    "--anchor-dir", help="the trust anchor's key; keep it offline (default "
                         "<state>/identity-anchor)")]
AnchorDays = Annotated[int, typer.Option("--anchor-days", min=1,
                                         help="validity of a new trust anchor")]
IssuerDays = Annotated[int, typer.Option("--issuer-days", min=1,
                                         help="validity of a new issuer")]

# `show --admin`: one small JSON answer from a local proxy.
ADMIN_TIMEOUT_SECONDS = 5.0
MAX_ADMIN_ANSWER_BYTES = 256 * 1024

SERVICE_RELOAD_NOTE = ("the identity service picks the new files up within a few seconds, "
                       "without a restart")


def _dirs(state_dir: Path | None, identity_dir: Path | None,
          anchor_dir: Path | None) -> tuple[Path, Path]:
    state = state_dir or default_state_dir()
    return (identity_dir or store.default_identity_dir(state),
            anchor_dir or store.default_anchor_dir(state))


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _date(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _describe(label: str, summary: pki.CertSummary) -> None:
    typer.echo(f"{label:<8} {summary.subject}  valid until {_date(summary.not_after)}  "
               f"sha256 {summary.fingerprint[:16]}")


@app.command("init")
def init(
    state_dir: StateDir = None, identity_dir: IdentityDir = None, anchor_dir: AnchorDir = None,
    anchor_days: AnchorDays = pki.DEFAULT_ANCHOR_DAYS,
    issuer_days: IssuerDays = pki.DEFAULT_ISSUER_DAYS,
    trust_domain: Annotated[str, typer.Option("--trust-domain")] = pki.DEFAULT_TRUST_DOMAIN,
    control_plane_namespace: Annotated[str, typer.Option(
        "--control-plane-namespace")] = pki.DEFAULT_CONTROL_PLANE_NAMESPACE,
    leaf_lifetime: Annotated[str, typer.Option(
        "--leaf-lifetime", help="lifetime of workload certificates")] = "24h",
    force: Annotated[bool, typer.Option("--force", help="replace existing material")] = False,
) -> None:
    """Create a trust anchor, an issuer signed by it, and a join-token signing key."""
    ident, anchor = _dirs(state_dir, identity_dir, anchor_dir)
    try:
        settings = store.IdentitySettings(
            trust_domain=trust_domain, control_plane_namespace=control_plane_namespace,
            leaf_lifetime_seconds=tokens.parse_duration(leaf_lifetime))
        settings.scheme  # noqa: B018  (validates the names)
        result = store.init_identity(ident, anchor, settings, anchor_days, issuer_days,
                                     _now(), force=force)
    except (store.IdentityMaterialError, pki.PkiError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    _describe("anchor", result.anchor)
    _describe("issuer", result.issuer)
    typer.echo(f"identity service files: {ident}")
    typer.echo(f"trust anchor key:       {anchor}/{store.ANCHOR_KEY_FILE} (not needed by the "
               "running mesh: move it offline, bring it back to rotate)")


@app.command("token")
def token(
    namespace: Annotated[str, typer.Option("--namespace", "-n")],
    serviceaccount: Annotated[str, typer.Option("--serviceaccount", "-s")],
    ttl: Annotated[str, typer.Option("--ttl", help="lifetime, like 30d, 12h, 90m")] = "30d",
    state_dir: StateDir = None, identity_dir: IdentityDir = None,
) -> None:
    """Mint a join token for one workload identity (printed alone on stdout)."""
    ident, _ = _dirs(state_dir, identity_dir, None)
    try:
        minted = store.mint_join_token(ident, namespace, serviceaccount,
                                       tokens.parse_duration(ttl))
    except (store.IdentityMaterialError, pki.PkiError, ValueError) as error:
        raise _fail(str(error)) from None
    expires = dt.datetime.fromtimestamp(minted.expires_at, dt.UTC)
    typer.echo(f"join token for {minted.identity}, valid until {_date(expires)}", err=True)
    typer.echo(minted.token)


@app.command("rotate-issuer")
def rotate_issuer(
    state_dir: StateDir = None, identity_dir: IdentityDir = None, anchor_dir: AnchorDir = None,
    issuer_days: IssuerDays = pki.DEFAULT_ISSUER_DAYS,
) -> None:
    """Replace the issuer with a new one signed by the trust anchor. Certificates already
    issued stay valid; proxies move to the new issuer as they renew."""
    ident, anchor = _dirs(state_dir, identity_dir, anchor_dir)
    try:
        summary = store.rotate_issuer(ident, anchor, issuer_days, _now())
    except (store.IdentityMaterialError, pki.PkiError) as error:
        raise _fail(str(error)) from None
    _describe("issuer", summary)
    typer.echo(f"new issuer written to {ident}: {SERVICE_RELOAD_NOTE}")


@app.command("rotate-anchor")
def rotate_anchor(
    step: Annotated[str | None, typer.Option(
        "--step", help="add | issuer | remove (without it: where the rotation stands)")] = None,
    state_dir: StateDir = None, identity_dir: IdentityDir = None, anchor_dir: AnchorDir = None,
    anchor_days: AnchorDays = pki.DEFAULT_ANCHOR_DAYS,
    issuer_days: IssuerDays = pki.DEFAULT_ISSUER_DAYS,
    force: Annotated[bool, typer.Option(
        "--force", help="remove the old anchor before a leaf lifetime has passed")] = False,
    nats_url: NatsUrl = None, user: NatsUser = None, password: NatsPassword = None,
    tls_ca: NatsCa = None,
) -> None:
    """Rotate the trust anchor in three steps, with no failed requests:
    add (new anchor trusted beside the old) -> issuer (new issuer under the new anchor)
    -> wait one leaf lifetime -> remove (old anchor no longer trusted)."""
    ident, anchor = _dirs(state_dir, identity_dir, anchor_dir)
    if step not in (None, "add", "issuer", "remove"):
        typer.echo(f"error: --step must be add, issuer or remove, not {step!r}", err=True)
        raise typer.Exit(2)
    try:
        if step is None:
            _rotation_status(ident, anchor)
            return
        if step == "add":
            summary = store.rotate_anchor_add(ident, anchor, anchor_days, _now())
            _describe("anchor", summary)
            typer.echo("step 1/3 done: the trust bundle now holds the old and the new anchor.")
            _publish_bundle(ident, state_dir, nats_url, user, password, tls_ca)
            typer.echo("next: once every proxy shows both anchors (`shoal identity show`), "
                       "run `shoal identity rotate-anchor --step issuer`")
        elif step == "issuer":
            summary = store.rotate_anchor_issuer(ident, anchor, issuer_days, _now())
            _describe("issuer", summary)
            settings = store.read_settings(ident)
            typer.echo(f"step 2/3 done: new issuer under the new anchor; {SERVICE_RELOAD_NOTE}.")
            typer.echo(f"next: after one leaf lifetime ({settings.leaf_lifetime_seconds:.0f} s"
                       "), when every proxy has renewed, run `shoal identity rotate-anchor "
                       "--step remove`")
        else:
            summary = store.rotate_anchor_remove(ident, anchor, _now(), force=force)
            _describe("anchor", summary)
            typer.echo("step 3/3 done: the old anchor is no longer trusted (its key is in "
                       f"{anchor / store.RETIRED_DIR}).")
            _publish_bundle(ident, state_dir, nats_url, user, password, tls_ca)
    except (store.IdentityMaterialError, pki.PkiError) as error:
        raise _fail(str(error)) from None


def _rotation_status(ident: Path, anchor: Path) -> None:
    state = store.read_rotation(anchor)
    bundle = store.read_bundle(ident)
    typer.echo(f"trust bundle: {len(bundle)} anchor(s)")
    for cert in bundle:
        _describe("  anchor", pki.summarize(cert))
    if state is None:
        typer.echo("no anchor rotation under way; start one with "
                   "`shoal identity rotate-anchor --step add`")
    elif state.phase == "anchor_added":
        typer.echo("step 1/3 done (new anchor added); next: --step issuer")
    else:
        settings = store.read_settings(ident)
        left = settings.leaf_lifetime_seconds - (time.time() - state.issuer_replaced_at)
        when = "now" if left <= 0 else f"in {left:.0f} s"
        typer.echo(f"step 2/3 done (new issuer); next: --step remove, {when}")


def _publish_bundle(ident: Path, state_dir: Path | None, url: str | None, user: str | None,
                    password: str | None, tls_ca: str | None) -> None:
    settings = store.read_settings(ident)
    anchors = store.read_bundle(ident)
    bundle = TrustBundle(anchors_pem=[pki.cert_to_pem(a) for a in anchors],
                         trust_domain=settings.trust_domain, updated_at=time.time())

    async def put() -> None:
        nc = await operator_connection(url, user, password, tls_ca, state_dir=state_dir)
        try:
            kv = await nc.jetstream().key_value(names.BUCKET_TRUST)
            await kv.put(names.TRUST_BUNDLE_KEY, encode(bundle))
        finally:
            await nc.close()

    try:
        asyncio.run(put())
    except Exception as error:  # BusUnreachable, nats errors: the service will do it
        typer.echo(f"note: bundle not published to {names.BUCKET_TRUST} ({error}); the "
                   "identity service publishes the changed file when it sees it", err=True)
        return
    typer.echo(f"published to {names.BUCKET_TRUST} key {names.TRUST_BUNDLE_KEY}: proxies "
               "use it for new connections at once")


@app.command("show")
def show(
    cert: Annotated[Path | None, typer.Option(
        "--cert", help="a PEM certificate (leaf first) to describe and verify")] = None,
    admin: Annotated[str | None, typer.Option(
        "--admin", help="a proxy's admin address (HOST:PORT, e.g. 127.0.0.1:4191): print "
                        "that proxy's identity, certificate and trust anchors")] = None,
    output: Annotated[str, typer.Option(
        "--output", "-o", help="with --admin: text or json")] = "text",
    state_dir: StateDir = None, identity_dir: IdentityDir = None,
    nats_url: NatsUrl = None, user: NatsUser = None, password: NatsPassword = None,
    tls_ca: NatsCa = None,
) -> None:
    """Print the trust bundle the mesh uses (from shoal_trust) and, with --cert, that
    certificate's identity, serial, expiry and whether it verifies; with --admin, what a
    running proxy holds (its admin port's /identity)."""
    if admin is not None:
        if output not in ("text", "json"):
            typer.echo(f"error: --output must be text or json, not {output!r}", err=True)
            raise typer.Exit(2)
        raise typer.Exit(_show_proxy(admin, output))
    ident, _ = _dirs(state_dir, identity_dir, None)
    status = 0
    anchors: list[x509.Certificate] = []
    try:
        bundle = asyncio.run(_read_bundle(state_dir, nats_url, user, password, tls_ca))
    except (BusUnreachable, WireDecodeError) as error:
        typer.echo(f"error: cannot read the trust bundle: {error}", err=True)
        bundle, status = None, 1
    if bundle is not None:
        for pem in bundle.anchors_pem:
            try:
                anchors.extend(pki.certs_from_pem(pem))
            except pki.PkiError as error:
                typer.echo(f"  malformed anchor: {error}")
        updated = dt.datetime.fromtimestamp(bundle.updated_at, dt.UTC)
        typer.echo(f"trust bundle ({names.BUCKET_TRUST} key {names.TRUST_BUNDLE_KEY}): "
                   f"{len(anchors)} anchor(s), trust domain {bundle.trust_domain}, "
                   f"updated {_date(updated)}")
        for anchor in anchors:
            _describe("  anchor", pki.summarize(anchor))
    elif status == 0:
        typer.echo(f"trust bundle: none in {names.BUCKET_TRUST} yet (is the identity service "
                   "running?)")
    if cert is not None:
        status = max(status, _show_cert(cert, anchors, ident))
    raise typer.Exit(status)


async def _read_bundle(state_dir: Path | None, url: str | None, user: str | None,
                       password: str | None, tls_ca: str | None) -> TrustBundle | None:
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError

    nc = await operator_connection(url, user, password, tls_ca, state_dir=state_dir)
    try:
        kv = await nc.jetstream().key_value(names.BUCKET_TRUST)
        entry = await kv.get(names.TRUST_BUNDLE_KEY)
    except (KeyNotFoundError, BucketNotFoundError):
        return None
    finally:
        await nc.close()
    if not entry.value:
        return None
    return Decoder(TrustBundle, names.BUCKET_TRUST).decode(entry.value)


def _show_cert(path: Path, anchors: list[x509.Certificate], ident: Path) -> int:
    try:
        certs = pki.certs_from_pem(path.read_bytes())
    except (OSError, pki.PkiError) as error:
        typer.echo(f"error: {path}: {error}", err=True)
        return 1
    leaf, intermediates = certs[0], certs[1:]
    summary = pki.summarize(leaf)
    left = summary.not_after - _now()
    typer.echo(f"certificate {path}:")
    typer.echo(f"  identity   {summary.identity or '(no single DNS SAN)'}")
    typer.echo(f"  serial     {summary.serial}")
    typer.echo(f"  not before {_date(summary.not_before)}")
    typer.echo(f"  not after  {_date(summary.not_after)} ("
               f"{'expired' if left.total_seconds() <= 0 else f'in {left}'.split('.')[0]})")
    typer.echo(f"  issuer     {summary.issuer}")
    if not anchors or summary.identity is None:
        return 0
    if not intermediates:  # a bare leaf: borrow the local issuer chain if there is one
        try:
            intermediates = list(pki.certs_from_pem(
                (ident / store.ISSUER_CERT_FILE).read_bytes()))
        except (OSError, pki.PkiError):
            pass
    try:
        pki.verify_leaf(leaf, intermediates, anchors, summary.identity, _now())
    except pki.ChainInvalid as error:
        typer.echo(f"  verifies   no: {error}")
        return 1
    typer.echo("  verifies   yes, against the trust bundle")
    return 0


def _fetch_proxy_identity(admin: str) -> bytes:
    """GET /identity from a proxy's admin port; ``_AdminError`` says why not."""
    host, sep, port = admin.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise _AdminError(f"--admin {admin!r}: expected HOST:PORT")
    try:
        with urllib.request.urlopen(f"http://{host.strip('[]')}:{port}/identity",
                                    timeout=ADMIN_TIMEOUT_SECONDS) as response:
            return bytes(response.read(MAX_ADMIN_ANSWER_BYTES))
    except urllib.error.HTTPError as error:
        detail = error.read(1024).decode(errors="replace").strip()
        raise _AdminError(f"proxy at {admin}: {error.code} {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise _AdminError(f"cannot reach the proxy's admin port at {admin}: {reason}") \
            from None


class _AdminError(Exception):
    pass


def _show_proxy(admin: str, output: str) -> int:
    try:
        raw = _fetch_proxy_identity(admin)
        info = msgspec.json.decode(raw, type=ProxyIdentityInfo)
    except _AdminError as error:
        typer.echo(f"error: {error}", err=True)
        return 1
    except msgspec.DecodeError as error:
        typer.echo(f"error: the proxy at {admin} answered something else: {error}", err=True)
        return 1
    if output == "json":
        typer.echo(msgspec.json.format(raw).decode())
        return 0 if info.ready else 1
    typer.echo(f"proxy {admin}:")
    typer.echo(f"  identity   {info.identity}")
    typer.echo(f"  ready      {'yes' if info.ready else 'no'}")
    if info.serial:
        not_after = dt.datetime.fromtimestamp(info.not_after, dt.UTC)
        left = not_after - _now()
        typer.echo(f"  serial     {info.serial}")
        typer.echo(f"  not before {_date(dt.datetime.fromtimestamp(info.not_before, dt.UTC))}")
        typer.echo(f"  not after  {_date(not_after)} ("
                   f"{'expired' if left.total_seconds() <= 0 else f'in {left}'.split('.')[0]})")
        typer.echo(f"  renewals   {info.refresh_count}")
        typer.echo(f"  issuer     {info.issuer} (key id {info.issuer_key_id[:16]})")
    typer.echo(f"  trust anchors: {len(info.trust_anchors)}")
    for anchor in info.trust_anchors:
        until = _date(dt.datetime.fromtimestamp(anchor.not_after, dt.UTC))
        typer.echo(f"    {anchor.subject}  valid until {until}  "
                   f"sha256 {anchor.fingerprint[:16]}")
    if info.last_error:
        typer.echo(f"  last error {info.last_error}")
    return 0 if info.ready else 1


def ensure_identity(state_dir: Path) -> store.InitResult | None:
    """For ``shoal up``: create identity material in the state directory if there is
    none, so the one-machine journey needs no extra step."""
    ident = store.default_identity_dir(state_dir)
    if store.material_exists(ident):
        return None
    return store.init_identity(ident, store.default_anchor_dir(state_dir),
                               store.IdentitySettings(), pki.DEFAULT_ANCHOR_DAYS,
                               pki.DEFAULT_ISSUER_DAYS, _now())
