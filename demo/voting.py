"""``python -m shoal.demo.voting``: the voting service (gRPC
``emojivoto.v1.VotingService``): one ``Vote<Name>`` RPC per emoji counting into this
replica's in-memory poll, and ``Results``. ``VoteDoughnut`` fails on purpose with gRPC
status UNKNOWN and message ``ERROR`` (what emojivoto's Go server returns for a plain
error), so the mesh has a failing route to find."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from . import common
from .catalog import SHORTCODE_OF_METHOD
from .poll import DoughnutFailure, Poll
from .proto import voting_pb2, voting_pb2_grpc
from .rpc import serve

log = logging.getLogger("shoal.demo.voting")

VoteHandler = Callable[[voting_pb2.VoteRequest, Any], Awaitable[voting_pb2.VoteResponse]]


class VotingServicer:
    """The handlers. The ``Vote<Name>`` methods are looked up by name (grpcio's generated
    registration asks for each RPC of voting.proto), so the catalog is the one list."""

    def __init__(self, poll: Poll | None = None) -> None:
        self.poll = poll if poll is not None else Poll()

    def __getattr__(self, name: str) -> VoteHandler:
        shortcode = SHORTCODE_OF_METHOD.get(name)
        if shortcode is None:
            raise AttributeError(name)
        return functools.partial(self._vote, shortcode)

    async def _vote(self, shortcode: str, request: voting_pb2.VoteRequest,
                    context: Any) -> voting_pb2.VoteResponse:
        try:
            self.poll.vote(shortcode)
        except DoughnutFailure as failure:
            await context.abort(grpc.StatusCode.UNKNOWN, str(failure))
        return voting_pb2.VoteResponse()

    async def Results(self, request: voting_pb2.ResultsRequest,
                      context: Any) -> voting_pb2.ResultsResponse:
        return voting_pb2.ResultsResponse(results=[
            voting_pb2.VotingResult(Shortcode=code, Votes=votes)
            for code, votes in self.poll.results()])


def register(server: grpc.aio.Server) -> None:
    voting_pb2_grpc.add_VotingServiceServicer_to_server(VotingServicer(), server)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("shoal-demo-voting", "the demo's voting service (gRPC)")
    parser.add_argument("--host", default=common.LOOPBACK, help="listen address")
    parser.add_argument("--port", type=common.port,
                        default=common.env_port(common.ENV_GRPC_PORT,
                                                common.DEFAULT_VOTING_PORT),
                        help="listen port (env GRPC_PORT; 0 picks a free one)")
    args = parser.parse_args(argv)
    common.run(parser.prog, serve("voting", register, args.host, args.port), args.log_level)


if __name__ == "__main__":
    main()
