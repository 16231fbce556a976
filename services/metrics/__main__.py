"""``python -m shoal.services.metrics``: wiring only."""

from __future__ import annotations

import argparse
import os

from shoal import __version__

from ..main import base_parser, run
from ..runtime import ServiceRuntime
from .service import MetricsService


def build(args: argparse.Namespace) -> ServiceRuntime:
    runtime = ServiceRuntime("metrics", __version__, args.bus,
                             description="aggregates metrics reports, answers viz queries",
                             health_port=args.health_port)
    MetricsService(replica=f"metrics-{os.getpid()}", prom_port=args.prom_port,
                   prom_host=args.prom_host).install(runtime)
    return runtime


def parser() -> argparse.ArgumentParser:
    p = base_parser("metrics")
    p.add_argument("--prom-port", type=int, default=None,
                   help="serve the aggregate as Prometheus text on PORT (/metrics)")
    p.add_argument("--prom-host", default="127.0.0.1",
                   help="address for --prom-port (default 127.0.0.1)")
    return p


if __name__ == "__main__":
    run(parser(), build)
