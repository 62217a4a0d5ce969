"""gRPC transport: the Open Inference Protocol's `inference.GRPCInferenceService` on grpc.aio.

The service definition is `proto/inference.proto` (wire names and field numbers as the protocol
specifies, so Triton's and KServe's gRPC clients work unchanged). Inputs arrive either as typed
`contents` or as `raw_input_contents` (what tritonclient sends); outputs always go back as
`raw_output_contents`, the form both client libraries read. Errors map once, here, from the
`errors` hierarchy to status codes with the same messages REST gives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from grpc import aio

from ptm_runtime.serve.dataplane import (
    DataPlane,
    InferRequest,
    InferResponse,
    InputTensor,
    RequestedOutput,
    array_from_bytes,
    check_shape,
    dtype_of,
)
from ptm_runtime.serve.errors import InvalidInput, ServeError
from ptm_runtime.serve.proto import inference_pb2 as pb
from ptm_runtime.serve.proto import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PROTOCOL = "grpc"

#: Which typed `InferTensorContents` field carries each datatype (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def decode_request(request: Any, max_elements: int) -> InferRequest:
    """ModelInferRequest -> InferRequest (arrays checked against their shapes)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "when used it must carry every input, in order"
        )
    inputs: list[InputTensor] = []
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{i}] has no name")
        datatype = tensor.datatype
        dtype = dtype_of(name, datatype)
        shape = check_shape(name, list(tensor.shape), max_elements)
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise InvalidInput(f"input {name!r} has both contents and raw_input_contents")
            data = array_from_bytes(name, datatype, shape, raw[i])
        elif has_contents:
            field = CONTENTS_FIELD.get(datatype)
            if field is None:
                raise InvalidInput(f"input {name!r}: {datatype} data must be sent as raw_input_contents")
            values = getattr(tensor.contents, field)
            expected = int(np.prod(shape, dtype=np.int64))
            if len(values) != expected:
                raise InvalidInput(
                    f"input {name!r}: {len(values)} elements in {field}, but shape {list(shape)} needs {expected}"
                )
            wide = np.asarray(values)
            if dtype.kind in "iu" and wide.size:
                info = np.iinfo(dtype)
                if wide.min() < info.min or wide.max() > info.max:
                    raise InvalidInput(f"input {name!r}: values outside the {datatype} range")
            data = wide.astype(dtype, copy=False).reshape(shape)
        else:
            raise InvalidInput(f"input {name!r} has no data (neither contents nor raw_input_contents)")
        inputs.append(InputTensor(name=name, datatype=datatype, shape=shape, data=data))
    outputs = [RequestedOutput(name=o.name) for o in request.outputs] or None
    return InferRequest(inputs=inputs, outputs=outputs, id=request.id or None)


class InferenceServicer:
    """GRPCInferenceService over the data plane (method names are the protocol's)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version or None))
        except ServeError as exc:
            await _abort(context, exc)

    async def ServerMetadata(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        meta = self.plane.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    async def ModelMetadata(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            meta = self.plane.model_metadata(request.name, request.version or None)
        except ServeError as exc:
            await _abort(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in meta.outputs],
        )

    async def ModelInfer(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        plane = self.plane
        ticket = plane.begin()
        code = 500
        answered: InferResponse | None = None
        try:
            plane.check_model(request.model_name, request.model_version or None)
            parsed = decode_request(request, plane.max_elements)
            remaining = context.time_remaining()
            result = answered = await plane.infer(
                request.model_name, request.model_version or None, parsed, remaining, ticket
            )
            response = pb.ModelInferResponse(
                model_name=result.model_name, model_version=result.model_version, id=result.id or ""
            )
            for out in result.outputs:
                response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
                response.raw_output_contents.append(
                    np.ascontiguousarray(out.data, dtype=out.data.dtype.newbyteorder("<")).tobytes()
                )
            code = 200
            return response
        except ServeError as exc:
            code = exc.status_code
            await _abort(context, exc)
        except Exception as exc:
            log.exception("unexpected failure in a gRPC inference")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            plane.end(PROTOCOL, code, ticket, answered)


async def _abort(context: aio.ServicerContext[Any, Any], exc: ServeError) -> Any:
    await context.abort(grpc.StatusCode[exc.grpc_code.value], exc.message)


def build_server(plane: DataPlane, max_message_bytes: int) -> aio.Server:
    """A grpc.aio server with the service registered (ports are added by the caller)."""
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    register: Callable[[object, aio.Server], None] = pb_grpc.add_GRPCInferenceServiceServicer_to_server
    register(InferenceServicer(plane), server)
    return server
