"""``shoal up``: the bus and the control plane as processes on one machine.

Starts the embedded NATS, creates the buckets, writes ``<state>/bus.json`` so other
commands find the bus, starts every control-plane service as a child process, prefixes
their logs, and on Ctrl-C or SIGTERM stops the services (which drain), then NATS.
Children are in their own sessions (the terminal's Ctrl-C reaches only us, so the order
of shutdown is ours) and die with us if we are killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nats
from rich.console import Console

from shoal.kernel.bus import ensure_buckets
from shoal.kernel.config import (
    ENV_STATE_DIR,
    BusFile,
    BusSettings,
    bus_environment,
    default_state_dir,
    generate_credentials,
    read_bus_file,
    write_bus_file,
)
from shoal.kernel.identity_store import IdentityMaterialError
from shoal.kernel.natsd import EmbeddedNats
from shoal.kernel.process import die_with_parent

from .identity import ensure_identity

# The control-plane services that exist, in start order.
SERVICES: tuple[str, ...] = ("destination", "policy", "identity", "tap", "metrics",
                             "dashboard")
DASHBOARD_PORT = 8084  # services/dashboard's default port, on 127.0.0.1
CHILD_STOP_TIMEOUT_SECONDS = 12.0  # a service drains in-flight work within 10 s
READY_TIMEOUT_SECONDS = 20.0
LOG_LINE_LIMIT = 64 * 1024

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_green",
           "bright_cyan")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_port: int | None = None
    process: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None


@dataclass
class Supervisor:
    """Runs NATS and children until told to stop; reusable by ``shoal demo``."""

    state_dir: Path
    console: Console
    nats_port: int = -1
    children: list[Child] = field(default_factory=list)
    nats: EmbeddedNats | None = None
    bus: BusFile | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Queue[Child] = field(default_factory=asyncio.Queue)
    dashboard_url: str = ""

    def settings(self, role: str) -> BusSettings:
        assert self.bus is not None
        creds = self.bus.credentials[role]
        return BusSettings(url=self.bus.url, user=creds.user, password=creds.password,
                           role=role)

    async def start_bus(self) -> None:
        credentials = generate_credentials()
        with contextlib.suppress(Exception):
            credentials = read_bus_file(self.state_dir).credentials  # stable across restarts
        self.nats = EmbeddedNats(state_dir=self.state_dir, credentials=credentials,
                                 port=self.nats_port)
        # started from this (the main) thread: PR_SET_PDEATHSIG is tied to the forking
        # thread, and a pool thread could exit and take nats-server with it
        url = self.nats.start()
        self.bus = BusFile(url=url, credentials=credentials, pid=os.getpid())
        write_bus_file(self.state_dir, self.bus)
        operator = self.settings("operator")
        nc = await nats.connect(url, user=operator.user, password=operator.password)
        try:
            await ensure_buckets(nc.jetstream())
        finally:
            await nc.close()

    async def start_child(self, child: Child, colour: str) -> None:
        env = {**os.environ, **child.env, "PYTHONUNBUFFERED": "1"}
        child.process = await asyncio.create_subprocess_exec(
            *child.argv, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent, limit=LOG_LINE_LIMIT)
        self.children.append(child)
        child.pump = asyncio.create_task(self._pump(child, colour))

    async def start_service(self, name: str, *args: str) -> Child:
        port = free_port()
        child = Child(
            name=name,
            argv=[sys.executable, "-m", f"shoal.services.{name}", "--health-port", str(port),
                  *args],
            # The state directory tells a service where its files are (identity's issuer).
            env={**bus_environment(self.settings("controller")),
                 ENV_STATE_DIR: str(self.state_dir)},
            health_port=port,
        )
        await self.start_child(child, COLOURS[len(self.children) % len(COLOURS)])
        return child

    async def _pump(self, child: Child, colour: str) -> None:
        assert child.process is not None and child.process.stdout is not None
        prefix = f"[{colour}]{child.name:>12}[/] |"
        while True:
            try:
                line = await child.process.stdout.readline()
            except ValueError:  # a line over the limit: skip it, keep the stream
                continue
            if not line:
                break
            self.console.print(prefix, line.decode(errors="replace").rstrip(),
                               markup=True, highlight=False, soft_wrap=True)
        await child.process.wait()
        if not self.stopping.is_set():
            self.console.print(f"{prefix} exited with status {child.process.returncode}")
        await self.exited.put(child)

    async def wait_ready(self, child: Child) -> bool:
        """Poll the child's /ready until it answers 200 or the timeout passes."""
        if child.health_port is None:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_SECONDS
        while loop.time() < deadline:
            if child.process is not None and child.process.returncode is not None:
                return False
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", child.health_port)
                writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
                status = await reader.readline()
                writer.close()
                if b" 200 " in status:
                    return True
            await asyncio.sleep(0.1)
        return False

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)

    async def stop(self) -> None:
        """Services first (SIGTERM, they drain), in reverse start order; then NATS."""
        self.stopping.set()
        for child in reversed(self.children):
            proc = child.process
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            proc = child.process
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), CHILD_STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            if child.pump is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(child.pump, 2.0)
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)


async def start_control_plane(supervisor: Supervisor, dashboard_port: int) -> bool:
    """The bus, identity material and every service, each reported as it turns ready.
    ``dashboard_port`` 0 picks a free port (tests; a second ``shoal up``)."""
    console, state_dir = supervisor.console, supervisor.state_dir
    await supervisor.start_bus()
    assert supervisor.bus is not None
    console.print(f"[bold]bus[/]        {supervisor.bus.url}  (JetStream, store in "
                  f"{state_dir / 'nats'})")
    console.print(f"[bold]credentials[/] {state_dir / 'bus.json'} (roles: proxy, "
                  "controller, operator)")
    try:
        created = ensure_identity(state_dir)
    except (IdentityMaterialError, OSError) as error:
        console.print(f"[red]error:[/] cannot create identity material: {error}")
        return False
    if created is not None:
        console.print(f"[bold]identity[/]    new trust anchor and issuer in "
                      f"{created.identity_dir} (anchor key: {created.anchor_dir})")
    # Started together (they meet only on the bus, so order does not matter), then
    # reported in order: start-up costs the slowest service, not the sum of them.
    dashboard_port = dashboard_port or free_port()
    children = []
    for name in SERVICES:
        args = ("--port", str(dashboard_port)) if name == "dashboard" else ()
        children.append(await supervisor.start_service(name, *args))
    all_ready = True
    for name, child in zip(SERVICES, children, strict=True):
        ready = await supervisor.wait_ready(child)
        all_ready = all_ready and ready
        state = "ready" if ready else "[red]not ready[/]"
        console.print(f"[bold]{name:<11}[/] {state}, health http://127.0.0.1:"
                      f"{child.health_port}/ready")
        if name == "dashboard" and ready:
            supervisor.dashboard_url = f"http://127.0.0.1:{dashboard_port}/"
            console.print(f"[bold]{'':<11}[/] open {supervisor.dashboard_url}")
    return all_ready


async def run_up(state_dir: Path, console: Console, nats_port: int,
                 dashboard_port: int = DASHBOARD_PORT) -> int:
    supervisor = Supervisor(state_dir=state_dir, console=console, nats_port=nats_port)
    supervisor.install_signal_handlers()
    try:
        if not await start_control_plane(supervisor, dashboard_port):
            return 1
        hint = "" if state_dir == default_state_dir() else f" (SHOAL_STATE_DIR={state_dir})"
        console.print(f"Other shells find this bus through {state_dir / 'bus.json'}{hint}. "
                      "Ctrl-C stops everything.")
        await supervisor.stopping.wait()
        console.print("stopping: services drain, then the bus")
        return 0
    finally:
        await supervisor.stop()
        console.print("stopped")
