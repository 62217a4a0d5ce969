"""The transport-neutral data plane of the Open Inference Protocol (KServe V2).

REST and gRPC decode their wire formats into `InferRequest` (numpy arrays, already shaped) with
the helpers here, and call the same `DataPlane` methods. Every request is checked against the
model's signature before it is queued: input names, datatype strings, ranks, fixed dimensions,
batch agreement and size, requested outputs. Failures raise the `errors` hierarchy, mapped once
per transport. Array decoding checks the element count against the shape before it allocates, so
a huge declared shape costs nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptm_runtime.serve.batching import Batcher
from ptm_runtime.serve.errors import InvalidInput, ModelNotFound, Unavailable
from ptm_runtime.serve.metrics import ServeMetrics
from ptm_runtime.serve.model import V2_DTYPES, OnnxModel, TensorInfo

SERVER_NAME = "ptm"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "onnxruntime_onnx"
MAX_RANK = 16


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    #: None: every output of the model.
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: How long the request queued and how long its batch computed (for the overhead metric).
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass
class Ticket:
    """One inference request's passage through the server, from `begin` to `end`."""

    started: float
    #: Handed to the batcher: no longer one the server is reading or decoding.
    queued: bool = False


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    #: Facts beyond the protocol (REST shows them under "parameters").
    parameters: dict[str, Any]


# --- decoding helpers shared by the transports ---------------------------------------------------


def dtype_of(name: str, datatype: str) -> np.dtype[Any]:
    dtype = V2_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype!r} is not supported (one of {', '.join(V2_DTYPES)})"
        )
    return dtype


def check_shape(name: str, shape: Sequence[Any], max_elements: int) -> tuple[int, ...]:
    """Shape as ints; rejects non-integers, negatives, too many dimensions and too many elements."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: shape must be a list of at most {MAX_RANK} integers")
    dims: list[int] = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} must hold non-negative integers")
        dims.append(d)
    count = math.prod(dims)
    if count > max_elements:
        raise InvalidInput(
            f"input {name!r}: shape {dims} holds {count} elements, more than the {max_elements} the "
            "request size limit allows"
        )
    return tuple(dims)


def array_from_bytes(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview) -> np.ndarray:
    """Row-major little-endian bytes -> array; the byte count must match the shape exactly."""
    dtype = dtype_of(name, datatype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(raw)} bytes of data, but shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


_KINDS = {"b": "BOOL", "i": "integer", "u": "integer", "f": "number"}


def array_from_list(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """JSON data (flat or nested row-major list) -> array of the datatype, checked strictly.

    No silent conversions: floats for an integer input, numbers for BOOL, booleans for numbers,
    out-of-range integers and ragged lists are refused, naming the input.
    """
    dtype = dtype_of(name, datatype)
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: 'data' must be a list")
    expected = math.prod(shape)
    try:
        loose = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"input {name!r}: 'data' is not a regular (non-ragged) list: {exc}") from None
    if loose.size != expected:
        raise InvalidInput(
            f"input {name!r}: {loose.size} data elements, but shape {list(shape)} needs {expected}"
        )
    kind = loose.dtype.kind if loose.size else dtype.kind
    if dtype.kind == "b":
        ok = kind == "b"
    elif dtype.kind in "iu":
        ok = kind in "iu"
    else:
        ok = kind in "iuf"
    if not ok:
        got = _KINDS.get(kind, "values that are not numbers (or integers beyond 64 bits)")
        raise InvalidInput(f"input {name!r}: {datatype} data must not contain {got}")
    if dtype.kind in "iu" and loose.size:
        info = np.iinfo(dtype)
        if loose.min() < info.min or loose.max() > info.max:
            raise InvalidInput(
                f"input {name!r}: values outside the {datatype} range [{info.min}, {info.max}]"
            )
    return loose.astype(dtype, copy=False).reshape(shape)


# --- the data plane -------------------------------------------------------------------------------


class DataPlane:
    """Health, metadata and inference for the one model this server serves."""

    def __init__(
        self,
        model_name: str,
        model_version: str,
        *,
        max_elements: int,
        request_timeout_s: float,
        metrics: ServeMetrics | None = None,
        on_idle: Callable[[], object] | None = None,
        idle_after_s: float = 1.0,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.max_elements = max_elements
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics
        self.model: OnnxModel | None = None
        self.batcher: Batcher | None = None
        self.draining = False
        self.in_flight = 0
        #: Requests begun but not yet queued (body being read, decoded, validated): a forming
        #: batch waits for them, and only for them.
        self.arriving = 0
        #: Run (in a worker thread) once no request has been in flight for `idle_after_s`
        #: seconds after some were: the server gives back the heap a burst of requests grew.
        self._on_idle = on_idle
        self._idle_after_s = idle_after_s
        self._idle_timer: asyncio.TimerHandle | None = None
        self._inputs: dict[str, TensorInfo] = {}
        self._outputs: dict[str, TensorInfo] = {}

    def attach(self, model: OnnxModel, batcher: Batcher) -> None:
        """The model is loaded and warm: from now on the server is ready."""
        self.model = model
        self.batcher = batcher
        self._inputs = {t.name: t for t in model.inputs}
        self._outputs = {t.name: t for t in model.outputs}
        if self.metrics is not None:
            self.metrics.set_ready(self.ready())

    def start_draining(self) -> None:
        self.draining = True
        if self.metrics is not None:
            self.metrics.set_ready(False)

    # health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.model is not None and not self.draining

    def check_model(self, name: str, version: str | None) -> None:
        if name != self.model_name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version and version != self.model_version:
            raise ModelNotFound(f"model {name!r} has no version {version!r} (versions: {self.model_version})")

    def model_ready(self, name: str, version: str | None) -> bool:
        self.check_model(name, version)
        return self.ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        model = self._model(name, version)
        batcher = self.batcher
        parameters: dict[str, Any] = {
            "execution_provider": model.provider,
            "sha256": model.artifact.sha256,
            "dynamic_batching": batcher.batching if batcher is not None else False,
            "max_batch_size": batcher.max_batch_size if batcher is not None else 1,
            "preferred_batch_size": batcher.preferred_batch_size if batcher is not None else 1,
            "concurrent_runs": batcher.concurrent_runs if batcher is not None else 1,
        }
        return ModelMetadata(
            name=self.model_name,
            versions=[self.model_version],
            platform=PLATFORM,
            inputs=model.inputs,
            outputs=model.outputs,
            parameters=parameters,
        )

    def _model(self, name: str, version: str | None) -> OnnxModel:
        self.check_model(name, version)
        if self.model is None:
            raise Unavailable(f"model {name!r} is still loading")
        return self.model

    def input_info(self, name: str) -> TensorInfo | None:
        return self._inputs.get(name)

    # inference

    async def infer(
        self,
        name: str,
        version: str | None,
        request: InferRequest,
        deadline_s: float | None = None,
        ticket: Ticket | None = None,
    ) -> InferResponse:
        """Validate, queue, and answer one request (outputs in the requested order); `ticket`
        is the one `begin` gave the transport for this request."""
        model = self._model(name, version)
        if self.draining or self.batcher is None:
            raise Unavailable("the server is shutting down and takes no new requests")
        batcher = self.batcher
        rows, key = self._validate(model, request)
        wanted = self._requested(request)
        timeout = self.request_timeout_s if deadline_s is None else min(self.request_timeout_s, deadline_s)
        if timeout <= 0:
            raise InvalidInput("the request's deadline has already passed")
        feeds = {t.name: t.data for t in request.inputs}
        if ticket is not None:
            self._queued(ticket)
        result = await batcher.submit(feeds, rows, key, timeout)
        outputs = []
        for out in wanted:
            array = result.outputs[out.name]
            outputs.append(
                OutputTensor(
                    name=out.name,
                    datatype=self._outputs[out.name].datatype,
                    shape=tuple(int(d) for d in array.shape),
                    data=array,
                    parameters=out.parameters,
                )
            )
        return InferResponse(
            model_name=self.model_name,
            model_version=self.model_version,
            outputs=outputs,
            id=request.id,
            queue_seconds=result.queue_seconds,
            compute_seconds=result.compute_seconds,
        )

    def _validate(self, model: OnnxModel, request: InferRequest) -> tuple[int, tuple[Any, ...]]:
        """Check inputs against the signature; returns (rows, batch key)."""
        if not request.inputs:
            raise InvalidInput("the request has no inputs")
        seen: set[str] = set()
        for tensor in request.inputs:
            info = self._inputs.get(tensor.name)
            if info is None:
                raise InvalidInput(
                    f"unknown input {tensor.name!r}; model {self.model_name!r} has inputs "
                    + ", ".join(repr(n) for n in self._inputs)
                )
            if tensor.name in seen:
                raise InvalidInput(f"input {tensor.name!r} is given more than once")
            seen.add(tensor.name)
            if tensor.datatype != info.datatype:
                raise InvalidInput(
                    f"input {tensor.name!r} has datatype {tensor.datatype} but the model expects {info.datatype}"
                )
            if len(tensor.shape) != len(info.shape) or any(
                want >= 0 and got != want for got, want in zip(tensor.shape, info.shape, strict=True)
            ):
                raise InvalidInput(
                    f"input {tensor.name!r} has shape {list(tensor.shape)} but the model expects "
                    f"{list(info.shape)} (-1: any size)"
                )
            if 0 in tensor.shape:
                raise InvalidInput(
                    f"input {tensor.name!r} has shape {list(tensor.shape)}: empty tensors are refused"
                )
        missing = [n for n in self._inputs if n not in seen]
        if missing:
            raise InvalidInput("missing input(s) " + ", ".join(repr(n) for n in missing))
        if not model.dynamic_batch:
            return 1, ()
        batch_sizes = {t.shape[0] for t in request.inputs}
        if len(batch_sizes) > 1:
            raise InvalidInput(f"inputs disagree on the batch size (axis 0): {sorted(batch_sizes)}")
        rows = batch_sizes.pop()
        assert self.batcher is not None
        if rows > self.batcher.max_batch_size:
            raise InvalidInput(
                f"batch of {rows} rows exceeds the server's maxBatchSize of {self.batcher.max_batch_size}"
            )
        key = tuple(sorted((t.name, t.shape[1:]) for t in request.inputs))
        return rows, key

    def _requested(self, request: InferRequest) -> list[RequestedOutput]:
        if not request.outputs:
            return [RequestedOutput(name) for name in self._outputs]
        seen: set[str] = set()
        for out in request.outputs:
            if out.name not in self._outputs:
                raise InvalidInput(
                    f"unknown output {out.name!r}; model {self.model_name!r} has outputs "
                    + ", ".join(repr(n) for n in self._outputs)
                )
            if out.name in seen:
                raise InvalidInput(f"output {out.name!r} is requested more than once")
            seen.add(out.name)
        return request.outputs

    # bookkeeping shared by the transports

    def begin(self) -> Ticket:
        """A request has come in (its body may still be on the wire)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.in_flight += 1
        self.arriving += 1
        if self.metrics is not None:
            self.metrics.add_in_flight(1)
        return Ticket(time.perf_counter())

    def _queued(self, ticket: Ticket) -> bool:
        """The request is no longer arriving; False when it was not any more."""
        if ticket.queued:
            return False
        ticket.queued = True
        self.arriving -= 1
        return True

    def end(self, protocol: str, code: int, ticket: Ticket, response: InferResponse | None = None) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._on_idle is not None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._idle_after_s, self._idle, loop)
        # One that failed before the queue: a forming batch must not wait for it.
        if self._queued(ticket) and self.batcher is not None:
            self.batcher.wake()
        if self.metrics is not None:
            seconds = time.perf_counter() - ticket.started
            self.metrics.add_in_flight(-1)
            self.metrics.observe_request(protocol, code, seconds)
            if response is not None:
                self.metrics.observe_overhead(
                    protocol, seconds - response.queue_seconds - response.compute_seconds
                )

    def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        self._idle_timer = None
        if self._on_idle is not None and not self.draining:  # the executor may be shutting down
            loop.run_in_executor(None, self._on_idle)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (polling, bounded) until no request is in flight; True if that happened."""
        deadline = time.monotonic() + timeout
        while self.in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True
