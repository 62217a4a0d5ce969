"""`python -m ptm_operator.devcluster up [--real-node]|images|down|status|env|build` (also `ptm devcluster ...`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from ptm_operator.devcluster import ClusterError, DevCluster


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptm devcluster", description="the local test cluster on 127.0.0.1")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build (once) and start the cluster; a no-op when it is up")
    up.add_argument("--timeout", type=float, default=120.0)
    up.add_argument(
        "--real-node",
        action="store_true",
        help="also run a real node (containerd + kubelet + kube-proxy) beside the kwok nodes",
    )
    images = sub.add_parser(
        "images",
        help="build the convert and serve images (cached by content) and load them into the real node",
    )
    images.add_argument("--target", action="append", choices=("convert", "serve"), help="default: both")
    sub.add_parser("down", help="stop the processes `up` started")
    sub.add_parser("status", help="components, PIDs, readiness (exit 1 when not ready)")
    sub.add_parser("env", help="print shell exports (KUBECONFIG, PATH with the pinned kubectl)")
    sub.add_parser("build", help="build the binaries into the cache (a no-op when cached)")
    args = parser.parse_args(argv)
    cluster = DevCluster()
    try:
        if args.cmd == "up":
            started = time.monotonic()
            cluster.config.real_node = cluster.config.real_node or args.real_node
            cluster.up(timeout=args.timeout)
            print(f"cluster up in {time.monotonic() - started:.1f}s: {cluster.server}")
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.cmd == "images":
            if not cluster.is_up():
                cluster.up()
            for image in cluster.up_real_node(images=tuple(args.target or ("convert", "serve"))):
                print(f"{image.target}: {image.name}")
        elif args.cmd == "down":
            cluster.down()
            print("cluster down")
        elif args.cmd == "status":
            status = cluster.status()
            print(json.dumps(status, indent=2))
            return 0 if status["ready"] else 1
        elif args.cmd == "env":
            for key, value in cluster.env().items():
                print(f"export {key}={value}")
        elif args.cmd == "build":
            cluster.ensure_binaries()
            print(cluster.bin_dir)
    except ClusterError as exc:
        print(f"devcluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
