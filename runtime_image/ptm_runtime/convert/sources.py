"""Checkpoints made into something exportable and runnable as the validation reference.

A `Source` is either a torch module (TorchScript, state_dict + architecture, Hugging Face, or
a torch.export program) or an ONNX graph (passthrough, or TensorFlow through tf2onnx). Torch
modules are wrapped so that they return a flat tuple of tensors with stable names: the ONNX
outputs, the reference outputs and the report all use the same names in the same order.

Security: checkpoints load with `torch.load(weights_only=True)`; a full pickle (which runs code
when loaded) is refused unless `allowPickle` is set. Hugging Face checkpoints that need
`trust_remote_code` are refused outright.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import pickle
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptm_runtime.convert.errors import InvalidSource, InvalidSpec
from ptm_runtime.options import SourceFormat, SourceOptions, TensorDType, TensorSpec

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[Any, TensorDType] = {
    torch.float32: TensorDType.FLOAT32,
    torch.float16: TensorDType.FLOAT16,
    torch.int64: TensorDType.INT64,
    torch.int32: TensorDType.INT32,
    torch.int8: TensorDType.INT8,
    torch.uint8: TensorDType.UINT8,
    torch.bool: TensorDType.BOOL,
}
#: Hugging Face task -> (transformers Auto class, output to export, classifier?).
HF_TASKS: dict[str, tuple[str, str, bool]] = {
    "feature-extraction": ("AutoModel", "last_hidden_state", False),
    "sentence-similarity": ("AutoModel", "sentence_embedding", False),
    "sentence-embedding": ("AutoModel", "sentence_embedding", False),
    "text-classification": ("AutoModelForSequenceClassification", "logits", True),
    "token-classification": ("AutoModelForTokenClassification", "logits", False),
    "fill-mask": ("AutoModelForMaskedLM", "logits", False),
    "image-classification": ("AutoModelForImageClassification", "logits", True),
    "audio-classification": ("AutoModelForAudioClassification", "logits", True),
}


@dataclass
class Source:
    """A loaded checkpoint: a torch module (or torch.export program) or an ONNX file."""

    format: SourceFormat
    inputs: list[TensorSpec]
    module: Any = None
    """torch.nn.Module returning a flat tuple of tensors (see `FlatOutputs`)."""
    program: Any = None
    """torch.export.ExportedProgram (exported as it is when nothing modifies the module)."""
    onnx_path: Path | None = None
    output_names: list[str] = field(default_factory=list)
    tokenizer: Any = None
    classifier: bool | None = None
    """True for classifiers (top-1 agreement is the accuracy measure), None when unknown."""
    exporter: str | None = None
    """Set for ONNX sources: passthrough or tf2onnx."""
    notes: list[str] = field(default_factory=list)
    _session: Any = None

    @property
    def is_torch(self) -> bool:
        return self.module is not None

    def reference(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The source model's outputs for one batch, as float arrays in output order."""
        if self.module is not None:
            tensors = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.inputs]
            with torch.inference_mode():
                out = self.module(*tensors)
            return [t.detach().float().numpy() if t.is_floating_point() else t.numpy() for t in out]
        if self._session is None:
            import onnxruntime as ort

            assert self.onnx_path is not None
            self._session = ort.InferenceSession(str(self.onnx_path), providers=["CPUExecutionProvider"])
        return list(self._session.run(None, {s.name: feeds[s.name] for s in self.inputs}))


class FlatOutputs(torch.nn.Module):
    """Wraps a module so that forward(*inputs) returns a flat tuple of tensors; the names
    (`output`, `output_1`, dict keys...) are learnt on the first call."""

    def __init__(
        self, inner: torch.nn.Module, select: Callable[[Any, tuple[Any, ...]], Any] | None = None
    ) -> None:
        super().__init__()
        self.inner = inner
        self.select = select
        self.names: list[str] = []

    def forward(self, *args: Any) -> tuple[Any, ...]:
        out = self.inner(*args)
        if self.select is not None:
            out = self.select(out, args)
        flat = _flatten(out, "output")
        if not flat:
            raise InvalidSource("the model returned no tensors")
        if not self.names:
            self.names = [name for name, _ in flat]
        return tuple(t for _, t in flat)


def _flatten(out: Any, name: str) -> list[tuple[str, Any]]:
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, Mapping):
        items: list[tuple[str, Any]] = []
        for key, value in out.items():
            items.extend(_flatten(value, str(key)))
        return items
    if isinstance(out, list | tuple):
        items = []
        for i, value in enumerate(out):
            items.extend(_flatten(value, name if len(out) == 1 else f"{name}_{i}"))
        return items
    return []


def load(path: Path, options: SourceOptions, workdir: Path, opset: int = 18) -> Source:
    """Load the checkpoint at `path` according to `options.format`."""
    fmt = options.format
    if fmt is SourceFormat.PYTORCH_STATE_DICT:
        return _state_dict(path, options)
    if fmt is SourceFormat.PYTORCH_TORCHSCRIPT:
        return _torchscript(path, options)
    if fmt is SourceFormat.PYTORCH_EXPORTED:
        return _exported(path, options)
    if fmt is SourceFormat.HUGGINGFACE:
        return _huggingface(path, options)
    if fmt is SourceFormat.ONNX:
        return _onnx(path, options, exporter="passthrough")
    if fmt is SourceFormat.TENSORFLOW_SAVEDMODEL:
        return _tensorflow(path, options, workdir, opset)
    raise InvalidSpec(f"unknown source format {fmt!r}")  # pragma: no cover - enum is exhaustive


def _need_inputs(options: SourceOptions) -> list[TensorSpec]:
    if not options.inputs:
        raise InvalidSpec(
            f"source.inputs is required for {options.format.value}: the checkpoint does not record its "
            "input signature (e.g. inputs: [{name: input, shape: [-1, 3, 224, 224]}])"
        )
    return list(options.inputs)


def _single_file(path: Path, what: str) -> Path:
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        if len(files) != 1:
            raise InvalidSource(f"{path}: expected a {what} file, found a folder with {len(files)} files")
        return files[0]
    return path


# --- PyTorch ---------------------------------------------------------------------------------------


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if not allow_pickle and "weights_only" in str(exc).lower().replace(" ", "_"):
            raise InvalidSource(
                f"{path.name} is a full pickle (it holds Python objects, not only tensors) and loading it "
                "would run code from the checkpoint; save a state_dict instead, or set source.allowPickle: "
                "true if you trust it"
            ) from exc
        raise InvalidSource(f"{path.name}: corrupt checkpoint: {exc}") from exc
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        AttributeError,
        ModuleNotFoundError,
    ) as exc:
        raise InvalidSource(
            f"{path.name}: cannot read the checkpoint (truncated or corrupt?): {exc}"
        ) from exc


def _factory(architecture: str) -> torch.nn.Module:
    module_name, _, attr = architecture.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidSpec(f"architecture {architecture}: cannot import {module_name}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InvalidSpec(f"architecture {architecture}: {module_name} has no callable {attr}")
    try:
        built = factory()
    except Exception as exc:
        raise InvalidSpec(f"architecture {architecture}: calling {attr}() failed: {exc}") from exc
    if not isinstance(built, torch.nn.Module):
        raise InvalidSpec(
            f"architecture {architecture}: {attr}() returned {type(built).__name__}, not a torch module"
        )
    return built


def _as_state_dict(obj: Any, name: str) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            if all(k.startswith("module.") for k in tensors):
                tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
            return tensors
    raise InvalidSource(
        f"{name}: expected a state_dict (parameter names -> tensors), found {type(obj).__name__}"
    )


def _state_dict(path: Path, options: SourceOptions) -> Source:
    path = _single_file(path, "state_dict")
    inputs = _need_inputs(options)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidSource(f"{path.name}: cannot read the safetensors file: {exc}") from exc
    else:
        loaded = _torch_load(path, options.allow_pickle)
    if isinstance(loaded, torch.nn.Module):  # a full pickled module (only with allowPickle)
        module = loaded
    else:
        assert options.architecture is not None  # the options validator requires it
        state = _as_state_dict(loaded, path.name)
        module = _factory(options.architecture)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = str(exc).replace("\n\t", " ").replace("\n", " ")
            raise InvalidSource(
                f"the state_dict in {path.name} does not match architecture {options.architecture}: {detail[:1500]}"
            ) from exc
    return Source(format=options.format, inputs=inputs, module=FlatOutputs(module.eval()))


def _torchscript(path: Path, options: SourceOptions) -> Source:
    path = _single_file(path, "TorchScript")
    inputs = _need_inputs(options)
    try:
        module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError, OSError) as exc:
        raise InvalidSource(f"{path.name}: not a readable TorchScript archive: {str(exc)[:800]}") from exc
    return Source(format=options.format, inputs=inputs, module=FlatOutputs(module.eval()))


def _exported(path: Path, options: SourceOptions) -> Source:
    path = _single_file(path, "torch.export (.pt2)")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch.export.load raises a variety of types on bad archives
        raise InvalidSource(f"{path.name}: not a readable torch.export program: {str(exc)[:800]}") from exc
    inputs = list(options.inputs) or _program_inputs(program)
    return Source(format=options.format, inputs=inputs, module=FlatOutputs(program.module()), program=program)


def _program_inputs(program: Any) -> list[TensorSpec]:
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in program.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype not in TORCH_DTYPES:
            raise InvalidSource(f"input {name} of the exported program is not a tensor of a supported type")
        shape = [d if isinstance(d, int) else -1 for d in val.shape]
        specs.append(TensorSpec(name=name, dtype=TORCH_DTYPES[val.dtype], shape=shape))
    return specs


# --- Hugging Face ----------------------------------------------------------------------------------


def _huggingface(path: Path, options: SourceOptions) -> Source:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InvalidSource(
            f"{path}: a Hugging Face source is a folder with config.json (and model.safetensors)"
        )
    weights = sorted(
        p.name for p in path.iterdir() if p.suffix == ".safetensors" or p.name == "pytorch_model.bin"
    )
    if not weights:
        raise InvalidSource(f"{path}: no weights (model.safetensors) next to config.json")
    try:
        config_data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidSource(f"{path}/config.json: not valid JSON: {exc}") from exc
    if "auto_map" in config_data:
        raise InvalidSource(
            f"{path}: the model needs custom code (auto_map, trust_remote_code); ptm runs none"
        )
    task = options.task or _infer_task(path, config_data)
    if task not in HF_TASKS:
        raise InvalidSpec(
            f"task {task!r} is not supported for huggingface sources (supported: {sorted(HF_TASKS)})"
        )
    auto_name, output_key, classifier = HF_TASKS[task]
    import transformers

    try:
        model = getattr(transformers, auto_name).from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InvalidSource(f"{path}: cannot load as {auto_name} for task {task}: {str(exc)[:1200]}") from exc
    model.eval()
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            log.warning("tokenizer in %s not usable (%s); synthetic inputs will be used", path, exc)
    accepted = set(_forward_args(model))
    if tokenizer is not None and "input_ids" in accepted:
        names = [n for n in tokenizer.model_input_names if n in accepted]
        inputs = [TensorSpec(name=n, dtype=TensorDType.INT64, shape=[-1, -1]) for n in names]
    elif options.inputs:
        inputs = list(options.inputs)
    elif "pixel_values" in accepted:
        inputs = [_pixel_values(model.config)]
    else:
        raise InvalidSpec(
            f"cannot tell the inputs of {path} (no tokenizer, no image config); set source.inputs"
        )
    if inputs and options.inputs and [s.name for s in options.inputs] != [s.name for s in inputs]:
        log.info("using the tokenizer's inputs %s", [s.name for s in inputs])
    names = [s.name for s in inputs]
    pooling = _pooling(path) if output_key == "sentence_embedding" else None
    if pooling is not None and "attention_mask" not in names:
        raise InvalidSource(f"{path}: sentence embeddings need an attention_mask input")

    def select(out: Any, args: tuple[Any, ...]) -> Any:
        if pooling is None:
            return {output_key: out[output_key]}
        mode, normalize = pooling
        hidden = out["last_hidden_state"]
        mask = args[names.index("attention_mask")].unsqueeze(-1).to(hidden.dtype)
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).amax(dim=1)
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return {"sentence_embedding": pooled}

    wrapped = FlatOutputs(_KeywordCall(model, names), select)
    return Source(
        format=options.format,
        inputs=inputs,
        module=wrapped,
        tokenizer=tokenizer,
        classifier=classifier,
        notes=[f"task:{task}"],
    )


class _KeywordCall(torch.nn.Module):
    """Calls a Hugging Face model with positional tensors as keyword arguments."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: Any) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))


def _forward_args(model: Any) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def _infer_task(path: Path, config: dict[str, Any]) -> str:
    if (path / "modules.json").is_file():
        return "sentence-embedding"
    for arch in config.get("architectures") or []:
        for suffix, task in (
            ("ForSequenceClassification", "text-classification"),
            ("ForImageClassification", "image-classification"),
            ("ForTokenClassification", "token-classification"),
            ("ForMaskedLM", "fill-mask"),
            ("ForAudioClassification", "audio-classification"),
        ):
            if str(arch).endswith(suffix):
                return task
    return "feature-extraction"


def _pooling(path: Path) -> tuple[str, bool]:
    """(mode, normalize) from a sentence-transformers layout; mean without one."""
    mode, normalize = "mean", False
    try:
        modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").is_file() else []
    except ValueError as exc:
        raise InvalidSource(f"{path}/modules.json: not valid JSON: {exc}") from exc
    for entry in modules:
        kind = str(entry.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        if kind.endswith("Pooling"):
            cfg_path = path / str(entry.get("path", "")) / "config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                mode = "max"
    return mode, normalize


def _pixel_values(config: Any) -> TensorSpec:
    size = getattr(config, "image_size", 224)
    if isinstance(size, Mapping):
        height, width = int(size.get("height", 224)), int(size.get("width", 224))
    elif isinstance(size, list | tuple):
        height, width = int(size[0]), int(size[-1])
    else:
        height = width = int(size)
    channels = int(getattr(config, "num_channels", 3))
    return TensorSpec(name="pixel_values", dtype=TensorDType.FLOAT32, shape=[-1, channels, height, width])


# --- ONNX and TensorFlow ---------------------------------------------------------------------------


def onnx_inputs_outputs(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Signature of an ONNX graph (initializers are not inputs; unknown dims are -1)."""
    import onnx

    elem = {
        onnx.TensorProto.FLOAT: TensorDType.FLOAT32,
        onnx.TensorProto.FLOAT16: TensorDType.FLOAT16,
        onnx.TensorProto.INT64: TensorDType.INT64,
        onnx.TensorProto.INT32: TensorDType.INT32,
        onnx.TensorProto.INT8: TensorDType.INT8,
        onnx.TensorProto.UINT8: TensorDType.UINT8,
        onnx.TensorProto.BOOL: TensorDType.BOOL,
    }
    initializers = {i.name for i in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        ttype = value.type.tensor_type
        if ttype.elem_type not in elem:
            raise InvalidSource(f"tensor {value.name} has an unsupported element type ({ttype.elem_type})")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in ttype.shape.dim]
        return TensorSpec(name=value.name, dtype=elem[ttype.elem_type], shape=dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def _onnx(path: Path, options: SourceOptions, exporter: str) -> Source:
    import onnx

    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise InvalidSource(f"{path}: expected one .onnx file in the folder, found {len(candidates)}")
        path = candidates[0]
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError...
        raise InvalidSource(f"{path.name}: not a valid ONNX model: {str(exc)[:800]}") from exc
    inputs, outputs = onnx_inputs_outputs(model)
    if options.inputs:
        declared = {s.name for s in options.inputs}
        if declared != {s.name for s in inputs}:
            raise InvalidSource(
                f"{path.name}: source.inputs {sorted(declared)} do not match the graph inputs "
                f"{sorted(s.name for s in inputs)}"
            )
        inputs = [next(d for d in options.inputs if d.name == s.name) for s in inputs]
    return Source(
        format=options.format,
        inputs=inputs,
        onnx_path=path,
        output_names=[o.name for o in outputs],
        exporter=exporter,
    )


def _tensorflow(path: Path, options: SourceOptions, workdir: Path, opset: int) -> Source:
    missing = [m for m in ("tensorflow", "tf2onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise InvalidSpec(
            f"tensorflow-savedmodel sources need the tensorflow extra (pip install 'ptm[tensorflow]'); "
            f"this converter lacks {', '.join(missing)}"
        )
    if not (path / "saved_model.pb").is_file():
        raise InvalidSource(f"{path}: not a TensorFlow SavedModel (no saved_model.pb)")
    out = workdir / "tf2onnx.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf2onnx.convert",
            "--saved-model",
            str(path),
            "--output",
            str(out),
            "--opset",
            str(opset),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not out.is_file():
        raise InvalidSource(f"{path}: tf2onnx failed: {proc.stderr.strip()[-1500:]}")
    source = _onnx(out, options, exporter="tf2onnx")
    source.notes.append("reference: the tf2onnx fp32 graph")
    return source
