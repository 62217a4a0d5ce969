"""REST transport: Open Inference Protocol (KServe V2) JSON and the binary tensor data extension.

A request body is JSON, or — with the `Inference-Header-Content-Length: N` header — N bytes of
JSON followed by the raw tensors of the inputs whose `parameters.binary_data_size` says how many
bytes they take, in input order (Triton's binary extension; tritonclient sends it by default).
Outputs come back binary when the output's `parameters.binary_data` (or the request's
`parameters.binary_data_output`) is true, the same way round.

`parse_infer_request` and `encode_infer_response` are pure (bytes in, bytes out): the property
test drives them with arbitrary bodies. JSON is strict (orjson, several times faster than the
standard library on large tensors): NaN and Infinity literals are refused in requests, and
non-finite output values become null (request binary outputs to get them exactly). float32
outputs are written as their shortest round-tripping decimal, so clients get the exact values.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive

from ptm_runtime.serve.dataplane import (
    DataPlane,
    InferRequest,
    InferResponse,
    InputTensor,
    RequestedOutput,
    array_from_bytes,
    array_from_list,
    check_shape,
    dtype_of,
)
from ptm_runtime.serve.errors import (
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    ServeError,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
PROTOCOL = "rest"


def _loads(raw: bytes | memoryview, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        text = bytes(raw)
        for literal in (b"NaN", b"Infinity"):
            if literal in text:
                raise InvalidInput(
                    f"the {what} contains {literal.decode()}, which is not valid JSON; send such values as binary data"
                ) from None
        if "depth limit" in str(exc):
            raise InvalidInput(f"the {what} is nested too deeply") from None
        raise InvalidInput(f"the {what} is not valid JSON: {exc}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    return _object(holder.get("parameters", {}), f"{what} 'parameters'")


def _string(holder: dict[str, Any], key: str, what: str) -> str:
    value = holder.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} needs a non-empty string '{key}'")
    return value


def _flag(parameters: dict[str, Any], key: str, default: bool, what: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} parameter '{key}' must be true or false")
    return value


def parse_infer_request(
    body: bytes | bytearray, header_length: int | None, max_elements: int
) -> tuple[InferRequest, dict[str, bool] | bool]:
    """Decode a V2 REST infer body.

    Returns the request and how outputs are to be encoded: a flag per requested output name,
    or one flag for all outputs when the request names none.
    """
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[len(view) :]
    else:
        if header_length < 0 or header_length > len(view):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(view)} bytes"
            )
        header, binary = view[:header_length], view[header_length:]
    doc = _object(_loads(header, "request body"), "the request body")
    request_params = _parameters(doc, "the request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("the request needs a non-empty 'inputs' list")
    inputs: list[InputTensor] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        item = _object(raw, f"inputs[{i}]")
        name = _string(item, "name", f"inputs[{i}]")
        datatype = _string(item, "datatype", f"input {name!r}")
        dtype_of(name, datatype)
        if "shape" not in item:
            raise InvalidInput(f"input {name!r} needs a 'shape'")
        shape = check_shape(name, item["shape"], max_elements)
        params = _parameters(item, f"input {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size is {size} but only {len(binary) - offset} bytes of "
                    "binary data remain (truncated body or wrong Inference-Header-Content-Length)"
                )
            data = array_from_bytes(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            if "data" not in item:
                raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            data = array_from_list(name, datatype, shape, item["data"])
        inputs.append(InputTensor(name=name, datatype=datatype, shape=shape, data=data))
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data follow the JSON header but no input claims them"
        )
    all_binary = _flag(request_params, "binary_data_output", False, "request")
    outputs: list[RequestedOutput] | None = None
    flags: dict[str, bool] | bool = all_binary
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        per_output: dict[str, bool] = {}
        for i, raw in enumerate(raw_outputs):
            item = _object(raw, f"outputs[{i}]")
            name = _string(item, "name", f"outputs[{i}]")
            params = _parameters(item, f"output {name!r}")
            if "classification" in params:
                raise InvalidInput(f"output {name!r}: the classification extension is not supported")
            per_output[name] = _flag(params, "binary_data", all_binary, f"output {name!r}")
            outputs.append(RequestedOutput(name=name, parameters={}))
        if outputs:
            flags = per_output
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    return InferRequest(inputs=inputs, outputs=outputs, id=request_id, parameters=request_params), flags


def encode_infer_response(
    response: InferResponse, binary: dict[str, bool] | bool
) -> tuple[bytes, int | None]:
    """JSON (and binary) body of an infer response; returns (body, JSON header length or None)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        as_binary = binary if isinstance(binary, bool) else binary.get(out.name, False)
        if as_binary:
            blob = np.ascontiguousarray(out.data, dtype=out.data.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.ascontiguousarray(out.data).ravel()  # orjson writes numpy arrays
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        doc["id"] = response.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _json(status: int, doc: dict[str, Any]) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON_TYPE)


def _error(exc: ServeError) -> Response:
    response = _json(exc.status_code, {"error": exc.message})
    if exc.closes_connection:
        response.headers["Connection"] = "close"
    return response


async def read_body(request: Request, limit: int, seconds: float) -> bytearray:
    """The body, refused with 413 past `limit` bytes (declared or streamed), 415 if encoded, and
    408 when it has not all arrived within `seconds` (a stalled client must not hold its
    connection, nor its place among the requests a forming batch waits for, for ever).

    Chunks are appended to one bytearray (binary tensors are then decoded from it in place, with
    no join copy). Nothing is reserved ahead of the bytes that arrived: a Content-Length is the
    client's claim, and a client that declares 64 MB and sends nothing must not cost 64 MB.
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
        )
    declared = request.headers.get("content-length")
    length: int | None = None
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InvalidInput(f"Content-Length {declared!r} is not an integer") from None
        if length > limit:
            raise PayloadTooLarge(f"the body is {length} bytes, more than the limit of {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size = len(body) + len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body is more than the limit of {limit} bytes")
                if length is not None and size > length:  # the HTTP parser stops there; only a guard
                    raise InvalidInput(f"the body is longer than its Content-Length of {length}")
                body += chunk
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within the request timeout of {seconds * 1000:.0f} ms"
        ) from None
    if length is not None and len(body) != length:
        raise InvalidInput(f"the body has {len(body)} bytes but its Content-Length says {length}")
    return body


#: Not an HTTP status anyone receives: metrics count requests whose client left (nginx's 499).
CLIENT_CLOSED = 499


class ClientClosed(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, InferResponse]) -> InferResponse:
    """Run `work` (the body is already read) but cancel it when the client goes away.

    A client that timed out must not keep its request in the queue: under overload, abandoned
    requests would otherwise be computed for nobody while live ones wait behind them.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientClosed
    return task.result()


def build_app(plane: DataPlane, max_body_bytes: int) -> Starlette:
    """The V2 REST app over one data plane."""

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ServeError as exc:
                return _error(exc)

        return endpoint

    def version_of(request: Request) -> str | None:
        version: str | None = request.path_params.get("version")
        return version

    async def live(_: Request) -> Response:
        return _json(200, {"live": plane.live()})

    async def ready(_: Request) -> Response:
        is_ready = plane.ready()
        return _json(200 if is_ready else 503, {"ready": is_ready})

    async def server_metadata(_: Request) -> Response:
        return _json(200, plane.server_metadata())

    async def model_ready(request: Request) -> Response:
        name = request.path_params["model_name"]
        is_ready = plane.model_ready(name, version_of(request))
        return _json(200 if is_ready else 503, {"name": name, "ready": is_ready})

    async def model_metadata(request: Request) -> Response:
        meta = plane.model_metadata(request.path_params["model_name"], version_of(request))

        def tensors(infos: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in infos]

        return _json(
            200,
            {
                "name": meta.name,
                "versions": meta.versions,
                "platform": meta.platform,
                "inputs": tensors(meta.inputs),
                "outputs": tensors(meta.outputs),
                "parameters": meta.parameters,
            },
        )

    async def infer(request: Request) -> Response:
        ticket = plane.begin()
        code = 500
        answered: InferResponse | None = None
        try:
            name = request.path_params["model_name"]
            version = version_of(request)
            plane.check_model(name, version)
            raw_length = request.headers.get(HEADER_LENGTH)
            header_length: int | None = None
            if raw_length is not None:
                try:
                    header_length = int(raw_length)
                except ValueError:
                    raise InvalidInput(
                        f"Inference-Header-Content-Length {raw_length!r} is not an integer"
                    ) from None
            body = await read_body(request, max_body_bytes, plane.request_timeout_s)
            parsed, binary = parse_infer_request(body, header_length, plane.max_elements)
            result = answered = await unless_disconnected(
                request.receive, plane.infer(name, version, parsed, ticket=ticket)
            )
            content, json_length = encode_infer_response(result, binary)
            code = 200
            if json_length is None:
                return Response(content, media_type=JSON_TYPE)
            return Response(
                content, media_type=BINARY_TYPE, headers={"Inference-Header-Content-Length": str(json_length)}
            )
        except ServeError as exc:
            code = exc.status_code
            return _error(exc)
        except ClientClosed:
            code = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:
            log.exception("unexpected failure in a REST inference")
            return _json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        finally:
            plane.end(PROTOCOL, code, ticket, answered)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        path = request.url.path
        if status == 405:
            message = f"{request.method} is not allowed on {path}"
        elif path.startswith("/v2"):
            message = f"no such endpoint: {request.method} {path}"
        else:
            message = (
                f"no such endpoint: {request.method} {path}; this server speaks the Open Inference "
                "Protocol v2 under /v2 (e.g. POST /v2/models/NAME/infer)"
            )
        return _json(status, {"error": message})

    model = "/v2/models/{model_name}"
    versioned = model + "/versions/{version}"
    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route(model, guarded(model_metadata), methods=["GET"]),
        Route(versioned, guarded(model_metadata), methods=["GET"]),
        Route(model + "/ready", guarded(model_ready), methods=["GET"]),
        Route(versioned + "/ready", guarded(model_ready), methods=["GET"]),
        Route(model + "/infer", infer, methods=["POST"]),
        Route(versioned + "/infer", infer, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
