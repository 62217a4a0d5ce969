"""`ptm serve` over real sockets: REST JSON and binary, gRPC, third-party V2 clients, bad requests,
metrics, batching, back-pressure, artifact verification and the SIGTERM drain.

Results are compared with a plain in-process ONNX Runtime session on the same file: fp32 must be
equal exactly (JSON carries float32 values losslessly as their float64 repr).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_pb_grpc
from tritonclient.utils import InferenceServerException

from ptm_runtime.options import Precision
from ptm_runtime.report import MODEL_FILE, Report, sha256_file
from tests.conftest import wait_for
from tests.runtime import models
from tests.runtime.conftest import ServeFactory, ServeProcess

MAX_BODY = 64 * 1024
DEADLINE_S = 60.0


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _feeds(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, 4)).astype(np.float32), "k": rng.integers(-1000, 1000, (rows, 2))}


def _json_body(feeds: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
    dtypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    return {
        "inputs": [
            {"name": n, "datatype": dtypes[a.dtype], "shape": list(a.shape), "data": a.ravel().tolist()}
            for n, a in feeds.items()
        ],
        **extra,
    }


def _from_json(output: dict[str, Any]) -> np.ndarray:
    dtype = {"FP32": np.float32, "INT64": np.int64}[output["datatype"]]
    return np.array(output["data"], dtype=dtype).reshape(output["shape"])


def _wait_for(check: Callable[[], bool], what: str) -> None:
    wait_for(check, DEADLINE_S, what, interval=0.02)


@pytest.fixture(scope="module")
def server(serve_factory: ServeFactory, linear_model: Path) -> ServeProcess:
    return serve_factory(
        linear_model,
        "--model-name",
        "linear",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-batch-size",
        "32",
        "--max-queue-delay-ms",
        "40",
    )


def test_health_and_metadata(server: ServeProcess, linear_model: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get("/v2").json()["extensions"] == ["binary_tensor_data"]
        meta = http.get("/v2/models/linear").json()
        assert meta["inputs"] == [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "k", "datatype": "INT64", "shape": [-1, 2]},
        ]
        assert meta["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [-1, 3]}
        assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
        assert meta["parameters"]["sha256"] == sha256_file(linear_model)
        # Measured at load (within maxBatchSize 32) and exported as a gauge.
        preferred = meta["parameters"]["preferred_batch_size"]
        assert 1 <= preferred <= meta["parameters"]["max_batch_size"] == 32
        assert server.metric("ptm_preferred_batch_size", model="linear") == preferred
        assert http.get("/v2/models/linear/versions/1").json() == meta
        assert http.get("/v2/models/linear/ready").json() == {"name": "linear", "ready": True}
        response = http.get("/v2/models/other/ready")
        assert response.status_code == 404
        assert response.json()["error"] == "unknown model 'other'; this server serves 'linear'"


def test_rest_json_equals_in_process_onnxruntime(server: ServeProcess, linear_model: Path) -> None:
    feeds = _feeds(5, 7)
    want = _ort(linear_model, feeds)
    response = httpx.post(
        f"{server.url}/v2/models/linear/infer", json=_json_body(feeds, id="req-7"), timeout=10
    )
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == "req-7" and doc["model_name"] == "linear"
    got = {o["name"]: _from_json(o) for o in doc["outputs"]}
    np.testing.assert_array_equal(got["y"], want["y"])
    np.testing.assert_array_equal(got["s"], want["s"])


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_rest_binary_extension_with_raw_http(server: ServeProcess, linear_model: Path, chunked: bool) -> None:
    feeds = _feeds(3, 8)
    want = _ort(linear_model, feeds)
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [3, 4], "parameters": {"binary_data_size": 48}},
                {"name": "k", "datatype": "INT64", "shape": [3, 2], "parameters": {"binary_data_size": 48}},
            ],
            "outputs": [{"name": "s"}, {"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    parts = [header, feeds["x"].tobytes(), feeds["k"].tobytes()]
    response = httpx.post(
        f"{server.url}/v2/models/linear/infer",
        # A generator is sent with Transfer-Encoding: chunked (no Content-Length), in three chunks.
        content=iter(parts) if chunked else b"".join(parts),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    doc = json.loads(response.content[:length])
    assert [o["name"] for o in doc["outputs"]] == ["s", "y"]  # requested order
    np.testing.assert_array_equal(_from_json(doc["outputs"][0]), want["s"])
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 36}
    np.testing.assert_array_equal(
        np.frombuffer(response.content[length:], np.float32).reshape(3, 3), want["y"]
    )


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http(server: ServeProcess, linear_model: Path, binary: bool) -> None:
    feeds = _feeds(4, 9)
    want = _ort(linear_model, feeds)
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("linear")
    inputs = []
    for name, datatype in (("x", "FP32"), ("k", "INT64")):
        tensor = triton_http.InferInput(name, list(feeds[name].shape), datatype)
        tensor.set_data_from_numpy(feeds[name], binary_data=binary)
        inputs.append(tensor)
    result = client.infer(
        "linear", inputs, outputs=[triton_http.InferRequestedOutput("y", binary_data=binary)]
    )
    np.testing.assert_array_equal(result.as_numpy("y"), want["y"])
    assert result.as_numpy("s") is None  # only what was asked for
    result = client.infer("linear", inputs)
    np.testing.assert_array_equal(result.as_numpy("s"), want["s"])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
        client.infer("nope", inputs)
    assert err.value.status() == "404"
    client.close()


def test_tritonclient_grpc(server: ServeProcess, linear_model: Path) -> None:
    feeds = _feeds(6, 10)
    want = _ort(linear_model, feeds)
    client = triton_grpc.InferenceServerClient(server.grpc_target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("linear")
    assert client.get_server_metadata().extensions == ["binary_tensor_data"]
    meta = client.get_model_metadata("linear")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("x", "FP32", [-1, 4]),
        ("k", "INT64", [-1, 2]),
    ]
    inputs = []
    for name, datatype in (("x", "FP32"), ("k", "INT64")):
        tensor = triton_grpc.InferInput(name, list(feeds[name].shape), datatype)
        tensor.set_data_from_numpy(feeds[name])
        inputs.append(tensor)
    result = client.infer("linear", inputs, request_id="g1")
    assert result.get_response().id == "g1"
    np.testing.assert_array_equal(result.as_numpy("y"), want["y"])
    np.testing.assert_array_equal(result.as_numpy("s"), want["s"])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
        client.infer("nope", inputs)
    assert err.value.status() == "StatusCode.NOT_FOUND"
    wrong = triton_grpc.InferInput("x", [6, 5], "FP32")
    wrong.set_data_from_numpy(np.zeros((6, 5), np.float32))
    with pytest.raises(
        InferenceServerException, match=r"input 'x' has shape \[6, 5\] but the model expects \[-1, 4\]"
    ):
        client.infer("linear", [wrong, inputs[1]])
    client.close()


def test_grpc_typed_contents_and_malformed_messages(server: ServeProcess, linear_model: Path) -> None:
    """Hand-built messages (tritonclient's protobuf module: the same wire format) over a raw channel."""
    feeds = _feeds(2, 11)
    want = _ort(linear_model, feeds)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = triton_pb_grpc.GRPCInferenceServiceStub(channel)

        def request(**kw: Any) -> Any:
            msg = triton_pb.ModelInferRequest(model_name="linear", **kw)
            return msg

        x = triton_pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 4])
        x.contents.fp32_contents.extend(feeds["x"].ravel().tolist())
        k = triton_pb.ModelInferRequest.InferInputTensor(name="k", datatype="INT64", shape=[2, 2])
        k.contents.int64_contents.extend(feeds["k"].ravel().tolist())
        reply = stub.ModelInfer(request(inputs=[x, k]), timeout=10)
        assert [o.name for o in reply.outputs] == ["y", "s"]
        got = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 3)
        np.testing.assert_array_equal(got, want["y"])

        bare_x = triton_pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 4])
        bare_k = triton_pb.ModelInferRequest.InferInputTensor(name="k", datatype="INT64", shape=[2, 2])
        cases = [
            (
                request(inputs=[bare_x, bare_k], raw_input_contents=[feeds["x"].tobytes()]),
                "raw_input_contents has 1",
            ),
            (
                request(inputs=[bare_x, bare_k], raw_input_contents=[b"\0" * 31, feeds["k"].tobytes()]),
                "31 bytes of data, but shape",
            ),
            (request(inputs=[bare_x, bare_k]), "input 'x' has no data"),
            (request(inputs=[bare_x], raw_input_contents=[feeds["x"].tobytes()]), "missing input"),
        ]
        for message, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(message, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert text in (err.value.details() or "")
        # Past the message limit (the server's --max-body-bytes): refused, not buffered.
        big = triton_pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[MAX_BODY // 16 + 1, 4]
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(inputs=[big], raw_input_contents=[b"\0" * (MAX_BODY + 16)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.ServerReady(triton_pb.ServerReadyRequest(), timeout=10).ready


def test_rest_bad_requests_get_precise_4xx_and_never_wedge(server: ServeProcess) -> None:
    url = f"{server.url}/v2/models/linear/infer"
    ok = _json_body(_feeds(1, 1))
    x_only = {"inputs": ok["inputs"][:1]}
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", f"{server.url}/v2/models/nope/infer", {"json": ok}, 404, "unknown model 'nope'"),
        ("POST", f"{server.url}/v2/models/linear/versions/2/infer", {"json": ok}, 404, "has no version '2'"),
        ("POST", url, {"content": b"{not json"}, 400, "not valid JSON"),
        ("POST", url, {"content": b"[1, 2]"}, 400, "must be a JSON object"),
        ("POST", url, {"json": x_only}, 400, "missing input(s) 'k'"),
        (
            "POST",
            url,
            {"json": {"inputs": [{**ok["inputs"][0], "name": "z"}, ok["inputs"][1]]}},
            400,
            "unknown input 'z'",
        ),
        (
            "POST",
            url,
            {"json": {"inputs": [{**ok["inputs"][0], "datatype": "FP64"}, ok["inputs"][1]]}},
            400,
            "input 'x' has datatype FP64 but the model expects FP32",
        ),
        (
            "POST",
            url,
            {"json": {"inputs": [{**ok["inputs"][0], "shape": [2, 2]}, ok["inputs"][1]]}},
            400,
            "input 'x' has shape [2, 2] but the model expects [-1, 4]",
        ),
        (
            "POST",
            url,
            {"json": {"inputs": [{**ok["inputs"][0], "shape": [1, 5]}, ok["inputs"][1]]}},
            400,
            "4 data elements, but shape [1, 5] needs 5",
        ),
        (
            "POST",
            url,
            {"json": {"inputs": ok["inputs"], "outputs": [{"name": "q"}]}},
            400,
            "unknown output 'q'",
        ),
        ("POST", url, {"json": _json_body(_feeds(33, 1))}, 400, "exceeds the server's maxBatchSize of 32"),
        (
            "POST",
            url,
            {"json": {"inputs": [{**ok["inputs"][0], "shape": [10**9, 4], "data": []}]}},
            400,
            "more than the",
        ),
        (
            "POST",
            url,
            {"content": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "abc"}},
            400,
            "is not an integer",
        ),
        (
            "POST",
            url,
            {"content": b"{}" + b"\0" * 8, "headers": {"Inference-Header-Content-Length": "2"}},
            400,
            "non-empty 'inputs'",
        ),
        ("POST", url, {"content": b"x" * (MAX_BODY + 1)}, 413, f"limit of {MAX_BODY}"),
        (
            "POST",
            url,
            {"content": b"{}", "headers": {"Content-Encoding": "gzip"}},
            415,
            "'gzip' is not supported",
        ),
        ("GET", url, {}, 405, "GET is not allowed"),
        ("POST", f"{server.url}/v1/models/linear:predict", {"json": ok}, 404, "Open Inference Protocol v2"),
    ]
    before_400 = server.metric("ptm_requests_total", protocol="rest", code="400")
    with httpx.Client(timeout=10) as http:
        for method, target, kwargs, status, message in cases:
            response = http.request(method, target, **kwargs)
            assert response.status_code == status, (target, kwargs, response.text)
            assert message in response.json()["error"], response.text
        # Truncated binary payload: the header promises more bytes than follow.
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, 4],
                        "parameters": {"binary_data_size": 16},
                    },
                    ok["inputs"][1],
                ]
            }
        ).encode()
        response = http.post(
            url, content=header + b"\0" * 10, headers={"Inference-Header-Content-Length": str(len(header))}
        )
        assert (
            response.status_code == 400 and "only 10 bytes of binary data remain" in response.json()["error"]
        )
        # Still healthy and still right.
        assert http.get(f"{server.url}/v2/health/ready").status_code == 200
        assert http.post(url, json=ok).status_code == 200
    after_400 = server.metric("ptm_requests_total", protocol="rest", code="400")
    assert after_400 - before_400 == sum(1 for c in cases if c[3] == 400 and "/infer" in c[1]) + 1


def test_metrics_endpoint(server: ServeProcess) -> None:
    httpx.post(
        f"{server.url}/v2/models/linear/infer", json=_json_body(_feeds(2, 3)), timeout=10
    ).raise_for_status()
    text = httpx.get(server.metrics_url, timeout=10).text
    for line in (
        'ptm_execution_provider_info{model="linear",provider="CPUExecutionProvider"} 1.0',
        'ptm_ready{model="linear"} 1.0',
        'ptm_requests_in_flight{model="linear"} 0.0',
        'ptm_queue_depth{model="linear"} 0.0',
    ):
        assert line in text
    for family in (
        "ptm_request_duration_seconds_bucket",
        "ptm_queue_duration_seconds_bucket",
        "ptm_compute_duration_seconds_bucket",
        "ptm_request_overhead_seconds_bucket",
        "ptm_batch_size_bucket",
        "ptm_model_load_seconds",
    ):
        assert family in text
    assert server.metric("ptm_requests_total", model="linear", protocol="rest", code="200") >= 1
    assert server.metric("ptm_requests_total", model="linear", protocol="grpc", code="200") >= 1
    assert server.metric("ptm_requests_total", model="linear", protocol="grpc", code="400") >= 1
    assert server.metric("ptm_model_load_seconds", model="linear") > 0


def test_concurrent_requests_are_batched_and_split_exactly(server: ServeProcess, linear_model: Path) -> None:
    """Sixteen requests of mixed sizes are all in the server at once (post_together); a forming
    batch waits while requests are still arriving, so they merge, and each answer must be
    exactly its own rows."""
    batches_before = server.metric("ptm_batch_size_count", model="linear")
    requests_before = server.metric("ptm_batch_requests_sum", model="linear")
    sizes = [1, 2, 3, 1, 4, 2, 1, 3, 2, 1, 1, 2, 3, 4, 1, 1]
    bodies = [json.dumps(_json_body(_feeds(rows, 100 + i))).encode() for i, rows in enumerate(sizes)]
    answers = server.post_together("/v2/models/linear/infer", "linear", bodies)
    for i, (status, text) in enumerate(answers):
        assert status == 200, text
        got = {o["name"]: _from_json(o) for o in json.loads(text)["outputs"]}
        want = _ort(linear_model, _feeds(sizes[i], 100 + i))
        assert got["y"].shape == (sizes[i], 3)
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got["s"], want["s"])
    batches = server.metric("ptm_batch_size_count", model="linear") - batches_before
    merged = server.metric("ptm_batch_requests_sum", model="linear") - requests_before
    assert merged == len(sizes)
    assert batches < len(sizes), (
        f"{len(sizes)} concurrent requests ran in {batches} batches: nothing was merged"
    )


def test_batching_on_and_off_give_identical_outputs(
    serve_factory: ServeFactory, server: ServeProcess, linear_model: Path, tmp_path: Path
) -> None:
    # The unbatched server serves a verified artifact directory (model.onnx + report.json).
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    model = artifact / MODEL_FILE
    model.write_bytes(linear_model.read_bytes())
    Report(
        artifact_uri=f"file://{model}",
        sha256=sha256_file(model),
        size_bytes=model.stat().st_size,
        opset=models.OPSET,
        precision=Precision.FP32,
        validation_passed=True,
    ).write(artifact)
    unbatched = serve_factory(artifact, "--model-name", "linear", "--max-batch-size", "1")
    meta = httpx.get(f"{unbatched.url}/v2/models/linear", timeout=10).json()["parameters"]
    assert meta["dynamic_batching"] is False and meta["sha256"] == sha256_file(model)
    assert meta["preferred_batch_size"] == 1

    def run(target: ServeProcess) -> list[np.ndarray]:
        def call(i: int) -> np.ndarray:
            response = httpx.post(
                f"{target.url}/v2/models/linear/infer", json=_json_body(_feeds(1, 500 + i)), timeout=30
            )
            assert response.status_code == 200, response.text
            return _from_json(response.json()["outputs"][0])

        with ThreadPoolExecutor(12) as pool:
            return list(pool.map(call, range(12)))

    for on, off in zip(run(server), run(unbatched), strict=True):
        np.testing.assert_array_equal(on, off)
    assert unbatched.metric("ptm_batch_size_sum", model="linear") == unbatched.metric(
        "ptm_batch_size_count", model="linear"
    )  # every batch had exactly one row


def test_a_lone_request_does_not_wait_out_the_queue_delay(
    serve_factory: ServeFactory, linear_model: Path
) -> None:
    """A 10 s queue delay, one client: nothing else is arriving, so nothing is waited for."""
    patient = serve_factory(
        linear_model, "--model-name", "linear", "--max-batch-size", "8", "--max-queue-delay-ms", "10000",
        "--preferred-batch-size", "8", "--concurrent-runs", "1",
    )  # fmt: skip
    feeds = _feeds(2, 900)
    want = _ort(linear_model, feeds)
    with httpx.Client(base_url=patient.url, timeout=5) as http:
        for _ in range(3):
            response = http.post("/v2/models/linear/infer", json=_json_body(feeds))
            assert response.status_code == 200, response.text
            np.testing.assert_array_equal(_from_json(response.json()["outputs"][0]), want["y"])
        bad = http.post("/v2/models/linear/infer", content=b"{not json")  # fails before the queue
        assert bad.status_code == 400
    client = triton_grpc.InferenceServerClient(patient.grpc_target)
    inputs = [triton_grpc.InferInput("x", [2, 4], "FP32"), triton_grpc.InferInput("k", [2, 2], "INT64")]
    inputs[0].set_data_from_numpy(feeds["x"])
    inputs[1].set_data_from_numpy(feeds["k"])
    result = client.infer("linear", inputs, client_timeout=5)
    np.testing.assert_array_equal(result.as_numpy("y"), want["y"])
    assert patient.metric("ptm_batch_size_count", model="linear") >= 4


@pytest.fixture(scope="module")
def slow_server(serve_factory: ServeFactory, model_dir: Path) -> ServeProcess:
    """One request computes at a time (about 1.2 s), two more may wait: states that last long
    enough to be observed from the metrics, then acted on."""
    return serve_factory(
        models.slow(model_dir / "slower.onnx", depth=120), "--max-batch-size", "1", "--max-queue-size", "2",
        "--intra-op-threads", "1", "--concurrent-runs", "1", "--warmup-requests", "1",
    )  # fmt: skip


SLOW_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]}


def test_full_queue_answers_429_and_resource_exhausted(slow_server: ServeProcess) -> None:
    """Eight requests at once: one computes, two wait, the rest are refused at once."""
    server = slow_server
    answers = server.post_together("/v2/models/model/infer", "model", [json.dumps(SLOW_BODY).encode()] * 8)
    codes = sorted(status for status, _ in answers)
    assert 1 <= codes.count(200) <= 3 and codes.count(429) == 8 - codes.count(200), codes
    for status, text in answers:
        doc = json.loads(text)
        if status == 200:
            assert doc["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
        else:
            assert "request queue is full (2 requests waiting)" in doc["error"]
    assert server.metric("ptm_requests_total", protocol="rest", code="429") == codes.count(429)

    client = triton_grpc.InferenceServerClient(server.grpc_target)
    tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))

    def grpc_call(_: int) -> str:
        try:
            client.infer("model", [tensor])
            return "OK"
        except InferenceServerException as exc:
            assert "request queue is full" in (exc.message() or "")
            return str(exc.status())

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(grpc_call, range(8)))
    assert set(statuses) == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, statuses
    client.close()
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200


def test_a_request_whose_client_left_is_dropped_from_the_queue(slow_server: ServeProcess) -> None:
    """Two requests in: one computes, one waits. Both clients leave. The computing one finishes
    unseen; the waiting one must never run, which a third request (queued behind where it
    was) proves by running right after the first."""
    import http.client

    server = slow_server
    path = "/v2/models/model/infer"
    body = json.dumps(SLOW_BODY).encode()
    batches = server.metric("ptm_batch_size_count", model="model")
    left = server.metric("ptm_requests_total", protocol="rest", code="499")
    clients = [http.client.HTTPConnection("127.0.0.1", server.http, timeout=60) for _ in range(2)]
    for client in clients:
        client.request("POST", path, body, {"Content-Type": "application/json"})
    _wait_for(
        lambda: (
            server.metric("ptm_requests_in_flight", model="model") == 2
            and server.metric("ptm_queue_depth", model="model") == 1
        ),
        "one request computing and one waiting",
    )
    for client in clients:
        client.close()
    _wait_for(
        lambda: server.metric("ptm_requests_total", protocol="rest", code="499") == left + 2,
        "both requests answered 499",
    )
    third = httpx.post(f"{server.url}{path}", content=body, timeout=60)
    assert third.status_code == 200, third.text
    # The computing one and the third ran; the abandoned waiting one did not.
    assert server.metric("ptm_batch_size_count", model="model") == batches + 2


def test_sigterm_drains_in_flight_requests_then_exits_0(
    serve_factory: ServeFactory, slow_model: Path
) -> None:
    server = serve_factory(
        slow_model,
        "--max-batch-size",
        "1",
        "--intra-op-threads",
        "1",
        "--concurrent-runs",
        "1",
        "--warmup-requests",
        "1",
        "--drain-timeout-s",
        "30",
    )
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [4.0, 3.0, 2.0, 1.0]}]}
    n = 5
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(httpx.post, f"{server.url}/v2/models/model/infer", json=body, timeout=60)
            for _ in range(n)
        ]
        _wait_for(
            lambda: server.metric("ptm_requests_in_flight", model="model") == n, f"{n} requests in flight"
        )
        server.proc.send_signal(15)
        refused: set[str] = set()  # what the draining server answered 503 to

        def new_work_refused() -> bool:
            for what, call in (
                ("ready", lambda: httpx.get(f"{server.url}/v2/health/ready", timeout=5)),
                ("infer", lambda: httpx.post(f"{server.url}/v2/models/model/infer", json=body, timeout=5)),
            ):
                if what in refused:
                    continue
                try:
                    if call().status_code == 503:
                        refused.add(what)
                except httpx.TransportError:
                    return server.proc.poll() is not None
            return refused == {"ready", "infer"}

        _wait_for(new_work_refused, "the draining server to refuse new work")
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * n
    assert all(r.json()["outputs"][0]["data"] == [4.0, 3.0, 2.0, 1.0] for r in responses)
    assert refused == {"ready", "infer"}, (
        f"the server exited before it refused {refused ^ {'ready', 'infer'}}"
    )
    assert server.proc.wait(DEADLINE_S) == 0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_stalled_bodies_cost_no_memory_and_time_out_with_408(
    serve_factory: ServeFactory, linear_model: Path
) -> None:
    """Clients that declare 60 MB bodies and stall: nothing is reserved for what has not
    arrived, and each is answered 408 once the request timeout (here 2 s) has passed."""
    server = serve_factory(linear_model, "--model-name", "linear", "--request-timeout-ms", "2000")
    declared = 60 * 1024 * 1024  # within the default 64 MiB limit
    before = _rss_mb(server.proc.pid)
    stalled = [server.start_post("/v2/models/linear/infer", declared, b'{"inputs": [') for _ in range(8)]
    try:
        _wait_for(lambda: server.metric("ptm_requests_in_flight", model="linear") == 8, "8 stalled requests")
        grown = _rss_mb(server.proc.pid) - before
        assert grown < 100, f"the server grew {grown:.0f} MB for 8 bodies that never came"
        # A live client is served meanwhile: the stalled ones hold no lock and no batch.
        feeds = _feeds(2, 77)
        live = httpx.post(f"{server.url}/v2/models/linear/infer", json=_json_body(feeds), timeout=10)
        assert live.status_code == 200, live.text
        for connection in stalled:
            response = connection.getresponse()
            assert response.status == 408
            assert response.getheader("Connection") == "close"
            assert (
                "did not arrive within the request timeout of 2000 ms" in json.loads(response.read())["error"]
            )
    finally:
        for connection in stalled:
            connection.close()
    _wait_for(lambda: server.metric("ptm_requests_in_flight", model="linear") == 0, "no request in flight")
    assert server.metric("ptm_requests_total", protocol="rest", code="408") == 8


def test_request_heads_are_bounded(server: ServeProcess) -> None:
    """A request line and headers past 64 KiB get 431 and a closed connection, however they
    arrive; heads within the bound, and requests pipelined on one connection, are served."""
    import socket

    def exchange(payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.http), timeout=30) as sock:
            # The server may close while this is still sending: what it said is read below.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(payload)
            received = b""
            while chunk := sock.recv(65536):  # until the server closes
                received += chunk
            return received

    def ready(padding: int) -> bytes:
        return b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(padding)
        )

    answer = exchange(ready(40) + b"Connection: close\r\n\r\n")  # about 40 KB of headers
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    # 1 MB of headers that never end, and one header of 1 MB: refused without waiting for the end.
    for head in (ready(1000), b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 1_000_000):
        answer = exchange(head)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"the request line and headers take more than 65536 bytes" in answer
    pipelined = exchange(ready(1) + b"\r\n" + ready(1) + b"Connection: close\r\n\r\n")
    assert pipelined.count(b"HTTP/1.1 200 ") == 2, pipelined


def test_sha256_mismatch_is_refused_at_start(
    serve_factory: ServeFactory, linear_model: Path, tmp_path: Path
) -> None:
    artifact = tmp_path / "tampered"
    artifact.mkdir()
    model = artifact / MODEL_FILE
    model.write_bytes(linear_model.read_bytes())
    Report(
        artifact_uri=f"file://{model}",
        sha256="ab" * 32,
        size_bytes=model.stat().st_size,
        opset=models.OPSET,
        precision=Precision.FP32,
        validation_passed=True,
    ).write(artifact)
    server = serve_factory(artifact, ready=False)
    assert server.proc.wait(DEADLINE_S) == 1
    assert f"sha256 mismatch: report.json records {'ab' * 32}" in server.log()
