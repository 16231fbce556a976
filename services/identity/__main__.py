"""``python -m shoal.services.identity``: wiring only."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from shoal import __version__
from shoal.kernel.config import default_state_dir
from shoal.kernel.identity_store import (
    IdentityMaterialError,
    default_identity_dir,
    load_service_material,
)
from shoal.kernel.tokens import parse_duration

from ..main import base_parser, run
from ..runtime import ServiceRuntime
from .kube import KubernetesTokenReviewer
from .service import IdentityService
from .tokencheck import TokenReviewer


def parser() -> argparse.ArgumentParser:
    parser = base_parser("identity")
    parser.add_argument("--identity-dir", type=Path, default=None,
                        help="issuer, trust bundle and token key (default <state>/identity)")
    parser.add_argument("--leaf-lifetime", default=None,
                        help="lifetime of issued leaves, like 24h or 30s (default: "
                             "identity.json's, 24h)")
    parser.add_argument("--token-review", choices=("off", "in-cluster", "kubeconfig"),
                        default=os.environ.get("SHOAL_TOKEN_REVIEW", "off"),
                        help="check Kubernetes service account tokens with TokenReview")
    parser.add_argument("--kubeconfig", default=None, help="with --token-review kubeconfig")
    return parser


def build(args: argparse.Namespace) -> ServiceRuntime:
    identity_dir = args.identity_dir or default_identity_dir(default_state_dir())
    try:
        lifetime = (dt.timedelta(seconds=parse_duration(args.leaf_lifetime))
                    if args.leaf_lifetime else None)
        material = load_service_material(identity_dir, dt.datetime.now(dt.UTC))
        reviewer: TokenReviewer | None = None
        if args.token_review != "off":
            reviewer = KubernetesTokenReviewer.connect(args.token_review, args.kubeconfig)
        service = IdentityService(identity_dir, material, replica=f"identity-{os.getpid()}",
                                  leaf_lifetime=lifetime, reviewer=reviewer)
    except (IdentityMaterialError, ValueError) as error:
        print(f"shoal-identity: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as error:  # kubernetes config errors: one line, not a traceback
        print(f"shoal-identity: cannot set up TokenReview: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    runtime = ServiceRuntime("identity", __version__, args.bus,
                             description="certificate authority: CSR -> leaf certificate",
                             health_port=args.health_port)
    service.install(runtime)
    return runtime


if __name__ == "__main__":
    run(parser(), build)
