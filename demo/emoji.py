"""``python -m shoal.demo.emoji``: the emoji service (gRPC ``emojivoto.v1.EmojiService``):
``ListAll`` answers the catalog, ``FindByShortcode`` one entry or none (OK with the emoji
unset, as emojivoto does; web turns that into HTTP 400)."""

from __future__ import annotations

from typing import Any

import grpc

from . import common
from .catalog import BY_SHORTCODE, EMOJI
from .proto import emoji_pb2, emoji_pb2_grpc
from .rpc import serve


class EmojiServicer:
    """The handlers; grpcio finds them by the RPC names of emoji.proto."""

    def __init__(self) -> None:
        # built once: every ListAll answers the same message
        self._all = emoji_pb2.ListAllEmojiResponse(
            list=[emoji_pb2.Emoji(unicode=e.unicode, shortcode=e.shortcode) for e in EMOJI])

    async def ListAll(self, request: emoji_pb2.ListAllEmojiRequest,
                      context: Any) -> emoji_pb2.ListAllEmojiResponse:
        return self._all

    async def FindByShortcode(self, request: emoji_pb2.FindByShortcodeRequest,
                              context: Any) -> emoji_pb2.FindByShortcodeResponse:
        found = BY_SHORTCODE.get(request.Shortcode)
        if found is None:
            return emoji_pb2.FindByShortcodeResponse()
        return emoji_pb2.FindByShortcodeResponse(
            Emoji=emoji_pb2.Emoji(unicode=found.unicode, shortcode=found.shortcode))


def register(server: grpc.aio.Server) -> None:
    emoji_pb2_grpc.add_EmojiServiceServicer_to_server(EmojiServicer(), server)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("shoal-demo-emoji", "the demo's emoji service (gRPC)")
    parser.add_argument("--host", default=common.LOOPBACK, help="listen address")
    parser.add_argument("--port", type=common.port,
                        default=common.env_port(common.ENV_GRPC_PORT, common.DEFAULT_EMOJI_PORT),
                        help="listen port (env GRPC_PORT; 0 picks a free one)")
    args = parser.parse_args(argv)
    common.run(parser.prog, serve("emoji", register, args.host, args.port), args.log_level)


if __name__ == "__main__":
    main()
