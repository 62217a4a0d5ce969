"""`ptm serve ARTIFACT_DIR_OR_MODEL.onnx`: the serving pod's entry point, and a laptop's.

Imports neither kopf nor torch (the serving image has neither). Flags override PTM_SERVE_* env;
runtime options come from `--options-json` (the CRD's RuntimeOptions, camelCase) and/or the
individual flags, the flags winning field by field.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ptm_runtime.options import ExecutionProvider, GraphOptimizationLevel, RuntimeOptions
from ptm_runtime.serve.settings import ServeSettings

#: flag dest -> (path in the RuntimeOptions wire dict)
_OPTION_FLAGS: dict[str, tuple[str, ...]] = {
    "execution_providers": ("executionProviders",),
    "max_batch_size": ("batching", "maxBatchSize"),
    "preferred_batch_size": ("batching", "preferredBatchSize"),
    "max_queue_delay_ms": ("batching", "maxQueueDelayMs"),
    "max_queue_size": ("batching", "maxQueueSize"),
    "concurrent_runs": ("concurrentRuns",),
    "intra_op_threads": ("intraOpThreads",),
    "inter_op_threads": ("interOpThreads",),
    "thread_spinning": ("threadSpinning",),
    "graph_optimization_level": ("graphOptimizationLevel",),
    "warmup_requests": ("warmupRequests",),
    "request_timeout_ms": ("requestTimeoutMs",),
}
_SETTING_FLAGS = (
    "model_name",
    "model_version",
    "host",
    "http_port",
    "grpc_port",
    "metrics_port",
    "max_body_bytes",
    "drain_timeout_s",
    "ports_file",
    "trt_cache_dir",
    "log_level",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptm serve",
        description="Serve an ONNX model over the Open Inference Protocol (KServe V2): REST, gRPC, /metrics.",
    )
    p.add_argument(
        "model_path",
        nargs="?",
        type=Path,
        help="artifact directory (model.onnx + report.json) or a .onnx file",
    )
    p.add_argument("--model-name", help="name in /v2/models/NAME (default: model)")
    p.add_argument("--model-version", help="version served (default: 1)")
    p.add_argument("--host", help="listen address (default 127.0.0.1; pods pass 0.0.0.0)")
    p.add_argument("--http-port", type=int, help="REST port (default 8080; 0: any free port)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 8081; 0: any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 8082; 0: any free port)")
    p.add_argument("--ports-file", type=Path, help="write the bound ports here as JSON")
    p.add_argument("--max-body-bytes", type=int, help="largest request body / gRPC message")
    p.add_argument("--drain-timeout-s", type=float, help="SIGTERM drain bound in seconds (default 30)")
    p.add_argument("--trt-cache-dir", type=Path, help="TensorRT engine cache directory")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    o = p.add_argument_group("runtime options (RuntimeOptions; flags override --options-json)")
    o.add_argument("--options-json", help="RuntimeOptions as JSON, or @FILE to read it from a file")
    o.add_argument(
        "--execution-providers",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        help="comma-separated, in order of preference: " + ",".join(e.value for e in ExecutionProvider),
    )
    o.add_argument("--max-batch-size", type=int, help="rows per batch (1 disables batching)")
    o.add_argument(
        "--preferred-batch-size", type=int, help="rows at which a batch closes (default: measured at load)"
    )
    o.add_argument("--max-queue-delay-ms", type=float, help="how long a batch waits to fill")
    o.add_argument("--max-queue-size", type=int, help="queued requests before 429")
    o.add_argument("--concurrent-runs", type=int, help="batches run on the model at once (default 1)")
    o.add_argument("--intra-op-threads", type=int)
    o.add_argument("--inter-op-threads", type=int)
    o.add_argument(
        "--thread-spinning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let idle ONNX Runtime threads spin (default: off)",
    )
    o.add_argument("--graph-optimization-level", choices=[g.value for g in GraphOptimizationLevel])
    o.add_argument("--warmup-requests", type=int)
    o.add_argument("--request-timeout-ms", type=int)
    return p


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Flags over env: build ServeSettings; raises ValidationError / ValueError on bad input."""
    kwargs: dict[str, Any] = {k: getattr(args, k) for k in _SETTING_FLAGS if getattr(args, k) is not None}
    if args.model_path is not None:
        kwargs["model_path"] = args.model_path
    settings = ServeSettings(**kwargs)
    base: dict[str, Any]
    if args.options_json is not None:
        text = args.options_json
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        base = json.loads(text)
        if not isinstance(base, dict):
            raise ValueError("--options-json must be a JSON object")
    else:
        base = settings.options.wire()
    changed = args.options_json is not None
    for dest, path in _OPTION_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        node = base
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        changed = True
    if changed:
        settings = settings.model_copy(update={"options": RuntimeOptions.model_validate(base)})
    return settings


def _run(settings: ServeSettings) -> int:
    from ptm_runtime.serve.server import Server

    async def main() -> int:
        return await Server(settings).run()

    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is in the serve extra on Linux
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError, OSError) as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return _run(settings)


if __name__ == "__main__":
    sys.exit(main())
