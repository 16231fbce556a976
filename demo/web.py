"""``python -m shoal.demo.web``: the demo's front end. HTTP on :8080 serving the voting
page (``/``, ``/leaderboard``, ``/js``) and the JSON API emojivoto's web has:

- ``/api/list``: every emoji (one ``ListAll`` to the emoji service);
- ``/api/vote?choice=:name:``: ``FindByShortcode`` to check the choice, then
  ``Vote<Name>`` to voting. A missing or unknown choice is 400; a failed call (the
  doughnut's UNKNOWN, or a peer down) is 500 with ``{"error": "..."}``;
- ``/api/leaderboard``: ``Results`` from voting, joined with the emoji list.

Its gRPC clients reach ``EMOJISVC_HOST`` and ``VOTINGSVC_HOST`` directly, or through a
proxy when ``grpc_proxy`` / ``http_proxy`` is set (grpcio's own support: see rpc.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from importlib import resources

from shoal.kernel.httpserve import HttpServer, Request, Response, error_response, json_response

from . import common
from .catalog import VOTE_METHODS
from .rpc import EmojiClient, RpcFailure, VotingClient, insecure_channel

log = logging.getLogger("shoal.demo.web")

HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"
NO_CACHE = (("Cache-Control", "no-cache"),)


@dataclass(frozen=True)
class StaticFiles:
    index: bytes
    script: bytes

    @classmethod
    def load(cls) -> StaticFiles:
        folder = resources.files("shoal.demo") / "static"
        return cls(index=(folder / "index.html").read_bytes(),
                   script=(folder / "app.js").read_bytes())


class WebApp:
    """Routes a request to a page or an API call; every outcome is a Response."""

    def __init__(self, emoji: EmojiClient, voting: VotingClient, static: StaticFiles) -> None:
        self.emoji = emoji
        self.voting = voting
        self.static = static

    async def handle(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD", "POST"):
            return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD, POST"),))
        path = request.path.rstrip("/") or "/"
        try:
            if path in ("/", "/leaderboard"):
                return Response(200, self.static.index, HTML, NO_CACHE)
            if path == "/js":
                return Response(200, self.static.script, JAVASCRIPT, NO_CACHE)
            if path in ("/favicon.ico", "/img/favicon.ico"):
                return Response(204)
            if path == "/api/list":
                return await self.list_emoji()
            if path == "/api/vote":
                return await self.vote(request.arg("choice"))
            if path == "/api/leaderboard":
                return await self.leaderboard()
        except RpcFailure as failure:
            log.warning("%s %s: %s", request.method, request.path, failure)
            return error_response(500, str(failure))
        return error_response(404, f"no such page: {request.path}")

    async def list_emoji(self) -> Response:
        emoji = await self.emoji.list_all()
        return json_response(200, [{"shortcode": e.shortcode, "unicode": e.unicode}
                                   for e in emoji])

    async def vote(self, choice: str | None) -> Response:
        if not choice:
            return error_response(400, "Emoji choice [] is mandatory")
        found = await self.emoji.find_by_shortcode(choice)
        if found is None or found.shortcode not in VOTE_METHODS:
            return error_response(400, f"Chosen emoji shortcode [{choice}] doesn't exist")
        await self.voting.vote(found.shortcode)
        return json_response(200, {"shortcode": found.shortcode, "unicode": found.unicode})

    async def leaderboard(self) -> Response:
        results, emoji = await asyncio.gather(self.voting.results(), self.emoji.list_all())
        unicode = {e.shortcode: e.unicode for e in emoji}
        return json_response(200, [
            {"shortcode": code, "unicode": unicode.get(code, "?"), "votes": votes}
            for code, votes in results])


async def serve(host: str, port: int, emoji_address: str, voting_address: str) -> None:
    static = StaticFiles.load()
    emoji_channel = insecure_channel(emoji_address)
    voting_channel = insecure_channel(voting_address)
    app = WebApp(EmojiClient(emoji_channel), VotingClient(voting_channel), static)
    server = HttpServer(app.handle, "web")
    try:
        bound = await server.start(host, port)
        log.info("web serving HTTP on %s:%d (emoji at %s, voting at %s)",
                 host, bound, emoji_address, voting_address)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("web stopping")
    finally:
        await server.stop()
        await emoji_channel.close()
        await voting_channel.close()


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("shoal-demo-web", "the demo's web front end (HTTP)")
    parser.add_argument("--host", default=common.LOOPBACK, help="listen address")
    parser.add_argument("--port", type=common.port,
                        default=common.env_port(common.ENV_WEB_PORT, common.DEFAULT_WEB_PORT),
                        help="listen port (env WEB_PORT; 0 picks a free one)")
    parser.add_argument("--emoji-addr", type=common.address,
                        default=common.env_address(common.ENV_EMOJI_HOST,
                                                   common.DEFAULT_EMOJI_ADDRESS),
                        help="the emoji service, HOST:PORT (env EMOJISVC_HOST)")
    parser.add_argument("--voting-addr", type=common.address,
                        default=common.env_address(common.ENV_VOTING_HOST,
                                                   common.DEFAULT_VOTING_ADDRESS),
                        help="the voting service, HOST:PORT (env VOTINGSVC_HOST)")
    args = parser.parse_args(argv)
    common.run(parser.prog, serve(args.host, args.port, args.emoji_addr, args.voting_addr),
               args.log_level)


if __name__ == "__main__":
    main()
