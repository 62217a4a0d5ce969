"""The committed gRPC modules are current, and their wire format is the one V2 clients speak."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from ptm_runtime.serve.protogen import stale_files

MESSAGES = [
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
]
METHODS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]

#: Run in a child process: two modules defining package `inference` cannot share one protobuf
#: descriptor pool, and the test process imports tritonclient's.
_DUMP = """
import json, sys, importlib
module = importlib.import_module(sys.argv[1])
def fields(d):
    out = {f.name: [f.number, f.type, f.message_type.full_name if f.message_type else ""] for f in d.fields}
    for n in d.nested_types:
        out.update({n.name + "." + k: v for k, v in fields(n).items()})
    return out
service = module.DESCRIPTOR.services_by_name["GRPCInferenceService"]
print(json.dumps({
    "package": module.DESCRIPTOR.package,
    "messages": {m: fields(module.DESCRIPTOR.message_types_by_name[m]) for m in sys.argv[2].split(",")},
    "methods": {m.name: [m.full_name, m.input_type.full_name, m.output_type.full_name] for m in service.methods},
}))
"""


def _describe(module: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _DUMP, module, ",".join(MESSAGES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_generated_modules_are_current() -> None:
    assert stale_files() == [], "run: python -m ptm_runtime.serve.protogen"


def test_wire_format_matches_tritonclient() -> None:
    ours = _describe("ptm_runtime.serve.proto.inference_pb2")
    theirs = _describe("tritonclient.grpc.service_pb2")
    assert ours["package"] == theirs["package"] == "inference"
    for message in MESSAGES:
        assert ours["messages"][message] == theirs["messages"][message], message
    for method in METHODS:
        assert ours["methods"][method] == theirs["methods"][method]
        assert ours["methods"][method][0] == f"inference.GRPCInferenceService.{method}"
