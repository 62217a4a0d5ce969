"""The converter's report: the contract between `ptm convert`, `ptm serve` and the operator.

The converter writes the full report as `report.json` beside the artifact and a compact form
(`Report.compact()`, under the 4096-byte termination-message limit) to the pod's termination
message, where the operator reads it. The server verifies the artifact's sha256 against the
report before it reports ready.

Artifact layout (content-addressed by revision):
    <store>/<namespace>/<name>/<revision>/model.onnx
    <store>/<namespace>/<name>/<revision>/report.json

pydantic only: imported by the operator and the serving image alike.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import Field

from ptm_runtime.options import Options, Precision, TensorSpec

REPORT_FILE = "report.json"
MODEL_FILE = "model.onnx"
#: Kubernetes caps a container's termination message at 4096 bytes.
TERMINATION_MESSAGE_LIMIT = 4096


class Metrics(Options):
    """Agreement of a candidate with the fp32 reference over the validation samples."""

    max_abs_error: float | None = None
    """Largest absolute difference of any output element."""
    cosine_similarity: float | None = None
    """Smallest per-sample cosine similarity."""
    top1_agreement: float | None = None
    """Share of samples whose arg-max agrees (classifiers)."""


class Candidate(Options):
    """One optimized candidate and its verdict."""

    precision: Precision
    passed: bool
    metrics: Metrics = Field(default_factory=Metrics)
    latency_ms: float | None = None
    """Median single-sample latency on the converter's machine."""
    size_bytes: int | None = None
    reason: str = ""
    """Why it failed (empty when it passed)."""


class Report(Options):
    """What a conversion produced."""

    artifact_uri: str
    """Where model.onnx was stored (file://, pvc:// or s3://)."""
    sha256: str = Field(pattern=r"^[a-f0-9]{64}$")
    size_bytes: int = Field(ge=0)
    opset: int
    precision: Precision
    """The precision that won validation and is served."""
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    exporter: str = ""
    """How ONNX was produced: dynamo, torchscript, passthrough, tf2onnx."""
    optimizations: list[str] = Field(default_factory=list)
    """Optimizations applied to the served artifact, in order."""
    validation_passed: bool
    metrics: Metrics = Field(default_factory=Metrics)
    """The served candidate's validation metrics."""
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    source_sha256: str | None = None
    """Digest of the checkpoint that was converted."""
    candidates: list[Candidate] = Field(default_factory=list)

    def compact(self) -> str:
        """JSON that fits a termination message: drops detail until it does."""
        data = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        text = json.dumps(data, separators=(",", ":"))
        for key in ("candidates", "outputs", "inputs", "optimizations"):
            if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
                break
            data.pop(key, None)
            text = json.dumps(data, separators=(",", ":"))
        return text

    def write(self, directory: Path) -> Path:
        """Write report.json atomically (temp file + rename)."""
        path = directory / REPORT_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: Path) -> Report:
        return cls.model_validate_json((directory / REPORT_FILE).read_text())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
