"""`ptm operator`: run the operator (kopf) with the settings from PTM_* environment variables."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import kopf


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptm operator", description="run the ptm operator")
    parser.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch only these (repeatable)"
    )
    parser.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # kopf logs every handler call per object at INFO (see kopfcost)
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from ptm_operator import handlers  # registers the handlers

    cfg = handlers.settings()
    namespaces = list(args.namespace) or list(cfg.namespaces)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.standalone,
        peering_name=None if args.standalone else cfg.peering,
        priority=cfg.peering_priority,
        liveness_endpoint=f"http://{cfg.bind_address}:{cfg.liveness_port}/healthz"
        if cfg.liveness_port
        else None,
    )
    return 0
