"""Typed edges around the generated gRPC code: the clients web uses for the emoji and
voting services, and the one way every demo gRPC server is served and stopped.

The generated ``*_pb2_grpc`` modules are untyped (mypy treats them as ``Any``); the
``*_pb2.pyi`` stubs type the messages. Everything above this module sees plain values
(``catalog.Emoji``, ``(shortcode, votes)`` pairs) and one named error, ``RpcFailure``.

Proxies: clients are plain ``grpc.aio`` channels, so grpcio's own proxy support applies.
grpcio (its C core's http_proxy mapper) reads ``grpc_proxy``, then ``https_proxy``, then
``http_proxy`` (lower case only; ``http://`` proxies only; an empty value means none),
skips hosts in ``no_grpc_proxy`` / ``no_proxy``, and reaches the target through an HTTP
CONNECT to that proxy naming the target unresolved (``CONNECT emoji.emojivoto:8080``,
port 443 added when the target has none). That is what the mesh relies on: ``shoal
run`` sets ``grpc_proxy`` to the local outbound proxy and web needs no change.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any, cast

import grpc

from .catalog import VOTE_METHODS, Emoji
from .proto import emoji_pb2, emoji_pb2_grpc, voting_pb2, voting_pb2_grpc

log = logging.getLogger("shoal.demo.rpc")

# Every call web makes has this deadline: emojivoto's services answer in well under a
# millisecond, so a call still open after 5 s is lost (a stalled peer or proxy), and the
# HTTP client should get a 500 rather than wait forever.
RPC_TIMEOUT_SECONDS = 5.0
# On SIGTERM a server stops taking calls and lets those in flight finish for this long;
# every demo RPC is a map lookup, so one second is ample.
SERVER_GRACE_SECONDS = 1.0
# Calls a server runs at once; past this grpcio answers RESOURCE_EXHAUSTED. Each call is
# a dict lookup, so this only bounds memory under a flood (a benchmark uses ~100).
MAX_CONCURRENT_RPCS = 1000


class RpcFailure(Exception):
    """A gRPC call failed: ``code`` is the status name (``UNKNOWN``), ``details`` its
    message; web renders it as HTTP 500 with a JSON error."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details


async def _call(method: str, stub_method: Any, request: Any, timeout: float) -> Any:
    try:
        return await stub_method(request, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        raise RpcFailure(method, error.code().name, error.details() or "") from None


class EmojiClient:
    """``emojivoto.v1.EmojiService`` over one channel."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = RPC_TIMEOUT_SECONDS) -> None:
        self._stub = emoji_pb2_grpc.EmojiServiceStub(channel)
        self._timeout = timeout

    async def list_all(self) -> list[Emoji]:
        reply = cast(emoji_pb2.ListAllEmojiResponse,
                     await _call("ListAll", self._stub.ListAll,
                                 emoji_pb2.ListAllEmojiRequest(), self._timeout))
        return [Emoji(item.shortcode, item.unicode) for item in reply.list]

    async def find_by_shortcode(self, shortcode: str) -> Emoji | None:
        reply = cast(emoji_pb2.FindByShortcodeResponse,
                     await _call("FindByShortcode", self._stub.FindByShortcode,
                                 emoji_pb2.FindByShortcodeRequest(Shortcode=shortcode),
                                 self._timeout))
        if not reply.HasField("Emoji"):
            return None
        return Emoji(reply.Emoji.shortcode, reply.Emoji.unicode)


class VotingClient:
    """``emojivoto.v1.VotingService`` over one channel."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = RPC_TIMEOUT_SECONDS) -> None:
        self._stub = voting_pb2_grpc.VotingServiceStub(channel)
        self._timeout = timeout

    async def vote(self, shortcode: str) -> None:
        """Call ``Vote<Name>`` for the shortcode; KeyError if no such RPC exists."""
        method = VOTE_METHODS[shortcode]
        await _call(method, getattr(self._stub, method), voting_pb2.VoteRequest(),
                    self._timeout)

    async def results(self) -> list[tuple[str, int]]:
        reply = cast(voting_pb2.ResultsResponse,
                     await _call("Results", self._stub.Results, voting_pb2.ResultsRequest(),
                                 self._timeout))
        return [(item.Shortcode, item.Votes) for item in reply.results]


def insecure_channel(target: str) -> grpc.aio.Channel:
    """A channel to ``host:port``; grpcio applies ``grpc_proxy``/``http_proxy`` itself."""
    return grpc.aio.insecure_channel(target)


Register = Callable[[grpc.aio.Server], None]


async def serve(name: str, register: Register, host: str, port: int,
                on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop with a short grace period.

    Raises OSError when the address cannot be bound (grpcio reports that as a port of 0
    or a RuntimeError, depending on the version)."""
    server = grpc.aio.server(maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    register(server)
    address = f"{host}:{port}"
    try:
        bound = int(server.add_insecure_port(address))
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address}: {error}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    log.info("%s serving gRPC on %s:%d", name, host, bound)
    if on_ready is not None:
        on_ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("%s stopping", name)
    await server.stop(SERVER_GRACE_SECONDS)
    for task in (waiter, stopper):
        task.cancel()
