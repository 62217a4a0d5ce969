"""The `ptm` command: one entry point whose subcommands live beside the code they run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _devcluster(argv: Sequence[str]) -> int:
    from ptm_operator.devcluster.__main__ import main as devcluster_main

    return devcluster_main(list(argv))


def _crd(argv: Sequence[str]) -> int:
    from ptm_operator.crdgen import main as crd_main

    return crd_main(list(argv))


def _serve(argv: Sequence[str]) -> int:
    from ptm_runtime.serve.cli import main as serve_main

    return serve_main(list(argv))


def _operator(argv: Sequence[str]) -> int:
    from ptm_operator.run import main as operator_main

    return operator_main(list(argv))


def _plan(argv: Sequence[str]) -> int:
    from ptm_operator.plancli import main as plan_main

    return plan_main(list(argv))


def _doctor(argv: Sequence[str]) -> int:
    from ptm_operator.doctor import main as doctor_main

    return doctor_main(list(argv))


def _convert(argv: Sequence[str]) -> int:
    from ptm_runtime.convert.cli import main as convert_main

    return convert_main(list(argv))


COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "operator": ("run the operator (kopf) against the current cluster", _operator),
    "plan": ("show what the operator would create or change for a manifest, without acting", _plan),
    "crd": ("generate the PretrainedModel CRD (--check: fail when stale)", _crd),
    "doctor": ("explain why a PretrainedModel is not serving, most urgent cause first", _doctor),
    "devcluster": ("start/stop the local test cluster", _devcluster),
    "convert": ("convert a checkpoint to a validated, optimized ONNX artifact and report", _convert),
    "serve": ("serve an ONNX model over the Open Inference Protocol (REST, gRPC, metrics)", _serve),
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
    ns, rest = parser.parse_known_args(args[:1])
    return COMMANDS[ns.command][1](rest + args[1:])


if __name__ == "__main__":
    sys.exit(main())
