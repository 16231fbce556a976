"""``python -m shoal.demo.local``: the whole demo on loopback without a mesh: emoji, two
voting replicas, web and the vote-bot as child processes, their output prefixed with
their names, the URL printed, and everything stopped on Ctrl-C or SIGTERM.

Without a mesh web can only be given one voting address, so it uses the first replica and
the second stays idle: the comparison the meshed demo exists for (there, the proxy
balances web's calls over both). Children run in their own sessions, so the terminal's
Ctrl-C reaches only this launcher, which then stops them in reverse order; they also die
with it if it is killed outright, so no orphans are left either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from shoal.kernel.process import die_with_parent

from . import common

log = logging.getLogger("shoal.demo.local")

# A child must accept connections within this long of starting (a Python process with
# grpcio imported starts in about a second on this kind of machine).
READY_TIMEOUT_SECONDS = 20.0
READY_POLL_SECONDS = 0.05
# On stop each child gets this long after SIGTERM (the gRPC servers' grace is 1 s, web's
# 2 s) before it is killed.
STOP_TIMEOUT_SECONDS = 5.0
# Lines longer than this from a child are dropped, not buffered without bound.
LOG_LINE_LIMIT = 64 * 1024


def free_port(host: str = common.LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_environment() -> dict[str, str]:
    """Ours, less any proxy variables (unmeshed means direct), unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in common.PROXY_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Child:
    name: str
    argv: list[str]
    port: int | None = None  # ready once this accepts connections
    process: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None


class ChildFailed(Exception):
    """A child exited or did not become ready; the demo cannot go on."""


@dataclass
class LocalDemo:
    web_port: int = common.DEFAULT_WEB_PORT
    host: str = common.LOOPBACK
    voting_replicas: int = 2
    bot_rate: float | None = 1.0  # None: no vote-bot
    log_level: str = "info"
    children: list[Child] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def module(self, name: str, *args: str) -> list[str]:
        return [sys.executable, "-m", f"shoal.demo.{name}", "--log-level", self.log_level,
                *args]

    async def start(self) -> str:
        """Start every child in order, each once the ones it calls are ready; returns
        the URL of the app."""
        try:
            with socket.socket() as probe:
                # as web's server will: connections in TIME_WAIT do not hold the port
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((self.host, self.web_port))
        except OSError as error:
            raise ChildFailed(f"web cannot listen on {self.host}:{self.web_port}: "
                              f"{error.strerror} (choose another with --web-port)") from None
        emoji_port = free_port(self.host)
        voting_ports = [free_port(self.host) for _ in range(self.voting_replicas)]
        await self.launch(Child("emoji", self.module("emoji", "--host", self.host,
                                                     "--port", str(emoji_port)), emoji_port))
        for index, port in enumerate(voting_ports, 1):
            await self.launch(Child(f"voting-{index}", self.module(
                "voting", "--host", self.host, "--port", str(port)), port))
        await self.launch(Child("web", self.module(
            "web", "--host", self.host, "--port", str(self.web_port),
            "--emoji-addr", f"{self.host}:{emoji_port}",
            "--voting-addr", f"{self.host}:{voting_ports[0]}"), self.web_port))
        if self.bot_rate is not None:
            await self.launch(Child("vote-bot", self.module(
                "vote_bot", "--web", f"{self.host}:{self.web_port}",
                "--rate", f"{self.bot_rate:g}")))
        return f"http://{self.host}:{self.web_port}"

    async def launch(self, child: Child) -> None:
        child.process = await asyncio.create_subprocess_exec(
            *child.argv, env=child_environment(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent, limit=LOG_LINE_LIMIT)
        self.children.append(child)
        child.pump = asyncio.create_task(self._pump(child))
        print(f"{'started':>9} {child.name} (pid {child.process.pid})", flush=True)
        if child.port is not None:
            await self._wait_ready(child)

    async def _wait_ready(self, child: Child) -> None:
        assert child.process is not None and child.port is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_SECONDS
        while loop.time() < deadline:
            if child.process.returncode is not None:
                raise ChildFailed(f"{child.name} exited with status {child.process.returncode}")
            try:
                _, writer = await asyncio.open_connection(self.host, child.port)
            except OSError:
                await asyncio.sleep(READY_POLL_SECONDS)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        raise ChildFailed(f"{child.name} did not listen on port {child.port} "
                          f"within {READY_TIMEOUT_SECONDS:g} s")

    async def _pump(self, child: Child) -> None:
        assert child.process is not None and child.process.stdout is not None
        prefix = f"{child.name:>9} |"
        while True:
            try:
                line = await child.process.stdout.readline()
            except ValueError:  # a line over the limit: skip it, keep the stream
                continue
            if not line:
                break
            print(prefix, line.decode(errors="replace").rstrip(), flush=True)
        await child.process.wait()
        if not self.stopping.is_set():
            print(f"{prefix} exited with status {child.process.returncode}", flush=True)
            self.stopping.set()

    async def stop(self) -> None:
        """Stop the children one by one, last started first (the bot before web, web
        before what it calls, so no one sees its peer vanish mid-request): SIGTERM, then
        a kill for any that outstays the timeout."""
        self.stopping.set()
        for child in reversed(self.children):
            proc = child.process
            if proc is None:
                continue
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning("%s did not stop in %g s; killing it", child.name,
                            STOP_TIMEOUT_SECONDS)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            if child.pump is not None:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(child.pump, STOP_TIMEOUT_SECONDS)
            print(f"{'stopped':>9} {child.name} (status {proc.returncode})", flush=True)


async def run_local(demo: LocalDemo) -> int:
    """Run until SIGINT/SIGTERM (status 0) or until a child fails (status 1)."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    status = 0
    try:
        starting = asyncio.create_task(demo.start())
        waiter = asyncio.create_task(signalled.wait())
        await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            url = starting.result()
            print(f"\nemojivoto (unmeshed) at {url}   (Ctrl-C stops it)\n", flush=True)
            failed = asyncio.create_task(demo.stopping.wait())
            await asyncio.wait({failed, waiter}, return_when=asyncio.FIRST_COMPLETED)
            status = 0 if signalled.is_set() else 1
            failed.cancel()
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChildFailed):
                await starting
        waiter.cancel()
    except ChildFailed as error:
        print(f"demo: {error}", file=sys.stderr, flush=True)
        status = 1
    finally:
        await demo.stop()
    return status


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("shoal-demo-local",
                           "the demo on loopback without a mesh (emoji, voting x2, web, "
                           "vote-bot)")
    parser.add_argument("--web-port", type=common.port,
                        default=common.env_port(common.ENV_WEB_PORT, common.DEFAULT_WEB_PORT),
                        help="web's port (env WEB_PORT, default 8080)")
    parser.add_argument("--host", default=common.LOOPBACK,
                        help="listen address of every service (default 127.0.0.1)")
    parser.add_argument("--bot-rate", type=float, default=1.0,
                        help="vote-bot rounds per second (default 1)")
    parser.add_argument("--no-bot", action="store_true", help="do not start the vote-bot")
    args = parser.parse_args(argv)
    if args.web_port == 0:
        parser.error("--web-port must be a fixed port (it is printed as the app's URL)")
    if not args.bot_rate > 0:
        parser.error("--bot-rate must be above 0 (use --no-bot for none)")
    demo = LocalDemo(web_port=args.web_port, host=args.host,
                     bot_rate=None if args.no_bot else args.bot_rate, log_level=args.log_level)
    common.run(parser.prog, run_local(demo), args.log_level)


if __name__ == "__main__":
    main()
