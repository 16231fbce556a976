"""What every service's ``__main__`` shares: flags, logging, uvloop, and run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import uvloop

from shoal.kernel.config import resolve_bus
from shoal.kernel.logs import setup_logging

from .runtime import ServiceRuntime

Build = Callable[[argparse.Namespace], ServiceRuntime]


def base_parser(service: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"shoal-{service}",
                                     description=f"Shoal {service} service")
    parser.add_argument("--nats", default=None, help="bus URL (default: env or shoal up's)")
    parser.add_argument("--health-port", type=int, default=None,
                        help="serve /live and /ready on 127.0.0.1:PORT")
    parser.add_argument("--log-level", default=os.environ.get("SHOAL_LOG_LEVEL", "info"))
    return parser


def run(parser: argparse.ArgumentParser, build: Build) -> None:
    args = parser.parse_args()
    setup_logging(args.log_level)
    try:
        args.bus = resolve_bus("controller", url=args.nats)
    except Exception as error:  # BusNotFound and friends: a clear line, not a traceback
        print(f"{parser.prog}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    runtime = build(args)
    try:
        uvloop.run(runtime.run())
    except KeyboardInterrupt:
        pass
    except OSError as error:
        logging.getLogger("shoal").error("%s: %s", parser.prog, error)
        raise SystemExit(1) from None


