"""``shoal run``: the one-machine equivalent of injection.

Starts a sidecar proxy for an application, waits until the proxy is ready (so the app
never starts before its proxy: linkerd2 #2704), starts the app with the environment that
sends its calls through the proxy, and when the app exits drains and stops the proxy and
exits with the app's status (jobs never hang on their sidecar: linkerd2 #1869). SIGTERM
or Ctrl-C is passed to the app; the proxy drains after the app has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shoal.kernel.config import default_state_dir
from shoal.kernel.identity_store import (
    IdentityMaterialError,
    default_identity_dir,
    material_exists,
    mint_join_token,
)
from shoal.kernel.process import die_with_parent
from shoal.proxy.config import IDENTITY_TOKEN_ENV

PROXY_READY_TIMEOUT_SECONDS = 30.0  # certificate + first bus contact, with headroom
READY_POLL_INTERVAL_SECONDS = 0.05
APP_STOP_TIMEOUT_SECONDS = 15.0  # after SIGTERM, then SIGKILL
PROXY_STOP_TIMEOUT_SECONDS = 15.0  # the proxy drains for 10 s at most
HTTP_TIMEOUT_SECONDS = 2.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunSpec:
    namespace: str
    service: str
    command: list[str]
    port: int = 0  # the app's port: the inbound proxy forwards to it (0: none)
    workload: str = ""
    pod: str = ""
    outbound_port: int = 0  # 0: a free port
    inbound_port: int = 0
    admin_port: int = 0
    upstreams: tuple[str, ...] = ()
    proxy_args: tuple[str, ...] = ()
    state_dir: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Ports:
    outbound: int
    inbound: int
    admin: int


class RunFailed(RuntimeError):
    pass


def identity_for(spec: RunSpec, env: dict[str, str]) -> list[str]:
    """A join token for the proxy, minted from the state directory's identity material
    (as ``shoal identity token`` would), into the proxy's environment; or, where there is
    no material (a bus that ``shoal up`` did not start), a proxy without identity."""
    identity_dir = default_identity_dir(spec.state_dir or default_state_dir())
    if not material_exists(identity_dir):
        print(f"shoal run: no identity material in {identity_dir}: the proxy runs without "
              "an identity (no mutual TLS)", file=sys.stderr)
        return ["--no-identity"]
    try:
        minted = mint_join_token(identity_dir, spec.namespace, spec.workload or spec.service)
    except (IdentityMaterialError, ValueError) as error:
        raise RunFailed(f"cannot mint a join token: {error}") from None
    env[IDENTITY_TOKEN_ENV] = minted.token
    return []


def proxy_argv(spec: RunSpec, ports: Ports, pod: str) -> list[str]:
    workload = spec.workload or spec.service
    argv = [sys.executable, "-m", "shoal.proxy",
            "--namespace", spec.namespace, "--service", spec.service,
            "--workload", workload, "--pod", pod,
            "--outbound-port", str(ports.outbound), "--inbound-port", str(ports.inbound),
            "--admin-port", str(ports.admin)]
    if spec.port:
        argv += ["--app-port", str(spec.port)]
    for upstream in spec.upstreams:
        argv += ["--upstream", upstream]
    return argv + list(spec.proxy_args)


def app_environment(base: Mapping[str, str], spec: RunSpec, ports: Ports,
                    pod: str) -> dict[str, str]:
    """What tells the app where its proxy is. Clients that honour the proxy variables
    (requests, httpx, urllib, grpcio) then need no change at all; loopback stays direct."""
    outbound = f"127.0.0.1:{ports.outbound}"
    env = dict(base)
    env.update({
        "SHOAL_OUTBOUND": outbound,
        "SHOAL_NAMESPACE": spec.namespace,
        "SHOAL_SERVICE": spec.service,
        "SHOAL_POD": pod,
        "http_proxy": f"http://{outbound}",
        "HTTP_PROXY": f"http://{outbound}",
        "grpc_proxy": f"http://{outbound}",
        "no_proxy": "localhost,127.0.0.1,::1",
        "NO_PROXY": "localhost,127.0.0.1,::1",
    })
    # https_proxy is left alone: TLS the app originates itself is opaque to the proxy.
    env.update(spec.extra_env)
    return env


async def wait_ready(admin_port: int, proxy: asyncio.subprocess.Process,
                     timeout: float = PROXY_READY_TIMEOUT_SECONDS) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    while loop.time() < deadline:
        if proxy.returncode is not None:
            raise RunFailed(f"the proxy exited with status {proxy.returncode} before it was ready")
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(HTTP_TIMEOUT_SECONDS):
                reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
                writer.write(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                response = await reader.read(4096)
                writer.close()
                if response.startswith(b"HTTP/1.1 200"):
                    return
                last = response.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
        await asyncio.sleep(READY_POLL_INTERVAL_SECONDS)
    raise RunFailed(f"the proxy was not ready within {timeout:.0f}s ({last})")


async def _stop(process: asyncio.subprocess.Process, timeout: float) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def run(spec: RunSpec) -> int:
    """Returns the app's exit status (128+N when a signal N ended it, as shells do)."""
    ports = Ports(outbound=spec.outbound_port or free_port(),
                  inbound=spec.inbound_port or free_port(),
                  admin=spec.admin_port or free_port())
    pod = spec.pod or f"{spec.workload or spec.service}-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ)
    if spec.state_dir is not None:
        env["SHOAL_STATE_DIR"] = str(spec.state_dir)
    app_env = app_environment(env, spec, ports, pod)  # before the token: it is the proxy's
    identity_args = identity_for(spec, env)
    proxy = await asyncio.create_subprocess_exec(
        *proxy_argv(spec, ports, pod), *identity_args, env=env, stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=die_with_parent)
    app: asyncio.subprocess.Process | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        ready = asyncio.create_task(wait_ready(ports.admin, proxy))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            return 128 + signal.SIGTERM
        ready.result()
        try:
            app = await asyncio.create_subprocess_exec(
                *spec.command, env=app_env,
                preexec_fn=die_with_parent)
        except OSError as error:
            raise RunFailed(f"cannot start {spec.command[0]}: {error.strerror}") from None
        exited = asyncio.create_task(app.wait())
        await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            await _stop(app, APP_STOP_TIMEOUT_SECONDS)
        code = app.returncode if app.returncode is not None else 1
        return code if code >= 0 else 128 - code
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if app is not None and app.returncode is None:
            await _stop(app, APP_STOP_TIMEOUT_SECONDS)
        await _stop(proxy, PROXY_STOP_TIMEOUT_SECONDS)


def run_command(spec: RunSpec) -> int:
    import uvloop

    try:
        return uvloop.run(run(spec))
    except RunFailed as error:
        print(f"shoal run: {error}", file=sys.stderr)
        return 1
