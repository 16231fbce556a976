"""``shoal policy apply``: send a document to the policy service, print the verdict."""

from __future__ import annotations

import asyncio
import getpass
import sys
from pathlib import Path
from typing import Annotated

import nats.errors
import typer

from shoal.schemas import names
from shoal.schemas.codec import Decoder, WireDecodeError, encode
from shoal.schemas.errors import ErrorReply
from shoal.schemas.policy import (
    PolicyAccepted,
    PolicyApplyReply,
    PolicyApplyRequest,
    PolicyFormat,
)

from .busclient import (
    REQUEST_TIMEOUT_SECONDS,
    BusUnreachable,
    NatsCa,
    NatsPassword,
    NatsUrl,
    NatsUser,
    operator_connection,
)

app = typer.Typer(no_args_is_help=True, help="Policy documents.")


@app.command("apply")
def apply(
    filename: Annotated[Path, typer.Option("-f", "--filename", help="YAML or JSON; - for stdin")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate only")] = False,
    nats_url: NatsUrl = None, user: NatsUser = None, password: NatsPassword = None,
    tls_ca: NatsCa = None,
) -> None:
    """Validate and store a policy document; every error is listed on rejection."""
    text = sys.stdin.read() if str(filename) == "-" else filename.read_text()
    fmt: PolicyFormat = "json" if filename.suffix == ".json" else "yaml"
    request = PolicyApplyRequest(text=text, format=fmt, applied_by=getpass.getuser(),
                                 dry_run=dry_run)
    try:
        reply = asyncio.run(_apply(request, nats_url, user, password, tls_ca))
    except BusUnreachable as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if isinstance(reply, ErrorReply):
        typer.echo(f"error: policy service: {reply.message}", err=True)
        raise typer.Exit(1)
    if isinstance(reply, PolicyAccepted):
        verb = "valid" if dry_run else f"applied as version {reply.version}"
        typer.echo(f"policy {reply.namespace}/{reply.service} {verb}")
        return
    typer.echo(f"policy rejected with {len(reply.errors)} error(s):", err=True)
    for problem in reply.errors:
        typer.echo(f"  {problem.path}: {problem.message}", err=True)
    raise typer.Exit(1)


async def _apply(request: PolicyApplyRequest, url: str | None, user: str | None,
                 password: str | None, tls_ca: str | None) -> PolicyApplyReply | ErrorReply:
    nc = await operator_connection(url, user, password, tls_ca)
    try:
        msg = await nc.request(names.POLICY_APPLY, encode(request),
                               timeout=REQUEST_TIMEOUT_SECONDS)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise BusUnreachable("the policy service did not answer (is it running?)") from None
    finally:
        await nc.close()
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        try:
            return Decoder(ErrorReply, names.POLICY_APPLY).decode(msg.data)
        except WireDecodeError:
            return ErrorReply(code="internal", message=msg.headers.get("Nats-Service-Error", ""))
    decoder: Decoder[PolicyApplyReply] = Decoder(PolicyApplyReply, names.POLICY_APPLY)
    return decoder.decode(msg.data)
