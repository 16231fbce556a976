"""Helpers for the identity tests: identity material in a temporary directory, the
identity service run in-process on the real test bus, and TLS over loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client

from shoal.kernel import identity_store as store
from shoal.kernel import pki, tokens
from shoal.proxy.identity import IdentityClient, IdentityConfig, check_peer_identity, nats_request
from shoal.schemas import names
from shoal.services.identity.service import IdentityService
from shoal.services.identity.tokencheck import TokenReviewer
from shoal.services.runtime import ServiceRuntime

from .conftest import Bus

SCHEME = pki.NameScheme()
START_TIMEOUT_SECONDS = 10.0
HANDSHAKE_TIMEOUT_SECONDS = 3.0


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_material(tmp: Path, leaf_lifetime_s: float = 24 * 3600.0) -> tuple[Path, Path]:
    identity_dir, anchor_dir = tmp / "identity", tmp / "identity-anchor"
    settings = store.IdentitySettings(leaf_lifetime_seconds=leaf_lifetime_s)
    store.init_identity(identity_dir, anchor_dir, settings, 365, 365, now())
    return identity_dir, anchor_dir


def join_token(identity_dir: Path, namespace: str, serviceaccount: str,
               ttl: float = 3600.0, at: float | None = None) -> str:
    import time

    key = store.load_signing_key(identity_dir)
    return tokens.mint(key, namespace, serviceaccount, ttl, time.time() if at is None else at)


async def clear_trust_bundle(bus: Bus) -> None:
    """Each test starts with no bundle on the shared bus (the service then writes its own)."""
    nc = await bus.client("operator")
    try:
        kv = await nc.jetstream().key_value(names.BUCKET_TRUST)
        with contextlib.suppress(Exception):
            await kv.purge(names.TRUST_BUNDLE_KEY)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running_service(bus: Bus, identity_dir: Path, *, replica: str = "identity-test",
                          leaf_lifetime: dt.timedelta | None = None,
                          reviewer: TokenReviewer | None = None,
                          reload_interval: float = 0.2) -> AsyncIterator[IdentityService]:
    """The identity service in this process, on the test bus, as the controller role."""
    material = store.load_service_material(identity_dir, now())
    service = IdentityService(identity_dir, material, replica=replica,
                              leaf_lifetime=leaf_lifetime, reviewer=reviewer,
                              reload_interval=reload_interval)
    runtime = ServiceRuntime("identity", "0.0.0-test", bus.settings("controller"))
    service.install(runtime)
    task = asyncio.create_task(runtime.run())
    try:
        async with asyncio.timeout(START_TIMEOUT_SECONDS):
            while not runtime.ready:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield service
    finally:
        runtime.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15.0)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # the runtime took these over
            loop.remove_signal_handler(sig)


@dataclass
class Proxy:
    """An IdentityClient as a proxy would own it: its own bus connection (proxy role)."""

    client: IdentityClient
    nc: Client

    @property
    def identity(self) -> str:
        return self.client.identity

    async def close(self) -> None:
        await self.client.close()
        await self.nc.close()


def config(identity: str, fast: bool = False,
           alpn: tuple[str, ...] = ("shoal/h2",)) -> IdentityConfig:
    """Linkerd's timings, or (fast) ones for seconds-long leaves: renew no sooner than
    0.1 s, retry after 0.1 to 0.3 s."""
    if not fast:
        return IdentityConfig(identity=identity, alpn_protocols=alpn)
    return IdentityConfig(identity=identity, alpn_protocols=alpn, min_refresh_s=0.1,
                          min_backoff_s=0.1, max_backoff_s=0.3)


async def start_proxy(bus: Bus, identity_dir: Path, serviceaccount: str,
                      namespace: str = "emojivoto", fast: bool = False) -> Proxy:
    nc = await bus.client("proxy")
    identity = SCHEME.identity(serviceaccount, namespace)
    token = join_token(identity_dir, namespace, serviceaccount)
    client = IdentityClient(config(identity, fast), nats_request(nc), lambda: token)
    client.start_trust_watch(nc)
    await client.start()
    return Proxy(client=client, nc=nc)


@dataclass
class TlsServer:
    """A loopback TLS server that records the client identity of every connection."""

    context: ssl.SSLContext
    server: asyncio.Server | None = None
    client_identities: list[str | None] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> TlsServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context,
                                                 ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from shoal.proxy.identity import peer_identity

        ssl_object = writer.get_extra_info("ssl_object")
        identity = peer_identity(ssl_object)
        self.client_identities.append(identity)
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        try:
            writer.write(f"{identity} {alpn}\n".encode())
            await writer.drain()
            await reader.read(1)  # until the client closes
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def handshake(port: int, context: ssl.SSLContext, expected_server: str) -> tuple[str, str]:
    """Connect with ``context`` expecting ``expected_server``; return (the server's view
    of our identity, the ALPN it chose). Raises ssl errors on a refused handshake."""
    async with asyncio.timeout(HANDSHAKE_TIMEOUT_SECONDS):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=expected_server,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS)
        try:
            check_peer_identity(writer.get_extra_info("ssl_object"), expected_server)
            line = (await reader.readline()).decode().split()
            if len(line) != 2:  # the server closed: it refused our certificate
                raise ssl.SSLError("server closed the connection after the handshake")
            return line[0], line[1]
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
