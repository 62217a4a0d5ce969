"""PyTorch -> ONNX: the dynamo exporter where it works, the TorchScript exporter otherwise.

"Works" is checked, not assumed: the exported graph must pass `onnx.checker`, load in ONNX
Runtime, reproduce the torch outputs on the example batch, and accept a different batch size
when the batch axis is dynamic. Only then is it kept; otherwise the TorchScript exporter gets
its turn, and the report records which one produced the artifact (and why the first lost).
Both failing is a permanent `ExportFailed` naming each exporter's error (typically an
operator neither supports).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ptm_runtime.convert import samples
from ptm_runtime.convert.errors import ExportFailed, InvalidSource
from ptm_runtime.convert.sources import Source, onnx_inputs_outputs
from ptm_runtime.options import ConversionOptions, TensorSpec

log = logging.getLogger(__name__)

#: The dynamo exporter emits opset 18 and newer only.
DYNAMO_MIN_OPSET = 18


@dataclass
class Exported:
    path: Path
    exporter: str
    """dynamo, torchscript, passthrough or tf2onnx."""
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    notes: list[str] = field(default_factory=list)


def model_opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def export(source: Source, example: samples.Batch, conversion: ConversionOptions, out: Path) -> Exported:
    """Produce `out` (an fp32 ONNX model) from the source."""
    if not source.is_torch:
        return _passthrough(source, out)
    dynamic = _dynamic_axes(source.inputs, conversion)
    # a dynamic axis whose example size is 1 would be specialized away: give the batch 2 rows
    if conversion.dynamic_batch and samples.batch_size_of(example) < 2:
        example = samples.tile(example, 2)
    reference = source.reference(example)  # also teaches FlatOutputs its output names
    output_names = list(source.module.names)
    errors: list[str] = []
    attempts = []
    if conversion.opset >= DYNAMO_MIN_OPSET:
        attempts.append("dynamo")
    else:
        errors.append(f"dynamo: skipped, it needs opset >= {DYNAMO_MIN_OPSET} (asked {conversion.opset})")
    attempts.append("torchscript")
    for exporter in attempts:
        try:
            with _quiet():
                if exporter == "dynamo":
                    _export_dynamo(source, example, output_names, dynamic, conversion.opset, out)
                else:
                    _export_torchscript(source, example, output_names, dynamic, conversion, out)
            model = onnx.load(str(out))
            onnx.checker.check_model(model)
            _check_runs(out, source, example, reference, conversion.dynamic_batch)
        except Exception as exc:  # exporters raise many unrelated types; the next one gets a turn
            errors.append(f"{exporter}: {_first_lines(exc)}")
            log.info("the %s exporter did not produce a usable model: %s", exporter, errors[-1])
            out.unlink(missing_ok=True)
            continue
        inputs, outputs = onnx_inputs_outputs(model)
        return Exported(out, exporter, model_opset(model), inputs, outputs, notes=errors)
    raise ExportFailed("no exporter could convert the model to ONNX: " + " | ".join(errors))


def _passthrough(source: Source, out: Path) -> Exported:
    assert source.onnx_path is not None
    model = onnx.load(str(source.onnx_path))
    onnx.save_model(model, str(out))  # inlines external data into one file
    inputs, outputs = onnx_inputs_outputs(model)
    return Exported(
        out, source.exporter or "passthrough", model_opset(model), source.inputs or inputs, outputs
    )


def _dynamic_axes(inputs: list[TensorSpec], conversion: ConversionOptions) -> dict[str, list[int]]:
    axes: dict[str, list[int]] = {}
    for spec in inputs:
        wanted = {i for i, d in enumerate(spec.shape) if d == -1 and i > 0}
        if conversion.dynamic_batch and spec.shape:
            wanted.add(0)
        wanted.update(conversion.dynamic_axes.get(spec.name, []))
        bad = [a for a in wanted if a >= max(len(spec.shape), 1)]
        if bad and spec.shape:
            raise InvalidSource(f"dynamic axes {bad} of input {spec.name} exceed its rank {len(spec.shape)}")
        axes[spec.name] = sorted(wanted)
    return axes


def _tensors(source: Source, batch: samples.Batch) -> tuple[Any, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[s.name])) for s in source.inputs)


def _export_dynamo(
    source: Source,
    example: samples.Batch,
    output_names: list[str],
    dynamic: dict[str, list[int]],
    opset: int,
    out: Path,
) -> None:
    args = _tensors(source, example)
    names = [s.name for s in source.inputs]
    if source.program is not None:
        program = torch.onnx.export(
            source.program,
            args,
            input_names=names,
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
        )
    else:
        # FlatOutputs.forward(*args): torch.export sees one parameter holding the tuple
        shapes = (
            tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic[name]} or None for name in names),
        )
        program = torch.onnx.export(
            source.module,
            args,
            input_names=names,
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=shapes,
            verbose=False,
        )
    if program is None:  # only the TorchScript exporter returns None
        raise RuntimeError("the dynamo exporter returned no program")
    program.save(str(out), external_data=False)


def _export_torchscript(
    source: Source,
    example: samples.Batch,
    output_names: list[str],
    dynamic: dict[str, list[int]],
    conversion: ConversionOptions,
    out: Path,
) -> None:
    axes: dict[str, dict[int, str]] = {
        name: {a: ("batch" if a == 0 else f"{name}_{a}") for a in wanted}
        for name, wanted in dynamic.items()
        if wanted
    }
    for name in output_names:
        wanted = set(conversion.dynamic_axes.get(name, []))
        if conversion.dynamic_batch:
            wanted.add(0)
        if wanted:
            axes[name] = {a: ("batch" if a == 0 else f"{name}_{a}") for a in sorted(wanted)}
    inner = getattr(source.module, "inner", None)
    # a ScriptModule is a graph already: export it as is (tracing through it is not supported)
    model = inner if isinstance(inner, torch.jit.ScriptModule) else source.module
    torch.onnx.export(
        model,
        _tensors(source, example),
        str(out),
        input_names=[s.name for s in source.inputs],
        output_names=output_names,
        opset_version=conversion.opset,
        dynamic_axes=axes or None,
        dynamo=False,
        do_constant_folding=True,
    )


def _check_runs(
    path: Path, source: Source, example: samples.Batch, reference: list[np.ndarray], dynamic_batch: bool
) -> None:
    """The exported graph must run in ONNX Runtime and agree with torch on the example."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: example[n] for n in names})
    if len(got) != len(reference):
        raise RuntimeError(f"the graph has {len(got)} outputs, the module {len(reference)}")
    for i, (g, r) in enumerate(zip(got, reference, strict=True)):
        if g.shape != r.shape:
            raise RuntimeError(f"output {i} has shape {g.shape}, torch gives {r.shape}")
        if np.issubdtype(r.dtype, np.floating):
            scale = float(np.abs(r).max()) if r.size else 0.0
            if not np.allclose(g, r, rtol=1e-2, atol=1e-3 * max(scale, 1.0)):
                raise RuntimeError(f"output {i} differs from torch by up to {float(np.abs(g - r).max()):.3g}")
    if dynamic_batch:
        bigger = samples.tile(example, samples.batch_size_of(example) + 1)
        more = session.run(None, {n: bigger[n] for n in names})
        if more[0].shape[:1] != (samples.batch_size_of(bigger),):
            raise RuntimeError("the batch axis of the first output is not dynamic")


def _first_lines(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    # the dynamo exporter puts boilerplate first and the cause under this heading
    _, found, cause = text.partition("## Exception summary")
    if found:
        text = cause.strip()
    lines = [line for line in text.splitlines() if line.strip()]
    short = " ".join(lines[:4])
    return short if len(short) <= limit else short[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and deprecation warnings; keep the job log readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
