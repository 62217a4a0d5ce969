"""`ptm convert`: the conversion Job's entry point, also usable on a laptop.

Options come from a PretrainedModel-like YAML (`--spec`: spec.source / conversion /
optimization / validation, parsed with the very models the CRD composes) and/or flags, flags
winning. The outcome goes three ways: the full report beside the artifact, the compact report
(or a compact failure) in the termination log for the operator, and a human summary on
stdout. The exit code tells the operator whether to retry (ptm_runtime.report).

Heavy imports (torch, onnx, onnxruntime) happen only once a conversion actually runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ptm_runtime.convert.errors import ConvertError, InvalidSpec, ValidationFailed
from ptm_runtime.options import (
    CalibrationMethod,
    ConversionOptions,
    ConversionTarget,
    FailurePolicy,
    GraphOptimizationLevel,
    OptimizationOptions,
    Precision,
    PruningMethod,
    QuantizationMode,
    SourceFormat,
    SourceOptions,
    TensorDType,
    ValidationOptions,
)
from ptm_runtime.report import EXIT_INTERNAL, EXIT_OK, Candidate, Failure, Report, SourceDigest

log = logging.getLogger("ptm_runtime.convert")

DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptm convert",
        description="Convert a checkpoint to a validated, optimized ONNX artifact and report.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 invalid spec/source (permanent), "
        "3 validation failed (permanent), 75 transient (retry).",
    )
    src = p.add_argument_group("source")
    src.add_argument(
        "--spec", type=Path, help="PretrainedModel YAML (spec.source/conversion/optimization/validation)"
    )
    src.add_argument(
        "--spec-json", metavar="JSON", help='the same inline, as JSON: {"spec": {"source": {...}, ...}}'
    )
    src.add_argument(
        "--source", help="checkpoint: path, file://, pvc://CLAIM/PATH, s3://, http(s)://, hf://ORG/NAME"
    )
    src.add_argument("--format", help=f"one of: {', '.join(f.value for f in SourceFormat)}")
    src.add_argument(
        "--architecture", help="module:factory for pytorch-state-dict (torchvision.models:resnet18)"
    )
    src.add_argument(
        "--task", help="Hugging Face task (feature-extraction, sentence-embedding, text-classification...)"
    )
    src.add_argument("--sha256", help="pin: the checkpoint's sha256")
    src.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME:DTYPE:SHAPE",
        help="input signature, e.g. input:float32:-1,3,224,224 (repeatable)",
    )
    src.add_argument(
        "--allow-pickle", action="store_true", default=None, help="allow full pickles (runs code)"
    )

    conv = p.add_argument_group("conversion")
    conv.add_argument("--opset", type=int)
    conv.add_argument("--no-dynamic-batch", dest="dynamic_batch", action="store_false", default=None)
    conv.add_argument(
        "--dynamic-axis", action="append", default=[], metavar="NAME=AXES", help="e.g. input_ids=0,1"
    )
    conv.add_argument("--target", action="append", default=[], choices=[t.value for t in ConversionTarget])

    opt = p.add_argument_group("optimization")
    opt.add_argument(
        "--precision",
        action="append",
        default=[],
        help="candidate(s) in preference order, e.g. "
        "int8-dynamic,fp32 (repeatable): " + ", ".join(x.value for x in Precision),
    )
    opt.add_argument("--graph-optimization-level", choices=[x.value for x in GraphOptimizationLevel])
    opt.add_argument("--no-keep-io-fp32", dest="keep_io_fp32", action="store_false", default=None)
    opt.add_argument("--quantization-mode", choices=[x.value for x in QuantizationMode])
    opt.add_argument("--per-channel", action="store_true", default=None)
    opt.add_argument(
        "--calibration", metavar="URI", help=".npz calibration set (implies quantization mode static)"
    )
    opt.add_argument("--calibration-samples", type=int)
    opt.add_argument("--calibration-method", choices=[x.value for x in CalibrationMethod])
    opt.add_argument("--pruning", choices=[x.value for x in PruningMethod])
    opt.add_argument("--sparsity", type=float)

    val = p.add_argument_group("validation")
    val.add_argument(
        "--dataset", metavar="URI", help=".npz validation set (default: synthetic or sample sentences)"
    )
    val.add_argument("--samples", type=int)
    val.add_argument("--max-abs-error", type=float)
    val.add_argument("--min-cosine-similarity", type=float)
    val.add_argument("--min-top1-agreement", type=float)
    val.add_argument("--max-accuracy-drop", type=float)
    val.add_argument("--failure-policy", choices=[x.value for x in FailurePolicy])

    out = p.add_argument_group("output")
    out.add_argument(
        "--store", required=True, help="artifact store: path, file://, pvc://CLAIM/PATH or s3://BUCKET/PREFIX"
    )
    out.add_argument("--namespace", help="namespace (default: the spec's, else 'default')")
    out.add_argument("--name", help="model name (default: the spec's metadata.name)")
    out.add_argument("--revision", help="revision (default: a digest of source and options)")
    out.add_argument(
        "--digest-only",
        action="store_true",
        help="only fetch the source and report its sha256 (what updatePolicy Poll runs)",
    )
    out.add_argument(
        "--termination-log",
        type=Path,
        help=f"compact report path (default {DEFAULT_TERMINATION_LOG} if present)",
    )
    out.add_argument(
        "--pvc-root", type=Path, help="where pvc://CLAIM is mounted (default $PTM_PVC_ROOT or /mnt/pvc)"
    )
    out.add_argument("--json", action="store_true", help="print the full report as JSON instead of a summary")
    out.add_argument("-v", "--verbose", action="store_true")
    return p


def _validation_message(exc: ValidationError, part: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in (part, *err["loc"]))
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        parts.append(f"{loc}: {err['msg']}{shown}")
    return "; ".join(parts)


def _parse_input(text: str) -> dict[str, Any]:
    try:
        name, dtype, shape = text.split(":")
        dims = [int(d) for d in shape.split(",") if d.strip()]
    except ValueError as exc:
        raise InvalidSpec(
            f"--input {text!r}: expected NAME:DTYPE:DIM,DIM,... e.g. input:float32:-1,3,224,224"
        ) from exc
    if dtype not in {d.value for d in TensorDType}:
        raise InvalidSpec(f"--input {text!r}: dtype must be one of {', '.join(d.value for d in TensorDType)}")
    return {"name": name, "dtype": dtype, "shape": dims}


def build_request(args: argparse.Namespace) -> Any:
    """Options from --spec and flags (flags win), validated with the shared models."""
    from ptm_runtime.convert.locations import DEFAULT_PVC_ROOT, to_uri
    from ptm_runtime.convert.pipeline import Request

    doc: dict[str, Any] = {}
    if args.spec is not None and args.spec_json is not None:
        raise InvalidSpec("give --spec or --spec-json, not both")
    if args.spec is not None or args.spec_json is not None:
        what = f"--spec {args.spec}" if args.spec is not None else "--spec-json"
        try:
            loaded = (
                yaml.safe_load(args.spec.read_text()) if args.spec is not None else json.loads(args.spec_json)
            )
        except (OSError, yaml.YAMLError, ValueError) as exc:
            raise InvalidSpec(f"{what}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise InvalidSpec(f"{what}: expected a mapping")
        doc = loaded
    found_spec = doc.get("spec", doc)
    spec: dict[str, Any] = found_spec if isinstance(found_spec, dict) else {}
    found_meta = doc.get("metadata")
    meta: dict[str, Any] = found_meta if isinstance(found_meta, dict) else {}
    source: dict[str, Any] = dict(spec.get("source") or {})
    conversion: dict[str, Any] = dict(spec.get("conversion") or {})
    optimization: dict[str, Any] = dict(spec.get("optimization") or {})
    validation: dict[str, Any] = dict(spec.get("validation") or {})

    def put(target: dict[str, Any], key: str, value: Any) -> None:
        if value is not None:
            target[key] = value

    put(source, "uri", to_uri(args.source) if args.source else None)
    put(source, "format", args.format)
    put(source, "architecture", args.architecture)
    put(source, "task", args.task)
    put(source, "sha256", args.sha256)
    put(source, "allowPickle", args.allow_pickle)
    if args.input:
        source["inputs"] = [_parse_input(x) for x in args.input]
    put(conversion, "opset", args.opset)
    put(conversion, "dynamicBatch", args.dynamic_batch)
    if args.dynamic_axis:
        axes = dict(conversion.get("dynamicAxes") or {})
        for item in args.dynamic_axis:
            name, _, dims = item.partition("=")
            try:
                axes[name] = [int(d) for d in dims.split(",") if d.strip()]
            except ValueError as exc:
                raise InvalidSpec(f"--dynamic-axis {item!r}: expected NAME=AXIS,AXIS") from exc
        conversion["dynamicAxes"] = axes
    if args.target:
        conversion["targets"] = args.target
    if args.precision:
        optimization["precision"] = [
            p.strip() for item in args.precision for p in item.split(",") if p.strip()
        ]
    put(optimization, "graphOptimizationLevel", args.graph_optimization_level)
    put(optimization, "keepIoFp32", args.keep_io_fp32)
    quant: dict[str, Any] = dict(optimization.get("quantization") or {})
    put(quant, "mode", args.quantization_mode)
    put(quant, "perChannel", args.per_channel)
    if args.calibration or args.calibration_samples is not None or args.calibration_method:
        cal = dict(quant.get("calibration") or {})
        put(cal, "uri", to_uri(args.calibration) if args.calibration else None)
        put(cal, "samples", args.calibration_samples)
        put(cal, "method", args.calibration_method)
        quant["calibration"] = cal
        quant.setdefault("mode", QuantizationMode.STATIC.value)
    if quant:
        optimization["quantization"] = quant
    if args.pruning or args.sparsity is not None:
        pruning = dict(optimization.get("pruning") or {})
        put(pruning, "method", args.pruning)
        put(pruning, "sparsity", args.sparsity)
        optimization["pruning"] = pruning
    if args.dataset:
        validation["dataset"] = {"uri": to_uri(args.dataset)}
    put(validation, "samples", args.samples)
    put(validation, "maxAbsError", args.max_abs_error)
    put(validation, "minCosineSimilarity", args.min_cosine_similarity)
    put(validation, "minTop1Agreement", args.min_top1_agreement)
    put(validation, "maxAccuracyDrop", args.max_accuracy_drop)
    put(validation, "failurePolicy", args.failure_policy)

    parsed: dict[str, Any] = {}
    for part, model, data in (
        ("source", SourceOptions, source),
        ("conversion", ConversionOptions, conversion),
        ("optimization", OptimizationOptions, optimization),
        ("validation", ValidationOptions, validation),
    ):
        try:
            parsed[part] = model.model_validate(data)
        except ValidationError as exc:
            raise InvalidSpec(_validation_message(exc, part)) from exc
    name = args.name or meta.get("name")
    if not name:
        raise InvalidSpec("--name is required (or metadata.name in --spec)")
    namespace = args.namespace or meta.get("namespace") or "default"
    revision = args.revision or default_revision(parsed)
    return Request(
        source=parsed["source"],
        conversion=parsed["conversion"],
        optimization=parsed["optimization"],
        validation=parsed["validation"],
        store=args.store,
        namespace=str(namespace),
        name=str(name),
        revision=revision,
        pvc_root=args.pvc_root or DEFAULT_PVC_ROOT,
    )


def default_revision(parsed: dict[str, Any]) -> str:
    """A digest of everything that changes the artifact (for runs without an operator)."""
    blob = json.dumps({k: v.wire() for k, v in sorted(parsed.items())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def summary(report: Report, reused: bool) -> str:
    lines = [
        f"{'reused' if reused else 'converted'}: {report.artifact_uri}",
        f"  revision {report.revision}  precision {report.precision.value}  exporter {report.exporter}  "
        f"opset {report.opset}  size {report.size_bytes} B  sha256 {report.sha256}",
        f"  validation {'passed' if report.validation_passed else 'FAILED (served anyway: failurePolicy Warn)'}",
    ]
    if report.latency_ms_before is not None and report.latency_ms_after is not None:
        lines.append(
            f"  latency p50 batch 1: {report.latency_ms_before:.3f} ms -> {report.latency_ms_after:.3f} ms "
            f"on {report.latency_provider} (speedup {report.speedup})"
        )
    if report.candidates:
        lines.append(candidate_table(report.candidates))
    return "\n".join(lines)


def candidate_table(candidates: list[Candidate]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [
        (
            "precision",
            "pass",
            "max|err|",
            "min cos",
            "mean cos",
            "top-1",
            "p50 b1 ms",
            "p50 b8 ms",
            "size",
            "why not",
        )
    ]
    for c in candidates:
        m = c.metrics
        rows.append(
            (
                c.precision.value,
                "yes" if c.passed else "no",
                num(m.max_abs_error, ".3g"),
                num(m.cosine_similarity, ".6f"),
                num(m.mean_cosine_similarity, ".6f"),
                num(m.top1_agreement, ".4f"),
                num(c.latency_ms, ".3f"),
                num(c.latency_ms_batch8, ".3f"),
                "-" if c.size_bytes is None else str(c.size_bytes),
                c.reason,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def _termination_path(args: argparse.Namespace) -> Path | None:
    if args.termination_log is not None:
        return Path(args.termination_log)
    return DEFAULT_TERMINATION_LOG if DEFAULT_TERMINATION_LOG.exists() else None


def _write_termination(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        path.write_text(text)
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)


def source_digest(request: Any) -> SourceDigest:
    """Fetch the source into a scratch folder and return its digest (the folder is removed)."""
    import tempfile

    from ptm_runtime.convert import locations

    with tempfile.TemporaryDirectory(prefix="ptm-digest-") as work:
        fetched = locations.fetch(request.source.uri, Path(work), pvc_root=request.pvc_root)
    return SourceDigest(source_digest=fetched.sha256)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("ptm_runtime").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    termination = _termination_path(args)
    revision = args.revision
    try:
        request = build_request(args)
        revision = request.revision
        if args.digest_only:
            found = source_digest(request)
            _write_termination(termination, found.model_dump_json(by_alias=True))
            print(f"source {request.source.uri}: sha256 {found.source_digest}")
            return EXIT_OK
        from ptm_runtime.convert.pipeline import convert

        outcome = convert(request)
    except ConvertError as exc:
        candidates = exc.candidates if isinstance(exc, ValidationFailed) else []
        failure = Failure(
            revision=revision,
            reason=exc.reason,
            message=exc.message,
            exit_code=exc.exit_code,
            permanent=exc.permanent,
            candidates=candidates,
        )
        _write_termination(termination, failure.compact())
        print(f"conversion failed ({exc.reason}, exit {exc.exit_code}): {exc.message}", file=sys.stderr)
        if candidates:
            print(candidate_table(candidates))
        return exc.exit_code
    except Exception as exc:  # a bug: say so, and let the operator retry a bounded number of times
        traceback.print_exc()
        failure = Failure(
            revision=revision,
            reason="InternalError",
            message=f"{type(exc).__name__}: {exc}",
            exit_code=EXIT_INTERNAL,
            permanent=False,
        )
        _write_termination(termination, failure.compact())
        return EXIT_INTERNAL
    _write_termination(termination, outcome.report.compact())
    if args.json:
        print(outcome.report.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    else:
        print(summary(outcome.report, outcome.reused))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
