"""checkpoint -> ONNX -> candidates -> validation gate -> stored artifact + report.

The order of work is chosen so that a failure costs as little as possible and never leaves
anything behind: an existing artifact for the revision ends the job at once; the source is
fetched and its pin checked before anything is deserialized; nothing is written to the store
until a candidate has passed the gate (or failurePolicy Warn says to serve fp32 anyway), and
then atomically (see store.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ptm_runtime.convert import locations, samples
from ptm_runtime.convert.errors import ConvertError, InvalidSpec, ValidationFailed
from ptm_runtime.convert.store import Store, open_store
from ptm_runtime.options import (
    ConversionOptions,
    ConversionTarget,
    FailurePolicy,
    OptimizationOptions,
    Precision,
    PruningMethod,
    SourceFormat,
    SourceOptions,
    TensorSpec,
    ValidationOptions,
)
from ptm_runtime.report import MODEL_FILE, ORT_MODEL_FILE, Candidate, Metrics, Report, sha256_file

if TYPE_CHECKING:
    from ptm_runtime.convert.sources import Source

log = logging.getLogger(__name__)

#: Formats whose checkpoint is a folder (an archive is extracted).
DIRECTORY_FORMATS = frozenset({SourceFormat.HUGGINGFACE, SourceFormat.TENSORFLOW_SAVEDMODEL})
VALIDATION_BATCH = 8


@dataclass
class Request:
    """Everything one conversion needs."""

    source: SourceOptions
    store: str
    namespace: str
    name: str
    revision: str
    conversion: ConversionOptions = field(default_factory=ConversionOptions)
    optimization: OptimizationOptions = field(default_factory=OptimizationOptions)
    validation: ValidationOptions = field(default_factory=ValidationOptions)
    pvc_root: Path = locations.DEFAULT_PVC_ROOT


@dataclass
class Outcome:
    report: Report
    reused: bool = False


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self._start, 3)}


def convert(request: Request) -> Outcome:
    """Run one conversion; raises ConvertError subclasses for foreseen failures."""
    store = open_store(request.store, request.pvc_root)
    existing = store.find(request.namespace, request.name, request.revision)
    if existing is not None:
        log.info(
            "revision %s is already converted at %s; nothing to do", request.revision, existing.artifact_uri
        )
        return Outcome(existing, reused=True)
    with tempfile.TemporaryDirectory(prefix="ptm-convert-") as tmp:
        return Outcome(_convert(request, store, Path(tmp)))


def _convert(request: Request, store: Store, work: Path) -> Report:
    timer = _Timer()
    opts = request.optimization
    pruning = opts.pruning.method is not PruningMethod.NONE and opts.pruning.sparsity > 0
    with timer.stage("fetch"):
        fetched = locations.fetch(
            request.source.uri,
            work,
            want_dir=request.source.format in DIRECTORY_FORMATS,
            pvc_root=request.pvc_root,
        )
        locations.check_pin(request.source.uri, fetched.sha256, request.source.sha256)
    # torch, onnx and onnxruntime load only now: a bad location fails fast and cheap
    from ptm_runtime.convert import export, optimize, sources, validate

    with timer.stage("load"):
        source = sources.load(fetched.path, request.source, work, opset=request.conversion.opset)
        if pruning and not source.is_torch:
            raise InvalidSpec(
                f"pruning runs in torch and needs a PyTorch source, not {request.source.format.value}"
            )
        batch = _batch_size(source.inputs, request.conversion)
        batches = _validation_batches(request, source, batch, work)
        calibration = _calibration_batches(request, source, work)
        refs = [source.reference(b) for b in batches]
    exported_from = source
    notes: list[str] = []
    sparsity = None
    if pruning:
        pruned = copy.deepcopy(source.module)
        sparsity, layers = optimize.prune(pruned, opts.pruning)
        exported_from = dataclasses.replace(source, module=pruned, program=None)
        notes.append(
            f"pruning:{opts.pruning.method.value} {opts.pruning.sparsity:g} (measured {sparsity:.4f} "
            f"over {layers} layers)"
        )
    with timer.stage("export"):
        base = work / "export.onnx"
        exported = export.export(exported_from, samples.rows(batches[0], 0, 2), request.conversion, base)
    classifier = (
        source.classifier
        if source.classifier is not None
        else request.validation.min_top1_agreement is not None
    )
    logits = None if source.classifier is False else validate.logits_output(refs[0])
    ep = validate.provider()
    with timer.stage("validate"):
        before = validate.latency(validate.session(base, ep), batches[0], request.conversion.dynamic_batch)

    cand_dir = work / "candidates"
    cand_dir.mkdir()
    built: dict[Precision, Path] = {}
    candidates: list[Candidate] = []

    def evaluate(precision: Precision) -> Candidate:
        try:
            with timer.stage("optimize"):
                path, steps = optimize.build(precision, base, cand_dir, opts, calibration)
        except ConvertError:
            raise
        except Exception as exc:  # a candidate that cannot be built loses; the others may win
            log.warning("building the %s candidate failed: %s", precision.value, exc)
            return Candidate(precision=precision, passed=False, reason=f"build failed: {str(exc)[:300]}")
        with timer.stage("validate"):
            try:
                sess = validate.session(path, ep)
                outs = validate.run(sess, batches)
                metrics = validate.compare(refs, outs, logits)
                lat = validate.latency(sess, batches[0], request.conversion.dynamic_batch)
            except Exception as exc:  # a candidate the runtime cannot run loses (fails closed)
                return Candidate(
                    precision=precision,
                    passed=False,
                    size_bytes=path.stat().st_size,
                    optimizations=steps,
                    reason=f"cannot run on {ep}: {str(exc)[:300]}",
                )
            passed, reason, drop = validate.judge(metrics, request.validation, classifier)
        built[precision] = path
        return Candidate(
            precision=precision,
            passed=passed,
            metrics=_clean(metrics),
            latency_ms=lat.batch1_ms,
            latency_ms_batch8=lat.batch8_ms,
            size_bytes=path.stat().st_size,
            reason=reason,
            accuracy_drop=None if drop is None else round(drop, 6),
            optimizations=steps,
        )

    for precision in dict.fromkeys(opts.precision):
        candidates.append(evaluate(precision))
        log.info(
            "candidate %s: %s", precision.value, "passed" if candidates[-1].passed else candidates[-1].reason
        )
    winner = next((c for c in candidates if c.passed), None)
    validation_message = ""
    if winner is None:
        summary = "; ".join(f"{c.precision.value}: {c.reason}" for c in candidates)
        if request.validation.failure_policy is FailurePolicy.BLOCK:
            raise ValidationFailed(
                f"no candidate passed validation (failurePolicy Block): {summary}", candidates
            )
        fallback = next((c for c in candidates if c.precision is Precision.FP32), None)
        if fallback is None:
            fallback = evaluate(Precision.FP32)
            candidates.append(fallback)
        if Precision.FP32 not in built:
            raise ValidationFailed(f"no candidate passed and fp32 cannot run either: {summary}", candidates)
        winner = fallback
        validation_message = f"served fp32 although validation failed (failurePolicy Warn): {summary}"
        log.warning("%s", validation_message)

    artifact = built[winner.precision]
    files = {MODEL_FILE: artifact}
    ort_uri = ort_sha = None
    if ConversionTarget.ORT in request.conversion.targets:
        with timer.stage("optimize"):
            ort_path = work / ORT_MODEL_FILE
            optimize.to_ort_format(artifact, ort_path)
        files[ORT_MODEL_FILE] = ort_path
        ort_uri = store.uri_of(request.namespace, request.name, request.revision, ORT_MODEL_FILE)
        ort_sha = sha256_file(ort_path)
    import onnx

    served = onnx.load(str(artifact), load_external_data=False)
    inputs, outputs = sources.onnx_inputs_outputs(served)
    timings = timer.total()
    report = Report(
        artifact_uri=store.uri_of(request.namespace, request.name, request.revision, MODEL_FILE),
        sha256=sha256_file(artifact),
        size_bytes=artifact.stat().st_size,
        opset=export.model_opset(served),
        precision=winner.precision,
        inputs=inputs,
        outputs=outputs,
        exporter=exported.exporter,
        optimizations=[*notes, *winner.optimizations],
        validation_passed=winner.passed,
        metrics=winner.metrics,
        latency_ms_before=before.batch1_ms,
        latency_ms_after=winner.latency_ms,
        latency_ms_batch8_after=winner.latency_ms_batch8,
        speedup=round(before.batch1_ms / winner.latency_ms, 3) if winner.latency_ms else None,
        latency_provider=ep,
        source_sha256=fetched.sha256,
        source_uri=request.source.uri,
        candidates=candidates,
        revision=request.revision,
        sparsity=None if sparsity is None else round(sparsity, 6),
        ort_artifact_uri=ort_uri,
        ort_sha256=ort_sha,
        validation_message=validation_message,
        timings=timings,
    )
    start = time.perf_counter()
    report = store.commit(request.namespace, request.name, request.revision, files, report)
    report.timings["store"] = round(time.perf_counter() - start, 3)
    return report


def _clean(metrics: Metrics) -> Metrics:
    """Round for the report (and keep JSON valid: non-finite values become absent)."""
    import math

    data = {
        k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else None)
        for k, v in metrics.model_dump().items()
    }
    return Metrics.model_validate(data)


def _batch_size(inputs: list[TensorSpec], conversion: ConversionOptions) -> int:
    """Validation batch: 8 with a dynamic batch axis, else the fixed first dimension."""
    if conversion.dynamic_batch:
        return VALIDATION_BATCH
    fixed = {s.shape[0] for s in inputs if s.shape and s.shape[0] > 0}
    return fixed.pop() if len(fixed) == 1 else 1


def _validation_batches(request: Request, source: Source, batch: int, work: Path) -> list[samples.Batch]:
    v = request.validation
    if v.dataset is not None:
        path = locations.fetch(v.dataset.uri, work / "dataset", pvc_root=request.pvc_root).path
        return samples.from_npz(path, source.inputs, v.samples, batch, "validation.dataset")
    if source.tokenizer is not None and all(s.dtype.value == "int64" for s in source.inputs):
        return samples.text(source.tokenizer, [s.name for s in source.inputs], v.samples, batch)
    return samples.synthetic(source.inputs, v.samples, batch)


def _calibration_batches(request: Request, source: Source, work: Path) -> list[samples.Batch] | None:
    if Precision.INT8_STATIC not in request.optimization.precision:
        return None
    cal = request.optimization.quantization.calibration
    if cal is None:
        raise InvalidSpec("precision int8-static needs quantization.calibration")
    path = locations.fetch(cal.uri, work / "calibration", pvc_root=request.pvc_root).path
    return samples.from_npz(path, source.inputs, cal.samples, VALIDATION_BATCH, "quantization.calibration")
