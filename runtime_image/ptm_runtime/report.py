"""The converter's report: the contract between `ptm convert`, `ptm serve` and the operator.

The converter writes the full report as `report.json` beside the artifact and a compact form
(`Report.compact()`, under the 4096-byte termination-message limit) to the pod's termination
message, where the operator reads it. The server verifies the artifact's sha256 against the
report before it reports ready.

Artifact layout (content-addressed by revision):
    <store>/<namespace>/<name>/<revision>/model.onnx
    <store>/<namespace>/<name>/<revision>/report.json
    <store>/<namespace>/<name>/<revision>/model.ort     (only with the ort conversion target)

A failed conversion stores nothing and writes a `Failure` to the termination message instead
of a `Report`; `read_termination_message()` tells the two apart.

Exit codes of `ptm convert` (the operator reads the Job's exit code, or the failure's
`permanent` flag in the termination message, to decide whether a retry can help):

    0   EXIT_OK                 artifact stored (or already there for this revision)
    1   EXIT_INTERNAL           unexpected error (a bug): retry a bounded number of times
    2   EXIT_INVALID            bad spec or source: missing file, corrupt checkpoint, pickle
                                refused, architecture mismatch, unknown format, sha256 mismatch,
                                export failure. Permanent: only a spec change can fix it
    3   EXIT_VALIDATION_FAILED  no candidate passed the validation gate (failurePolicy Block).
                                Permanent
    75  EXIT_TRANSIENT          network, object store or hub unavailable (EX_TEMPFAIL): retry

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
#: Version of the report schema; bumped when a field changes meaning.
REPORT_VERSION = 1
ORT_MODEL_FILE = "model.ort"

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INVALID = 2
EXIT_VALIDATION_FAILED = 3
EXIT_TRANSIENT = 75
#: Exit codes after which re-running the same spec cannot succeed.
PERMANENT_EXIT_CODES = frozenset({EXIT_INVALID, EXIT_VALIDATION_FAILED})


class Metrics(Options):
    """Agreement of a candidate with the fp32 reference over the validation samples."""

    max_abs_error: float | None = None
    """Largest absolute difference of any output element."""
    cosine_similarity: float | None = None
    """Smallest per-sample cosine similarity."""
    top1_agreement: float | None = None
    """Share of samples whose arg-max agrees (classifiers)."""
    mean_abs_error: float | None = None
    """Mean absolute difference over all output elements."""
    mean_cosine_similarity: float | None = None
    """Mean per-sample cosine similarity."""


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
    latency_ms_batch8: float | None = None
    """Median latency of a batch of 8 (absent when the batch axis is fixed)."""
    accuracy_drop: float | None = None
    """1 - agreement with the fp32 reference (top-1 for classifiers, mean cosine otherwise)."""
    optimizations: list[str] = Field(default_factory=list)
    """How this candidate was built, in order."""


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
    version: int = REPORT_VERSION
    """Report schema version."""
    revision: str | None = None
    """The revision this artifact was converted for."""
    source_uri: str | None = None
    latency_ms_batch8_after: float | None = None
    speedup: float | None = None
    """latencyMsBefore / latencyMsAfter (batch 1)."""
    latency_provider: str | None = None
    """Execution provider the latencies were measured on."""
    sparsity: float | None = None
    """Measured share of zero weights in the pruned layers (when pruning ran)."""
    ort_artifact_uri: str | None = None
    """The ORT-format (model.ort) artifact, when the ort target was requested."""
    ort_sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")
    validation_message: str = ""
    """Why validation failed when failurePolicy Warn served the fp32 model anyway."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds spent per stage (fetch, load, export, optimize, validate, store, total)."""

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


class Failure(Options):
    """What a failed conversion writes to its termination message (no artifact exists)."""

    version: int = REPORT_VERSION
    revision: str | None = None
    reason: str
    """CamelCase cause: InvalidSpec, InvalidSource, ExportFailed, ValidationFailed,
    Unavailable, InternalError."""
    message: str
    """What went wrong, for a person."""
    exit_code: int
    permanent: bool
    """True when re-running the same spec cannot succeed."""
    candidates: list[Candidate] = Field(default_factory=list)
    """Every candidate and why it lost (validation failures)."""

    def compact(self) -> str:
        """JSON under the termination-message limit: trims the message and reasons, then
        per-candidate detail, then drops candidates (the full table is on stdout)."""
        data = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        candidates: list[dict[str, object]] = data.get("candidates", [])
        for step in range(6):
            text = json.dumps(data, separators=(",", ":"))
            if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
                return text
            if step == 0:
                data["message"] = _clip(data["message"], 1500)
                for c in candidates:
                    c["reason"] = _clip(str(c.get("reason", "")), 300)
            elif step == 1:
                for c in candidates:
                    for key in ("optimizations", "sizeBytes", "latencyMsBatch8", "accuracyDrop"):
                        c.pop(key, None)
            elif step == 2:
                for c in candidates:
                    c["reason"] = _clip(str(c.get("reason", "")), 80)
            elif step == 3:
                data["candidates"] = candidates[:8]
            else:
                data.pop("candidates", None)
                data["message"] = _clip(data["message"], 1000)
        return json.dumps(data, separators=(",", ":"))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SourceDigest(Options):
    """What `ptm convert --digest-only` writes: the checkpoint's current digest (updatePolicy Poll)."""

    source_digest: str = Field(pattern=r"^[a-f0-9]{64}$")
    """sha256 of the checkpoint (of the file, or of the sorted file digests of a directory)."""


def read_termination_message(text: str) -> Report | Failure | SourceDigest:
    """Parse what `ptm convert` left in a termination message: a Report, a Failure or a SourceDigest."""
    data = json.loads(text)
    if isinstance(data, dict) and "artifactUri" in data:
        return Report.model_validate(data)
    if isinstance(data, dict) and "sourceDigest" in data:
        return SourceDigest.model_validate(data)
    return Failure.model_validate(data)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
