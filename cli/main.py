"""The ``shoal`` command: exit 0 ok, 1 error, 2 usage (as Linkerd's CLI)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shoal import __version__
from shoal.kernel.config import default_state_dir

app = typer.Typer(no_args_is_help=True, add_completion=True,
                  help="Shoal: a service mesh whose control plane runs on NATS.",
                  pretty_exceptions_enable=False)
schema_app = typer.Typer(no_args_is_help=True, help="The wire contract.")
app.add_typer(schema_app, name="schema")

StateDir = Annotated[Path | None, typer.Option(
    "--state-dir", envvar="SHOAL_STATE_DIR",
    help="where the bus keeps its data (default ~/.local/state/shoal)")]


def console() -> Console:
    return Console(stderr=False)


def fail(message: str) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(1)


@app.command()
def version() -> None:
    """Print Shoal's version."""
    print(f"shoal {__version__}")


@app.command()
def up(
    state_dir: StateDir = None,
    nats_port: Annotated[int, typer.Option(help="NATS client port (-1: any free port)")] = -1,
    dashboard_port: Annotated[int, typer.Option(
        min=0, max=65535, help="web dashboard port on 127.0.0.1 (0: any free port)")] = 8084,
) -> None:
    """Start the bus (NATS with JetStream) and the control plane on this machine."""
    from .up import run_up

    status = asyncio.run(run_up(state_dir or default_state_dir(), console(), nats_port,
                                dashboard_port))
    raise typer.Exit(status)


@app.command()
def demo(
    state_dir: StateDir = None,
    nats_port: Annotated[int, typer.Option(help="NATS client port (-1: any free port)")] = -1,
    web_port: Annotated[int, typer.Option(help="the demo app's port")] = 8080,
    dashboard_port: Annotated[int, typer.Option(help="the dashboard's port")] = 8084,
    voting_replicas: Annotated[int, typer.Option(min=1, max=8)] = 2,
    bot_rate: Annotated[float, typer.Option(min=0.1, max=100,
                                            help="vote-bot rounds per second")] = 1.0,
    unmeshed: Annotated[bool, typer.Option(
        "--unmeshed", help="run the demo app without Shoal, to compare")] = False,
) -> None:
    """Shoal's main job on one machine: the bus, the control plane, the emojivoto demo
    meshed with a proxy per workload, and the dashboard."""
    if unmeshed:
        from shoal.demo.local import LocalDemo, run_local

        raise typer.Exit(asyncio.run(run_local(LocalDemo(
            web_port=web_port, voting_replicas=voting_replicas))))
    from .demo import run_demo

    status = asyncio.run(run_demo(state_dir or default_state_dir(), console(), nats_port,
                                  web_port, dashboard_port, voting_replicas, bot_rate))
    raise typer.Exit(status)


@schema_app.command("export")
def schema_export(directory: Path) -> None:
    """Write the JSON Schema of every bus message into DIRECTORY."""
    from shoal.schemas.contract import json_schemas

    directory.mkdir(parents=True, exist_ok=True)
    for file_name, text in json_schemas().items():
        (directory / file_name).write_bytes(text)
    print(f"wrote {len(json_schemas())} schemas to {directory}")


from . import policy as _policy  # noqa: E402  (registers `shoal policy`)

app.add_typer(_policy.app, name="policy")
from . import proxy as _proxy  # noqa: E402  (registers `shoal proxy`)

app.command("proxy", context_settings=_proxy.PASS_THROUGH, add_help_option=False)(_proxy.proxy)

from . import identity as _identity  # noqa: E402  (registers `shoal identity`)

app.add_typer(_identity.app, name="identity")

@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="the application and its arguments")],
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="the app's namespace")],
    service: Annotated[str, typer.Option(help="the service the app serves")],
    port: Annotated[int, typer.Option(
        help="the port the app listens on (inbound target; 0: the app serves nothing)")] = 0,
    workload: Annotated[str, typer.Option(help="workload name (default: the service)")] = "",
    pod: Annotated[str, typer.Option(help="pod name (default: <workload>-<random>)")] = "",
    outbound_port: Annotated[int, typer.Option(help="0: a free port")] = 0,
    inbound_port: Annotated[int, typer.Option(help="0: a free port")] = 0,
    admin_port: Annotated[int, typer.Option(help="0: a free port")] = 0,
    upstream: Annotated[list[str] | None, typer.Option(
        help="LOCALPORT=service.namespace[:PORT] for opaque TCP, repeatable")] = None,
    state_dir: StateDir = None,
) -> None:
    """Run COMMAND meshed: a sidecar proxy first, the app once the proxy is ready, and
    the app's exit status as ours. Put `--` before COMMAND."""
    from .run import RunSpec, run_command

    spec = RunSpec(namespace=namespace, service=service, port=port, command=command,
                   workload=workload, pod=pod, outbound_port=outbound_port,
                   inbound_port=inbound_port, admin_port=admin_port,
                   upstreams=tuple(upstream or ()), state_dir=state_dir)
    raise typer.Exit(run_command(spec))


from . import viz as _viz  # noqa: E402  (registers `shoal viz`)

app.add_typer(_viz.app, name="viz")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
