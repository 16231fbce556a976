"""``python -m shoal.services.tap``: wiring only."""

from __future__ import annotations

import argparse
import os

from shoal import __version__

from ..main import base_parser, run
from ..runtime import ServiceRuntime
from .service import TapService


def build(args: argparse.Namespace) -> ServiceRuntime:
    runtime = ServiceRuntime("tap", __version__, args.bus,
                             description="opens, extends and closes tap sessions",
                             health_port=args.health_port)
    TapService(replica=f"tap-{os.getpid()}").install(runtime)
    return runtime


if __name__ == "__main__":
    run(base_parser("tap"), build)
