"""Optimized candidates: one artifact per precision, each built from the same fp32 export.

- fp32: ONNX Runtime offline graph optimization only.
- fp16: onnxruntime.transformers' float16 conversion (it keeps Cast nodes consistent, which
  onnxconverter-common's does not for dynamo exports); inputs/outputs stay fp32 if asked.
- int8-dynamic: weights quantized ahead of time, activations at run time (no data needed).
- int8-static: weights and activations, QDQ format, ranges calibrated on a data set.

Offline graph optimization is applied to every candidate at the requested level, with two
caps that keep the stored artifact portable across execution providers (the server applies
everything else online, on the GPU it actually has): `all` stops at `extended` (its layout
transformations are specific to the converter's CPU), and quantized candidates stop at
`basic` (extended fusions turn QDQ pairs into CPU-only integer kernels, which TensorRT and
CUDA cannot use).

Pruning happens in torch, before export, so every candidate inherits it; the measured
sparsity (share of zeroed weights in the pruned layers) goes into the report.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ptm_runtime.convert import samples
from ptm_runtime.convert.errors import InvalidSpec
from ptm_runtime.options import (
    CalibrationMethod,
    GraphOptimizationLevel,
    OptimizationOptions,
    Precision,
    PruningMethod,
    PruningOptions,
)

log = logging.getLogger(__name__)

_ORDER = [
    GraphOptimizationLevel.DISABLED,
    GraphOptimizationLevel.BASIC,
    GraphOptimizationLevel.EXTENDED,
    GraphOptimizationLevel.ALL,
]
#: Layer types whose weights pruning touches (TorchScript modules report their original name).
PRUNABLE = frozenset({"Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D"})


def _cap(level: GraphOptimizationLevel, cap: GraphOptimizationLevel) -> GraphOptimizationLevel:
    return level if _ORDER.index(level) <= _ORDER.index(cap) else cap


def graph_optimize(
    src: Path, dst: Path, level: GraphOptimizationLevel, *, quantized: bool = False
) -> list[str]:
    """ONNX Runtime offline graph optimization of `src` into `dst`; returns what was done."""
    import onnxruntime as ort

    effective = _cap(level, GraphOptimizationLevel.BASIC if quantized else GraphOptimizationLevel.EXTENDED)
    if effective is GraphOptimizationLevel.DISABLED:
        shutil.copyfile(src, dst)
        return []
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        GraphOptimizationLevel.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        GraphOptimizationLevel.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[effective]
    so.optimized_model_filepath = str(dst)
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # keep the unoptimized candidate; validation still decides
        log.warning("offline graph optimization failed for %s: %s", src.name, exc)
        shutil.copyfile(src, dst)
        return [f"ort-graph-optimization skipped: {str(exc)[:200]}"]
    note = f"ort-graph-optimization:{effective.value}"
    if effective is not level:
        note += f" (capped from {level.value})"
    return [note]


def to_fp16(src: Path, dst: Path, keep_io_fp32: bool) -> list[str]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    onnx.save_model(convert_float_to_float16(model, keep_io_types=keep_io_fp32), str(dst))
    return ["fp16 (io fp32)" if keep_io_fp32 else "fp16"]


def int8_dynamic(src: Path, dst: Path, per_channel: bool) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Conv is left out: ConvInteger has no int8-weight kernel in ONNX Runtime
    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"],
    )
    return [f"int8-dynamic (weights QInt8{', per channel' if per_channel else ''})"]


def int8_static(
    src: Path,
    dst: Path,
    calibration: list[samples.Batch],
    limit: int,
    method: CalibrationMethod,
    per_channel: bool,
    work: Path,
) -> list[str]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / f"{src.stem}.preprocessed.onnx"
    notes = []
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        notes.append("quant-preprocess")
    except Exception as exc:  # pre-processing is an optimization; quantize the export as it is
        log.info("quantization pre-processing skipped: %s", exc)
        prepared = src

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """One sample at a time, at most `limit` of them."""

        def __init__(self) -> None:
            self._rows = samples.iterate_rows(calibration)
            self._left = limit

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._left <= 0:
                return None
            self._left -= 1
            return next(self._rows, None)

    quantize_static(
        str(prepared),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(OrtMethod, method.value),
        extra_options={"CalibTensorRangeSymmetric": False},
    )
    count = min(limit, sum(samples.batch_size_of(b) for b in calibration))
    notes.append(
        f"int8-static (QDQ, {method.value} calibration on {count} samples{', per channel' if per_channel else ''})"
    )
    return notes


def build(
    precision: Precision,
    base: Path,
    out_dir: Path,
    options: OptimizationOptions,
    calibration: list[samples.Batch] | None,
) -> tuple[Path, list[str]]:
    """The candidate for `precision` as a file in `out_dir`, and how it was built."""
    stage = out_dir / f"{precision.value}.stage.onnx"
    dst = out_dir / f"{precision.value}.onnx"
    quantized = precision in (Precision.INT8_DYNAMIC, Precision.INT8_STATIC)
    if precision is Precision.FP32:
        notes: list[str] = []
        stage = base
    elif precision is Precision.FP16:
        notes = to_fp16(base, stage, options.keep_io_fp32)
    elif precision is Precision.INT8_DYNAMIC:
        notes = int8_dynamic(base, stage, options.quantization.per_channel)
    else:
        cal = options.quantization.calibration
        if cal is None or calibration is None:
            raise InvalidSpec("precision int8-static needs quantization.calibration")
        notes = int8_static(
            base, stage, calibration, cal.samples, cal.method, options.quantization.per_channel, out_dir
        )
    notes += graph_optimize(stage, dst, options.graph_optimization_level, quantized=quantized)
    return dst, notes


def to_ort_format(src: Path, dst: Path) -> None:
    """Save `src` in ONNX Runtime's ORT format (for onnxruntime-mobile / minimal builds)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])  # it must load back


def prune(module: Any, options: PruningOptions) -> tuple[float, int]:
    """Zero `options.sparsity` of the weights of every Linear/Conv layer in place: magnitude
    (smallest |w| per layer) or structured (output channels with the smallest L2 norm).
    Returns (measured sparsity over the pruned layers, number of layers)."""
    import torch

    if options.method is PruningMethod.NONE or options.sparsity <= 0:
        return 0.0, 0
    zeros = total = layers = 0
    with torch.no_grad():
        for sub in module.modules():
            kind = getattr(sub, "original_name", type(sub).__name__)
            weight = getattr(sub, "weight", None)
            if kind not in PRUNABLE or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                continue
            if options.method is PruningMethod.MAGNITUDE:
                k = round(options.sparsity * weight.numel())
                if k:
                    idx = torch.topk(weight.abs().flatten(), k, largest=False).indices
                    weight.view(-1)[idx] = 0.0
            else:
                channels = weight.shape[0] if kind != "Conv1D" else weight.shape[1]
                dim = 0 if kind != "Conv1D" else 1
                k = round(options.sparsity * channels)
                if k:
                    norms = weight.transpose(0, dim).flatten(1).norm(p=2, dim=1)
                    idx = torch.topk(norms, k, largest=False).indices
                    weight.index_fill_(dim, idx, 0.0)
            zeros += int((weight == 0).sum())
            total += weight.numel()
            layers += 1
    if not layers:
        raise InvalidSpec("pruning found no Linear or Conv layers to prune")
    return zeros / total, layers
