"""``python -m shoal.services.dashboard``: wiring only."""

from __future__ import annotations

import argparse

from shoal import __version__

from ..main import base_parser, run
from ..runtime import ServiceRuntime
from .service import DEFAULT_HOST, DEFAULT_PORT, DashboardService


def build(args: argparse.Namespace) -> ServiceRuntime:
    runtime = ServiceRuntime("dashboard", __version__, args.bus,
                             description="the web dashboard", health_port=args.health_port)
    DashboardService(host=args.host, port=args.port,
                     allow_hosts=tuple(args.allow_host)).install(runtime)
    return runtime


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def parser() -> argparse.ArgumentParser:
    p = base_parser("dashboard")
    p.add_argument("--port", type=port, default=DEFAULT_PORT,
                   help=f"HTTP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME (loopback names always "
                        "work; needed when reached through another name)")
    return p


if __name__ == "__main__":
    run(parser(), build)
