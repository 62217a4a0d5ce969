"""The `ptm` command: one entry point whose subcommands live beside the code they run."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

#: subcommand -> (help, module whose `main(argv)` runs it). Modules are imported only when their
#: command runs: `ptm serve` must not pay for (or even have) torch or kopf.
COMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("run the operator (kopf) against the current cluster", "ptm_operator.run"),
    "plan": (
        "show what the operator would create or change for a manifest, without acting",
        "ptm_operator.plancli",
    ),
    "crd": ("generate the PretrainedModel CRD (--check: fail when stale)", "ptm_operator.crdgen"),
    "doctor": (
        "explain why a PretrainedModel is not serving, most urgent cause first",
        "ptm_operator.doctor",
    ),
    "devcluster": ("start/stop the local test cluster", "ptm_operator.devcluster.__main__"),
    "convert": (
        "convert a checkpoint to a validated, optimized ONNX artifact and report",
        "ptm_runtime.convert.cli",
    ),
    "serve": (
        "serve an ONNX model over the Open Inference Protocol (REST, gRPC, metrics)",
        "ptm_runtime.serve.cli",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ptm", description="ptm: pretrained models on Kubernetes")
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        help="; ".join(f"{name}: {help_}" for name, (help_, _) in sorted(COMMANDS.items())),
    )
    if not args or args[0] in {"-h", "--help"}:
        parser.print_help()
        return 0 if args else 2
    command = parser.parse_args(args[:1]).command
    run: Callable[[list[str]], int] = importlib.import_module(COMMANDS[command][1]).main
    return run(args[1:])


if __name__ == "__main__":
    sys.exit(main())
