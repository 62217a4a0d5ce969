"""Regenerates the committed gRPC modules in `serve/proto/` from `inference.proto`.

The generated modules are committed so the serving image needs no protoc; a unit test runs
`generate()` into a temporary folder and fails when the committed files differ (the pinned
grpcio-tools in the `dev` extra makes the output reproducible).

    python -m ptm_runtime.serve.protogen           # rewrite serve/proto/*_pb2*.py*
    python -m ptm_runtime.serve.protogen --check   # exit 1 when they are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "proto"
#: The source root that holds the `ptm_runtime` package: protoc runs from here so the
#: generated modules import each other as `ptm_runtime.serve.proto.*`.
SOURCE_ROOT = PROTO_DIR.parents[2]
PROTO = PROTO_DIR / "inference.proto"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) with `out_root` standing for the source root; returns the files."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev-only dependency

    relative = PROTO.relative_to(SOURCE_ROOT).as_posix()
    args = [
        "grpc_tools.protoc",
        f"-I{SOURCE_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        relative,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {relative}")
    out_dir = out_root / PROTO_DIR.relative_to(SOURCE_ROOT)
    return [out_dir / name for name in GENERATED]


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            path.name
            for path in fresh
            if not (PROTO_DIR / path.name).exists()
            or not filecmp.cmp(path, PROTO_DIR / path.name, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptm_runtime.serve.protogen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PROTO_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTO_DIR / path.name)
            print(PROTO_DIR / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
