"""Listening sockets and what every room does with an accepted connection once its
protocol is known: HTTP/1 goes to the engine's Protocol (HTTP/2 has its own in
http2/server.py), opaque bytes are relayed at kernel speed.

The accept loop takes raw non-blocking sockets (``loop.sock_accept``) because detection
(accept.classify) must read the first bytes itself, and may need to connect upstream in
parallel, before anything is known about the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from .accept import ClientReset
from .http1.client import Pool, UpstreamProtocol
from .http1.server import ServerContext, ServerProtocol
from .route import EndpointKey
from .runtime import Runtime

log = logging.getLogger("shoal.proxy")

# The kernel's accept queue per listener (somaxconn caps it): a burst of connections
# from a client pool waits there instead of being refused.
LISTEN_BACKLOG = 1024
# Out of file descriptors or memory: accepting again at once would spin; wait this long.
ACCEPT_BACKOFF_SECONDS = 0.1
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Handler = Callable[[socket.socket], Awaitable[None]]


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket (OSError, e.g. address in use, to the caller)."""
    sock = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class Listener:
    """One listening socket and its accept loop; each connection runs in its own task
    until its protocol is handed over (HTTP/1) or its relay ends (opaque)."""

    def __init__(self, name: str, sock: socket.socket, handler: Handler, runtime: Runtime,
                 max_connections: int) -> None:
        self.name = name
        self.sock = sock
        self.handler = handler
        self.runtime = runtime
        self.max_connections = max_connections
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.refused = 0  # connections closed at once because of max_connections
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name=f"accept-{self.name}")

    async def close(self) -> None:
        """Stop accepting (connections already accepted carry on)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        runtime = self.runtime
        warned = False
        while True:
            try:
                client, _ = await loop.sock_accept(self.sock)
            except OSError as error:
                if error.errno in _ACCEPT_RESOURCE_ERRORS:
                    if not warned:
                        log.warning("%s: cannot accept: %s; backing off", self.name, error)
                        warned = True
                    await asyncio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                raise
            warned = False
            if runtime.connection_count() >= self.max_connections:
                self.refused += 1
                client.close()
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            runtime.track(loop.create_task(self._handle(client)))

    async def _handle(self, client: socket.socket) -> None:
        try:
            await self.handler(client)
        except ClientReset:
            client.close()
        except Exception:
            log.exception("%s: connection handling failed", self.name)
            client.close()


async def serve_http1(client: socket.socket, ctx: ServerContext, initial: bytes) -> None:
    """Hand the socket to the HTTP/1 engine; ``initial`` is what detection already read
    (fed in connection_made, before the transport reads anything else)."""
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: ServerProtocol(ctx, initial), client)


async def adopt(pool: Pool, key: EndpointKey, upstream: socket.socket) -> None:
    """Put an upstream socket that detection connected eagerly into the HTTP/1 pool, so
    the first request on the connection does not connect again."""
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await loop.create_connection(
            lambda: UpstreamProtocol(pool, key), sock=upstream)
    except OSError:
        upstream.close()
        return
    pool.put(protocol, time.monotonic())
