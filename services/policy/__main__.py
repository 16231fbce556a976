"""``python -m shoal.services.policy``: wiring only."""

from __future__ import annotations

import argparse
import os

from shoal import __version__

from ..main import base_parser, run
from ..runtime import ServiceRuntime
from .service import PolicyService


def build(args: argparse.Namespace) -> ServiceRuntime:
    runtime = ServiceRuntime("policy", __version__, args.bus,
                             description="validates and stores policy",
                             health_port=args.health_port)
    PolicyService(replica=f"policy-{os.getpid()}").install(runtime)
    return runtime


if __name__ == "__main__":
    run(base_parser("policy"), build)
