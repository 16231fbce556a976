"""``python -m shoal.services.destination``: wiring only."""

from __future__ import annotations

import argparse
import os

from shoal import __version__

from ..main import base_parser, run
from ..runtime import ServiceRuntime
from .service import DestinationService


def build(args: argparse.Namespace) -> ServiceRuntime:
    runtime = ServiceRuntime("destination", __version__, args.bus,
                             description="registrations -> shoal_endpoints",
                             health_port=args.health_port)
    DestinationService(replica=f"destination-{os.getpid()}").install(runtime)
    return runtime


if __name__ == "__main__":
    run(base_parser("destination"), build)
