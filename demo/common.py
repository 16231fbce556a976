"""What every demo program's ``main`` shares: addresses from flags or emojivoto's
environment variables, argument checks that fail with a usage line instead of a
traceback, logging, and running a coroutine until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

import uvloop

from shoal.kernel.logs import setup_logging

# Where each demo program listens or calls by default on one machine. emojivoto runs
# every service on 8080 in its own pod; here they share a host, so only web keeps 8080
# (the seed's port-forward) and the gRPC services take neighbours.
DEFAULT_WEB_PORT = 8080
DEFAULT_EMOJI_PORT = 9080
DEFAULT_VOTING_PORT = 9090
LOOPBACK = "127.0.0.1"
DEFAULT_EMOJI_ADDRESS = f"{LOOPBACK}:{DEFAULT_EMOJI_PORT}"
DEFAULT_VOTING_ADDRESS = f"{LOOPBACK}:{DEFAULT_VOTING_PORT}"
DEFAULT_WEB_ADDRESS = f"{LOOPBACK}:{DEFAULT_WEB_PORT}"

# emojivoto's variable names, so its manifests' environment works unchanged.
ENV_GRPC_PORT = "GRPC_PORT"
ENV_WEB_PORT = "WEB_PORT"
ENV_EMOJI_HOST = "EMOJISVC_HOST"
ENV_VOTING_HOST = "VOTINGSVC_HOST"
ENV_WEB_HOST = "WEB_HOST"
ENV_LOG_LEVEL = "SHOAL_LOG_LEVEL"

# The variables through which clients find a proxy (grpcio reads the lower-case ones,
# urllib both cases); the unmeshed launcher removes them so loopback calls go direct.
PROXY_VARIABLES = ("grpc_proxy", "http_proxy", "https_proxy",
                   "GRPC_PROXY", "HTTP_PROXY", "HTTPS_PROXY")


def port(text: str) -> int:
    """argparse type: a TCP port, 0 meaning "any free one"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {value}")
    return value


def address(text: str) -> str:
    """argparse type: ``host:port`` (a name is kept unresolved: a proxy may resolve it)."""
    host, sep, number = text.strip().rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if port(number) == 0:
        raise argparse.ArgumentTypeError(f"port 0 is not an address to call: {text!r}")
    return f"{host}:{int(number)}"


def env_port(name: str, fallback: int) -> int:
    value = os.environ.get(name)
    if not value:
        return fallback
    try:
        return port(value)
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"{name}: {error}") from None


def env_address(name: str, fallback: str) -> str:
    value = os.environ.get(name)
    if not value:
        return fallback
    try:
        return address(value)
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"{name}: {error}") from None


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog=prog, description=description)
    result.add_argument("--log-level", default=os.environ.get(ENV_LOG_LEVEL, "info"),
                        choices=["debug", "info", "warning", "error"])
    return result


def run(prog: str, main: Coroutine[Any, Any, int | None], log_level: str) -> None:
    """Run ``main`` on a fresh uvloop event loop and exit with its status; an OSError (a
    port in use, say) becomes one line on stderr and status 1.

    uvloop because web measured 1.6x the requests per second of asyncio's own loop on
    /api/list (wrk, 10 connections); grpc.aio runs on any asyncio loop."""
    setup_logging(log_level)
    try:
        status = uvloop.run(main)
    except KeyboardInterrupt:
        status = 0
    except OSError as error:
        logging.getLogger("shoal.demo").error("%s: %s", prog, error)
        sys.exit(1)
    sys.exit(status or 0)
