"""``shoal demo`` (``make demo``): Shoal's main job on one machine.

The bus and the control plane (as ``shoal up``), then the emojivoto-like demo meshed:
every workload under ``shoal run`` (its own sidecar proxy, registered on the bus), two
voting replicas so balancing shows, and the vote-bot for a steady load. web listens on
127.0.0.1:8080 as the seed's port-forward, the dashboard on 127.0.0.1:8084. The demo's
services call each other by name (``emoji.emojivoto:8080``) through their proxies: web's
gRPC clients through ``grpc_proxy`` (HTTP CONNECT), the bot through ``http_proxy``.
``--unmeshed`` runs the same application without Shoal, for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import nats
from rich.console import Console

from shoal.schemas import names
from shoal.schemas.codec import Decoder
from shoal.schemas.endpoints import EndpointSet

from .up import DASHBOARD_PORT, Child, Supervisor, free_port, start_control_plane

NAMESPACE = "emojivoto"
WEB_PORT = 8080
SERVICE_PORT = 8080  # the port in the names the apps call (as emojivoto's Services)
WEB_READY_TIMEOUT_SECONDS = 60.0  # four proxies, certificates and gRPC imports
BOT_RATE = 1.0  # rounds per second, as emojivoto's vote-bot


@dataclass(frozen=True)
class Workload:
    name: str  # the workload (deployment) name
    service: str  # the service it serves ("" for none: the bot)
    app: list[str]  # the app's module and arguments, without the listen port
    port: int = 0  # 0: a free port


def workloads(web_port: int, voting_replicas: int,
              bot_rate: float = BOT_RATE) -> list[Workload]:
    emoji = f"emoji.{NAMESPACE}:{SERVICE_PORT}"
    voting = f"voting.{NAMESPACE}:{SERVICE_PORT}"
    web = f"web.{NAMESPACE}:{SERVICE_PORT}"
    out = [Workload("emoji", "emoji", ["shoal.demo.emoji"])]
    out += [Workload("voting", "voting", ["shoal.demo.voting"])] * voting_replicas
    out.append(Workload("web", "web", ["shoal.demo.web", "--emoji-addr", emoji,
                                       "--voting-addr", voting], port=web_port))
    out.append(Workload("vote-bot", "", ["shoal.demo.vote_bot", "--web", web,
                                         "--rate", f"{bot_rate:g}"]))
    return out


def run_argv(workload: Workload, state_dir: Path, pod: str) -> tuple[list[str], int]:
    argv = [sys.executable, "-m", "shoal.cli", "run", "--namespace", NAMESPACE,
            "--workload", workload.name, "--pod", pod, "--state-dir", str(state_dir)]
    app = [sys.executable, "-m", *workload.app]
    port = 0
    if workload.service:
        port = workload.port or free_port()
        argv += ["--service", workload.service, "--port", str(port)]
        app += ["--host", "127.0.0.1", "--port", str(port)]
    else:
        argv += ["--service", workload.name]
    return [*argv, "--", *app], port


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _wait_http(port: int, timeout: float, children: list[Child]) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if any(c.process is not None and c.process.returncode is not None for c in children):
            return False
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /api/list HTTP/1.1\r\nHost: localhost\r\n"
                             b"Connection: close\r\n\r\n")
                status = await reader.readline()
                writer.close()
                if b" 200 " in status:
                    return True
        await asyncio.sleep(0.2)
    return False


async def _wait_endpoints(supervisor: Supervisor, wanted: dict[str, int], timeout: float,
                          children: list[Child]) -> bool:
    """Until discovery has every backend web calls, so web's first calls find them (the
    demo's table then starts without start-up failures)."""
    operator = supervisor.settings("operator")
    nc = await nats.connect(operator.url, user=operator.user, password=operator.password)
    decoder: Decoder[EndpointSet] = Decoder(EndpointSet, names.BUCKET_ENDPOINTS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        kv = await nc.jetstream().key_value(names.BUCKET_ENDPOINTS)
        while loop.time() < deadline:
            if any(c.process is not None and c.process.returncode is not None
                   for c in children):
                return False
            found = {}
            for service in wanted:
                with contextlib.suppress(Exception):
                    entry = await kv.get(names.service_key(NAMESPACE, service))
                    found[service] = len(decoder.decode(entry.value or b"").endpoints)
            if all(found.get(service, 0) >= count for service, count in wanted.items()):
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await nc.close()


async def run_demo(state_dir: Path, console: Console, nats_port: int, web_port: int,
                   dashboard_port: int, voting_replicas: int,
                   bot_rate: float = BOT_RATE) -> int:
    if not _port_free(web_port):
        console.print(f"[red]error:[/] port {web_port} is taken; choose another with "
                      "--web-port")
        return 1
    supervisor = Supervisor(state_dir=state_dir, console=console, nats_port=nats_port)
    supervisor.install_signal_handlers()
    try:
        if not await start_control_plane(supervisor, dashboard_port):
            return 1
        started: list[Child] = []
        counts: dict[str, int] = {}

        async def launch(workload: Workload) -> None:
            counts[workload.name] = counts.get(workload.name, 0) + 1
            pod = f"{workload.name}-{counts[workload.name]}"
            argv, _ = run_argv(workload, state_dir, pod)
            child = Child(name=pod, argv=argv, env={})
            await supervisor.start_child(child, "bright_blue")
            started.append(child)

        # In the order of who calls whom: backends, then web once discovery has them,
        # then the bot once web answers.
        plan = workloads(web_port, voting_replicas, bot_rate)
        backends = [w for w in plan if w.name in ("emoji", "voting")]
        for workload in backends:
            await launch(workload)
        wanted = {"emoji": 1, "voting": voting_replicas}
        if not await _wait_endpoints(supervisor, wanted, WEB_READY_TIMEOUT_SECONDS, started):
            console.print("[red]error:[/] emoji and voting did not register; see the logs")
            return 1
        for workload in plan:
            if workload.name == "web":
                await launch(workload)
        if not await _wait_http(web_port, WEB_READY_TIMEOUT_SECONDS, started):
            console.print("[red]error:[/] the demo did not come up; see the logs above")
            return 1
        for workload in plan:
            if workload.name == "vote-bot":
                await launch(workload)
        console.print()
        console.print(f"[bold green]emojivoto[/] (meshed) at http://127.0.0.1:{web_port}")
        console.print(f"[bold green]dashboard[/]          at {supervisor.dashboard_url}")
        hint = f" SHOAL_STATE_DIR={state_dir}" if state_dir else ""
        console.print(f"try:{hint} shoal viz top deploy/web -n {NAMESPACE}   "
                      "(Ctrl-C stops everything)")
        await supervisor.stopping.wait()
        console.print("stopping: the demo, then the control plane, then the bus")
        return 0
    finally:
        await supervisor.stop()
        console.print("stopped")


DEFAULT_DASHBOARD_PORT = DASHBOARD_PORT
