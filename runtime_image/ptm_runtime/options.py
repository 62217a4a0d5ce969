"""Options that the converter and the server interpret, defined once.

The operator composes these models into the `PretrainedModel` CRD (ptm_operator.api), the
converter (`ptm convert`) and the server (`ptm serve`) parse the very same models from the spec
they are handed. A field lives here when a runtime process reads it; fields that only the
operator reads (replicas, scheduling, rollout) live in ptm_operator.api.

This module imports pydantic only: the serving image must stay free of torch and kopf.

Conventions:
- Python attributes are snake_case, the wire (CRD, JSON, YAML) is camelCase via aliases.
- Attribute docstrings become field descriptions, so `kubectl explain` shows them.
- Cross-field rules are CEL `x-kubernetes-validations` on the model (`cel()` below), so the
  API server itself rejects a bad manifest; `model_validator`s mirror them for local use
  (`ptm convert --spec`), where there is no API server.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

#: Kubernetes-style duration: "500ms", "30s", "5m", "1h30m".
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"


def cel(*rules: tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules as (expression, message) pairs, or
    (expression, message, fieldPath) triples: fieldPath (e.g. ".minReplicas") makes the API
    server report the error at that field instead of at the object."""
    out: list[dict[str, str]] = []
    for rule in rules:
        entry = {"rule": rule[0], "message": rule[1]}
        if len(rule) == 3:
            entry["fieldPath"] = rule[2]
        out.append(entry)
    return {"x-kubernetes-validations": out}


class Options(BaseModel):
    """Base for every spec part: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase dict as it appears in a manifest (defaults included, None dropped)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- source ------------------------------------------------------------------------------------


class SourceFormat(StrEnum):
    PYTORCH_TORCHSCRIPT = "pytorch-torchscript"
    PYTORCH_EXPORTED = "pytorch-exported"
    PYTORCH_STATE_DICT = "pytorch-state-dict"
    HUGGINGFACE = "huggingface"
    ONNX = "onnx"
    TENSORFLOW_SAVEDMODEL = "tensorflow-savedmodel"


class TensorDType(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT64 = "int64"
    INT32 = "int32"
    INT8 = "int8"
    UINT8 = "uint8"
    BOOL = "bool"


class TensorSpec(Options):
    """One model input or output: name, element type and shape (-1 marks a dynamic dimension)."""

    name: str = Field(min_length=1, max_length=253)
    """Tensor name as the model (or its forward() argument) calls it."""
    dtype: TensorDType = TensorDType.FLOAT32
    """Element type."""
    shape: list[int] = Field(min_length=0, max_length=16)
    """Dimensions; -1 marks a dynamic one (the first is usually the batch axis)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("self.shape.all(d, d == -1 || d > 0)", "shape dimensions must be positive or -1")
        )
    )


class SourceOptions(Options):
    """Where the checkpoint is and how to read it."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.*|file:///.*|s3://[^/]+/.+|https?://.+|hf://[^/@]+/[^/@]+(@.+)?)$",
    )
    """Checkpoint location: pvc://CLAIM/PATH, file:///NODE/PATH (dev), s3://BUCKET/KEY,
    http(s)://URL or hf://ORG/NAME[@REVISION]."""
    format: SourceFormat
    """Checkpoint format."""
    architecture: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """For pytorch-state-dict: the factory that builds the module, as module:callable
    (e.g. torchvision.models:resnet18)."""
    task: str | None = Field(default=None, pattern=r"^[a-z0-9-]+$")
    """For huggingface: the task that selects the model head (e.g. feature-extraction,
    image-classification, text-classification)."""
    sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")
    """Optional pin: the checkpoint's sha256 (of the file, or of the sorted file digests of a
    directory); conversion fails when it differs."""
    inputs: list[TensorSpec] = Field(default_factory=list, max_length=64)
    """Input signature, needed when the format cannot tell it (state dicts, TorchScript)."""
    allow_pickle: bool = False
    """Allow loading full pickles (arbitrary code execution). Off: checkpoints load with
    torch.load(weights_only=True) and pickled objects are refused."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.format != 'pytorch-state-dict' || has(self.architecture)",
                "architecture is required when format is pytorch-state-dict",
                ".architecture",
            ),
        )
    )

    @model_validator(mode="after")
    def _architecture_for_state_dict(self) -> Self:
        if self.format is SourceFormat.PYTORCH_STATE_DICT and not self.architecture:
            raise ValueError("architecture is required when format is pytorch-state-dict")
        return self


# --- conversion ----------------------------------------------------------------------------------


class ConversionTarget(StrEnum):
    ONNX = "onnx"
    ORT = "ort"


class ConversionOptions(Options):
    """How the checkpoint becomes ONNX."""

    opset: int = Field(default=18, ge=11, le=23)
    """ONNX opset to export to."""
    dynamic_batch: bool = True
    """Make the first axis of every input and output dynamic (needed for dynamic batching)."""
    dynamic_axes: dict[str, list[int]] = Field(default_factory=dict)
    """Further dynamic axes by tensor name, e.g. {input_ids: [0, 1]} for sequence length."""
    targets: list[ConversionTarget] = Field(default_factory=lambda: [ConversionTarget.ONNX], min_length=1)
    """Artifacts to produce: onnx, and optionally ort (ONNX Runtime mobile format)."""


# --- optimization --------------------------------------------------------------------------------


class GraphOptimizationLevel(StrEnum):
    DISABLED = "disabled"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8_DYNAMIC = "int8-dynamic"
    INT8_STATIC = "int8-static"


class QuantizationMode(StrEnum):
    DYNAMIC = "dynamic"
    STATIC = "static"


class CalibrationMethod(StrEnum):
    MINMAX = "MinMax"
    ENTROPY = "Entropy"
    PERCENTILE = "Percentile"


class DataRef(Options):
    """A set of input samples: a .npz file (one array per input name) at a URI."""

    uri: str = Field(min_length=1, max_length=2048, pattern=r"^(pvc://|file:///|s3://|https?://).+$")
    """Location of the .npz file (same schemes as the source, except hf://)."""


class CalibrationOptions(DataRef):
    """Calibration data for static quantization."""

    samples: int = Field(default=128, ge=1, le=100000)
    """How many samples of the set to calibrate on."""
    method: CalibrationMethod = CalibrationMethod.MINMAX
    """Calibration method."""


class QuantizationOptions(Options):
    """int8 quantization settings."""

    mode: QuantizationMode = QuantizationMode.DYNAMIC
    """dynamic (weights only, no data needed) or static (activations too, needs calibration)."""
    calibration: CalibrationOptions | None = None
    """Calibration data; required for static quantization."""
    per_channel: bool = False
    """Quantize weights per channel (more accurate, slightly larger)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.mode != 'static' || has(self.calibration)",
                "static quantization needs calibration data (quantization.calibration.uri)",
                ".calibration",
            ),
        )
    )

    @model_validator(mode="after")
    def _static_needs_calibration(self) -> Self:
        if self.mode is QuantizationMode.STATIC and self.calibration is None:
            raise ValueError("static quantization needs calibration data (quantization.calibration.uri)")
        return self


class PruningMethod(StrEnum):
    NONE = "none"
    MAGNITUDE = "magnitude"
    STRUCTURED = "structured"


class PruningOptions(Options):
    """Weight pruning in torch before export."""

    method: PruningMethod = PruningMethod.NONE
    """none, magnitude (unstructured L1) or structured (L2 over output channels)."""
    sparsity: float = Field(default=0.0, ge=0.0, le=0.95)
    """Fraction of weights to zero in each pruned layer."""


class OptimizationOptions(Options):
    """Which optimized candidates to build; validation then picks one."""

    graph_optimization_level: GraphOptimizationLevel = GraphOptimizationLevel.EXTENDED
    """ONNX Runtime offline graph optimization applied to every candidate."""
    precision: list[Precision] = Field(default_factory=lambda: [Precision.FP32], min_length=1, max_length=4)
    """Precision candidates in preference order; the first that passes validation within
    maxAccuracyDrop is served."""
    keep_io_fp32: bool = True
    """For fp16: keep inputs and outputs float32 so clients need not change."""
    quantization: QuantizationOptions = Field(default_factory=QuantizationOptions)
    """int8 settings (used by the int8-* precisions)."""
    pruning: PruningOptions = Field(default_factory=PruningOptions)
    """Pruning before export."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!self.precision.exists(p, p == 'int8-static') || self.quantization.mode == 'static'",
                "precision int8-static needs quantization.mode static (with calibration data)",
                ".precision",
            ),
        )
    )

    @model_validator(mode="after")
    def _int8_static_needs_static_mode(self) -> Self:
        if Precision.INT8_STATIC in self.precision and self.quantization.mode is not QuantizationMode.STATIC:
            raise ValueError("precision int8-static needs quantization.mode static (with calibration data)")
        return self


# --- validation ----------------------------------------------------------------------------------


class FailurePolicy(StrEnum):
    BLOCK = "Block"
    WARN = "Warn"


class ValidationOptions(Options):
    """The gate every candidate must pass before it may serve; it fails closed."""

    dataset: DataRef | None = None
    """Validation inputs; when absent, synthetic inputs from the input signature (and, for
    text models, tokenized sample sentences) are used."""
    samples: int = Field(default=32, ge=1, le=10000)
    """How many samples to compare reference and candidate on."""
    max_abs_error: float | None = Field(default=None, gt=0)
    """Largest allowed absolute difference of any output element (off when unset)."""
    min_cosine_similarity: float = Field(default=0.99, ge=0.0, le=1.0)
    """Smallest allowed cosine similarity between reference and candidate outputs, per sample."""
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    """For classifiers: smallest allowed share of samples whose arg-max class agrees."""
    max_accuracy_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    """Budget for reduced precision: a candidate whose agreement with the fp32 reference falls
    by more than this is rejected in favour of the next precision."""
    failure_policy: FailurePolicy = FailurePolicy.BLOCK
    """Block: no candidate passes → nothing is served (fails closed). Warn: serve fp32 anyway
    and report the failure."""


# --- serving runtime -----------------------------------------------------------------------------


class ExecutionProvider(StrEnum):
    TENSORRT = "TensorrtExecutionProvider"
    CUDA = "CUDAExecutionProvider"
    CPU = "CPUExecutionProvider"


class BatchingOptions(Options):
    """Dynamic batching: requests are queued and run together."""

    max_batch_size: int = Field(default=8, ge=1, le=1024)
    """Largest batch sent to the model (1 disables batching); also the most rows one request
    may carry."""
    preferred_batch_size: int | None = Field(default=None, ge=1, le=1024)
    """Rows at which a forming batch closes (at most maxBatchSize). Unset: measured when the
    model loads (1, 2, 4, ... maxBatchSize rows, with concurrentRuns when that is unset too):
    the smallest size whose rows per second come within 1% of the best (on CPUs a transformer
    often runs fastest at 2-4 rows, a CNN at the largest batch)."""
    max_queue_delay_ms: float = Field(default=5.0, ge=0, le=10000)
    """How long the first queued request waits for others to join its batch. It waits only
    while other requests are still being read or decoded: a lone request runs at once."""
    max_queue_size: int = Field(default=256, ge=1, le=100000)
    """Queued requests beyond this are refused with 429 / RESOURCE_EXHAUSTED."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.preferredBatchSize) || !has(self.maxBatchSize) || "
                "self.preferredBatchSize <= self.maxBatchSize",
                "preferredBatchSize must not exceed maxBatchSize",
                ".preferredBatchSize",
            ),
        )
    )

    @model_validator(mode="after")
    def _preferred_within_max(self) -> Self:
        if self.preferred_batch_size is not None and self.preferred_batch_size > self.max_batch_size:
            raise ValueError(
                f"preferredBatchSize must not exceed maxBatchSize ({self.preferred_batch_size} > "
                f"{self.max_batch_size})"
            )
        return self


class RuntimeOptions(Options):
    """How `ptm serve` runs the model (ONNX Runtime session, batching, timeouts)."""

    execution_providers: list[ExecutionProvider] = Field(
        default_factory=lambda: [ExecutionProvider.TENSORRT, ExecutionProvider.CUDA, ExecutionProvider.CPU],
        min_length=1,
        max_length=3,
    )
    """Execution providers in order of preference; the first that loads is used and reported."""
    batching: BatchingOptions = Field(default_factory=BatchingOptions)
    """Dynamic batching."""
    concurrent_runs: int | None = Field(default=None, ge=1, le=64)
    """Batches the model runs at once (ONNX Runtime sessions are thread-safe; the runs share
    the session's intraOpThreads). Unset: measured when the model loads together with
    batching.preferredBatchSize (1 or 2, whichever gives more rows per second). A lone
    request always runs alone, with every thread."""
    intra_op_threads: int = Field(default=0, ge=0, le=256)
    """ONNX Runtime intra-op threads (0: one per available core)."""
    inter_op_threads: int = Field(default=0, ge=0, le=256)
    """ONNX Runtime inter-op threads (0: runtime default)."""
    thread_spinning: bool = False
    """Let idle ONNX Runtime threads spin waiting for work. Off: they sleep, leaving the cores to
    the server's own request handling (on a 2-core CPU this halved CPU per request and raised
    throughput); on: a little lower latency when the cores are otherwise idle."""
    graph_optimization_level: GraphOptimizationLevel = GraphOptimizationLevel.ALL
    """ONNX Runtime graph optimizations applied when the session loads (on top of those the
    converter applied offline)."""
    warmup_requests: int = Field(default=3, ge=0, le=1000)
    """Inferences run before the model reports ready."""
    request_timeout_ms: int = Field(default=30000, ge=1, le=3600000)
    """Per-request deadline, queueing included; a REST body that has not fully arrived within it
    is answered 408."""
