"""The model behind the server: one ONNX Runtime session, no HTTP.

`OnnxModel.load` resolves the artifact (an artifact directory with `report.json`, or a bare
`.onnx` file), verifies the sha256 the converter recorded before anything is loaded, picks the
execution provider (the configured order, limited to what this onnxruntime build offers, and the
one the session really got is reported), and warms the session up. `infer` runs one (batched)
call; the batcher and the data plane above it own queueing, validation and wire formats.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ptm_runtime.options import ExecutionProvider, GraphOptimizationLevel, RuntimeOptions
from ptm_runtime.report import MODEL_FILE, REPORT_FILE, Report, sha256_file
from ptm_runtime.serve.errors import ArtifactError, InvalidInput

log = logging.getLogger(__name__)

#: Open Inference Protocol datatype -> numpy dtype (BYTES and BF16 are not served).
V2_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}

#: ONNX Runtime's type strings -> Open Inference Protocol datatype.
ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}

_GRAPH_LEVELS = {
    GraphOptimizationLevel.DISABLED: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    GraphOptimizationLevel.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    GraphOptimizationLevel.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    GraphOptimizationLevel.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: Providers whose tensors live on the GPU: inputs and outputs go through I/O binding.
_DEVICE_PROVIDERS = {ExecutionProvider.CUDA.value, ExecutionProvider.TENSORRT.value}


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output as the protocol shows it (-1 marks a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return V2_DTYPES[self.datatype]


@dataclass(frozen=True)
class Artifact:
    """The file to load and what the converter said about it (None for a bare .onnx)."""

    model_path: Path
    report: Report | None
    sha256: str


def resolve_artifact(path: Path) -> Artifact:
    """Find model.onnx (and report.json) and verify the sha256 before anything is loaded.

    A directory must hold both files: an artifact without its report is refused rather than
    served unverified. A file is served as given; when it is a `model.onnx` with a report beside
    it, the report is checked all the same.
    """
    if path.is_dir():
        model_path = path / MODEL_FILE
        if not model_path.is_file():
            raise ArtifactError(f"artifact directory {path} has no {MODEL_FILE}")
        if not (path / REPORT_FILE).is_file():
            raise ArtifactError(
                f"artifact directory {path} has no {REPORT_FILE}; pass {model_path} itself to serve it unverified"
            )
    elif path.is_file():
        model_path = path
    else:
        raise ArtifactError(f"no such artifact: {path}")
    digest = sha256_file(model_path)
    report: Report | None = None
    if model_path.name == MODEL_FILE and (model_path.parent / REPORT_FILE).is_file():
        try:
            report = Report.read(model_path.parent)
        except ValueError as exc:
            raise ArtifactError(f"{model_path.parent / REPORT_FILE} is not a valid report: {exc}") from exc
        if report.sha256 != digest:
            raise ArtifactError(
                f"sha256 mismatch: {REPORT_FILE} records {report.sha256} but {model_path} is {digest}; "
                "refusing to serve an artifact that is not the one that was validated"
            )
    return Artifact(model_path=model_path, report=report, sha256=digest)


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    """The configured providers this onnxruntime build offers, in the configured order."""
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise ArtifactError(
            f"none of the configured execution providers {list(wanted)} is available in this "
            f"onnxruntime build (available: {list(available)})"
        )
    return chosen


def _provider_options(provider: str, cache_dir: Path | None) -> dict[str, str]:
    if provider == ExecutionProvider.TENSORRT.value and cache_dir is not None:
        # Building TensorRT engines takes minutes; cache them beside nothing else the pod writes.
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir)}
    return {}


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    """ORT reports dynamic dimensions as None or a symbol name; the protocol says -1."""
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _tensor_infos(args: Sequence[Any], kind: str) -> tuple[TensorInfo, ...]:
    infos = []
    for arg in args:
        datatype = ORT_TO_V2.get(arg.type)
        if datatype is None:
            raise ArtifactError(f"{kind} {arg.name!r} has type {arg.type}, which ptm serve does not support")
        infos.append(TensorInfo(name=arg.name, datatype=datatype, shape=_dims(arg.shape)))
    return tuple(infos)


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    sess_options = ort.SessionOptions()
    sess_options.intra_op_num_threads = options.intra_op_threads
    sess_options.inter_op_num_threads = options.inter_op_threads
    sess_options.graph_optimization_level = _GRAPH_LEVELS[options.graph_optimization_level]
    spin = "1" if options.thread_spinning else "0"
    sess_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    sess_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return sess_options


class OnnxModel:
    """An ONNX Runtime session with its signature, provider and load facts."""

    def __init__(
        self,
        session: ort.InferenceSession,
        artifact: Artifact,
        options: RuntimeOptions,
        load_seconds: float,
        io_binding: bool | None = None,
    ) -> None:
        self.session = session
        self.artifact = artifact
        self.options = options
        self.load_seconds = load_seconds
        self.provider: str = session.get_providers()[0]
        self.inputs = _tensor_infos(session.get_inputs(), "input")
        self.outputs = _tensor_infos(session.get_outputs(), "output")
        self.output_names = [o.name for o in self.outputs]
        #: Every input and output has a dynamic first axis: requests can be concatenated.
        self.dynamic_batch = all(t.shape and t.shape[0] == -1 for t in (*self.inputs, *self.outputs))
        self.io_binding = self.provider in _DEVICE_PROVIDERS if io_binding is None else io_binding
        self._device = "cuda" if self.provider in _DEVICE_PROVIDERS else "cpu"
        self._release_memory = ort.RunOptions()
        self._release_memory.add_run_config_entry(
            "memory.enable_memory_arena_shrinkage", "cpu:0;gpu:0" if self._device == "cuda" else "cpu:0"
        )

    @classmethod
    def load(
        cls,
        path: Path,
        options: RuntimeOptions,
        *,
        available_providers: Sequence[str] | None = None,
        trt_cache_dir: Path | None = None,
    ) -> OnnxModel:
        """Verify the sha256 and load the session; ArtifactError when the artifact cannot be served."""
        started = time.perf_counter()
        artifact = resolve_artifact(path)
        available = ort.get_available_providers() if available_providers is None else available_providers
        providers = choose_providers([p.value for p in options.execution_providers], available)
        if _DEVICE_PROVIDERS.intersection(providers) and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* wheels only once preloaded.
            try:
                ort.preload_dlls()
            except Exception as exc:
                log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        sess_options = _session_options(options)
        session: ort.InferenceSession | None = None
        errors: list[str] = []
        # The first provider that loads is used: a GPU provider whose libraries are missing on
        # this node must not keep the model from serving on the next one in the list.
        for i in range(len(providers)):
            candidates = providers[i:]
            try:
                session = ort.InferenceSession(
                    str(artifact.model_path),
                    sess_options,
                    providers=[(p, _provider_options(p, trt_cache_dir)) for p in candidates],
                )
                break
            except Exception as exc:  # onnxruntime raises its own exception types
                if "INVALID_PROTOBUF" in str(exc) or "InvalidProtobuf" in type(exc).__name__:
                    raise ArtifactError(f"{artifact.model_path} is not a valid ONNX model: {exc}") from exc
                errors.append(f"{candidates[0]}: {exc}")
                log.warning("execution provider %s failed to load the model: %s", candidates[0], exc)
        if session is None:
            raise ArtifactError(
                f"no execution provider could load {artifact.model_path}: " + "; ".join(errors)
            )
        model = cls(session, artifact, options, load_seconds=time.perf_counter() - started)
        log.info(
            "loaded %s (sha256 %s) on %s in %.2fs",
            artifact.model_path,
            artifact.sha256,
            model.provider,
            model.load_seconds,
        )
        return model

    def single_threaded(self) -> OnnxModel | None:
        """A second session of the same model with one intra-op thread, for batches that run
        beside others on CPU (None on a GPU provider, or when this one has one thread already).

        One run with every core is fastest for a lone request; under load, runs of one thread
        each side by side waste less on synchronisation (measured on 2 cores, MiniLM int8 at
        batch 2: two one-thread runs 250 rows/s, two runs sharing two threads 240, one run 196).
        Costs a second copy of the weights in memory.
        """
        if self.provider in _DEVICE_PROVIDERS or self.options.intra_op_threads == 1:
            return None
        started = time.perf_counter()
        options = self.options.model_copy(update={"intra_op_threads": 1})
        session = ort.InferenceSession(
            str(self.artifact.model_path), _session_options(options), providers=[self.provider]
        )
        return OnnxModel(session, self.artifact, options, load_seconds=time.perf_counter() - started)

    def infer(self, feeds: Mapping[str, np.ndarray], release_memory: bool = False) -> dict[str, np.ndarray]:
        """Run the session on complete feeds; returns every output by name.

        `release_memory`: give the memory arena's unused chunks back after the run (after warm-up
        and tuning runs of the largest batches; measured: MiniLM fp32 at 32 rows left the process
        at 303 MB without it, 212 MB with it, the next batches of 2 rows not growing it again).
        """
        run_options = self._release_memory if release_memory else None
        try:
            if self.io_binding:
                return self._infer_bound(feeds, run_options)
            values = self.session.run(self.output_names, dict(feeds), run_options)
        except Exception as exc:
            # ONNX Runtime's InvalidArgument is a shape the model cannot take (e.g. a sequence
            # longer than its position table): the client's fault, not the server's.
            if type(exc).__name__ == "InvalidArgument":
                raise InvalidInput(f"the model rejected the input: {exc}") from exc
            raise
        return dict(zip(self.output_names, values, strict=True))

    def _infer_bound(
        self, feeds: Mapping[str, np.ndarray], run_options: ort.RunOptions | None
    ) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding, run_options)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))

    def sample_feeds(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero inputs with dynamic dimensions set to 1 (the batch axis to `batch`)."""
        feeds = {}
        for t in self.inputs:
            shape = [d if d >= 0 else 1 for d in t.shape]
            if self.dynamic_batch:
                shape[0] = batch
            feeds[t.name] = np.zeros(shape, dtype=t.dtype)
        return feeds

    def measure_throughput(
        self,
        cells: Sequence[tuple[int, int]],
        seconds_per_cell: float = 0.25,
        budget_seconds: float = 20.0,
        beside: OnnxModel | None = None,
        passes: int = 2,
    ) -> dict[tuple[int, int], float]:
        """Rows per second for each (concurrent runs, batch size) cell, on zero inputs.

        A cell of one run uses this session; more runs use `beside` (see single_threaded) when
        given. Each cell runs `runs` threads calling the session with batches of `size` rows for
        about `seconds_per_cell` (every thread finishing at least two runs, after two untimed
        runs the first time). The cells are measured `passes` times, every other pass in reverse
        order, and each keeps its best pass: a large batch's cell holds only two or three runs,
        and one slow run sank it (resnet18 at 32 rows: 70 rows/s in one server's tuning, 118 in
        another's). Once `budget_seconds` are spent the remaining cells are skipped (a large
        model's largest batches, or its second pass). A cell whose run fails ends the
        measurement (what was measured is returned).
        """
        rates: dict[tuple[int, int], float] = {}
        started = time.perf_counter()
        forward = list(cells)
        schedule = [(p, cell) for p in range(passes) for cell in (forward if p % 2 == 0 else forward[::-1])]
        for p, (runs, size) in schedule:
            if rates and time.perf_counter() - started > budget_seconds:
                break
            feeds = self.sample_feeds(size)
            infer = beside.infer if beside is not None and runs > 1 else self.infer
            try:
                if p == 0:
                    infer(feeds)  # twice untimed: a new, larger batch's first two runs grow the
                    infer(feeds)  # arena (resnet18 at 32 rows 126, 131, then 147 rows/s)
                rate = size * _runs_per_second(functools.partial(infer, feeds), runs, seconds_per_cell)
            except Exception as exc:
                log.warning("%d runs of batch %d could not be measured (stopping): %s", runs, size, exc)
                break
            rates[(runs, size)] = max(rate, rates.get((runs, size), 0.0))
        for model in {self, beside or self}:  # what the largest batches left in the arenas
            model.release_memory()
        return rates

    def release_memory(self) -> None:
        """One small run that gives the memory arena's unused chunks back (see infer)."""
        try:
            self.infer(self.sample_feeds(1), release_memory=True)
        except Exception as exc:  # zero inputs may not suit every model; only memory is at stake
            log.warning("could not release the memory arena: %s", exc)

    def warmup(self, requests: int, max_batch_size: int) -> float:
        """Run `requests` inferences (alternating batch 1 and the largest batch); returns seconds.

        A failing warm-up is logged, not fatal: zero inputs of length 1 may not suit every
        model, and real requests still get validated and answered one by one.
        """
        started = time.perf_counter()
        sizes = [1, max_batch_size] if self.dynamic_batch and max_batch_size > 1 else [1]
        for i in range(requests):
            try:
                self.infer(self.sample_feeds(sizes[i % len(sizes)]), release_memory=i == requests - 1)
            except Exception as exc:
                log.warning("warm-up inference %d failed (continuing): %s", i, exc)
                break
        return time.perf_counter() - started


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's malloc_trim); False where there
    is no glibc. ONNX Runtime's arena and the interpreter free into glibc's heaps, which keep
    the pages: measured on resnet18, warm-up and tuning left the process at 339 MB, 139 MB
    after the trim. The server calls it once the model is warm, and after each burst of
    requests once none has been in flight for a second (resnet18 after 6 s of REST JSON at
    c=32: 343 MB kept without it, 256 MB with it)."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, opened once (the server trims after every burst); None where there is none."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - musl has no malloc_trim
    except (OSError, AttributeError):
        return None
    return libc


def _runs_per_second(call: Callable[[], object], threads: int, seconds: float) -> float:
    """Completed calls per second with `threads` threads calling at once for about `seconds`
    (each thread at least twice); the first exception of any thread is raised."""
    counts = [0] * threads
    errors: list[BaseException] = []
    until = time.perf_counter() + seconds

    def loop(i: int) -> None:
        try:
            while counts[i] < 2 or time.perf_counter() < until:
                call()
                counts[i] += 1
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    begun = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return sum(counts) / max(time.perf_counter() - begun, 1e-9)
