"""How CLI commands reach the bus: flags, then the environment, then ``shoal up``'s file;
and one clear message, not a traceback, when the bus is not there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import nats.errors
import typer
from nats.aio.client import Client

from shoal.kernel.bus import connect
from shoal.kernel.config import BusNotFound, resolve_bus

NatsUrl = Annotated[str | None, typer.Option("--nats", envvar="SHOAL_NATS_URL",
                                             help="bus URL (default: the local `shoal up`)")]
NatsUser = Annotated[str | None, typer.Option("--user", envvar="SHOAL_NATS_USER")]
NatsPassword = Annotated[str | None, typer.Option("--password", envvar="SHOAL_NATS_PASSWORD")]
NatsCa = Annotated[str | None, typer.Option("--tls-ca", envvar="SHOAL_NATS_CA")]
REQUEST_TIMEOUT_SECONDS = 5.0


class BusUnreachable(RuntimeError):
    pass


async def operator_connection(url: str | None, user: str | None, password: str | None,
                              tls_ca: str | None, state_dir: Path | None = None) -> Client:
    try:
        settings = resolve_bus("operator", url=url, user=user, password=password,
                               tls_ca=tls_ca, state_dir=state_dir)
    except BusNotFound as error:
        raise BusUnreachable(str(error)) from None
    try:
        return await connect(settings, "shoal-cli", allow_reconnect=False)
    except (OSError, nats.errors.Error, TimeoutError) as error:
        raise BusUnreachable(
            f"cannot reach the bus at {settings.redacted()}: {error or type(error).__name__}"
        ) from None
