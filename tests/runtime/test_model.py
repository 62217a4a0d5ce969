"""OnnxModel: artifact verification, provider choice, inference equal to plain ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ptm_runtime.options import ExecutionProvider, Precision, RuntimeOptions
from ptm_runtime.report import MODEL_FILE, Report, sha256_file
from ptm_runtime.serve.errors import ArtifactError, InvalidInput
from ptm_runtime.serve.model import OnnxModel, choose_providers, resolve_artifact
from tests.runtime import models


def _artifact(directory: Path, sha256: str | None = None) -> Path:
    model = models.linear(directory / MODEL_FILE)
    Report(
        artifact_uri=f"file://{model}",
        sha256=sha256 or sha256_file(model),
        size_bytes=model.stat().st_size,
        opset=models.OPSET,
        precision=Precision.FP32,
        validation_passed=True,
    ).write(directory)
    return directory


def test_artifact_directory_is_verified(tmp_path: Path) -> None:
    artifact = resolve_artifact(_artifact(tmp_path))
    assert artifact.model_path == tmp_path / MODEL_FILE
    assert artifact.report is not None and artifact.report.sha256 == artifact.sha256


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    _artifact(tmp_path, sha256="0" * 64)
    with pytest.raises(ArtifactError, match=r"sha256 mismatch: report\.json records 0{64}"):
        resolve_artifact(tmp_path)
    # Passing model.onnx itself does not dodge the report beside it.
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        resolve_artifact(tmp_path / MODEL_FILE)


def test_directory_without_report_is_refused(tmp_path: Path) -> None:
    models.linear(tmp_path / MODEL_FILE)
    with pytest.raises(ArtifactError, match=r"has no report\.json"):
        resolve_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="no such artifact"):
        resolve_artifact(tmp_path / "missing.onnx")


def test_bare_onnx_file_is_served_unverified(tmp_path: Path) -> None:
    path = models.linear(tmp_path / "linear.onnx")
    artifact = resolve_artifact(path)
    assert artifact.report is None and artifact.sha256 == sha256_file(path)


def test_provider_order_is_limited_to_what_is_available() -> None:
    wanted = [p.value for p in ExecutionProvider]
    assert choose_providers(wanted, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(wanted, ["CPUExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(ArtifactError, match="none of the configured execution providers"):
        choose_providers(["TensorrtExecutionProvider"], ["CPUExecutionProvider"])


def test_inference_equals_plain_onnxruntime_with_and_without_io_binding(tmp_path: Path) -> None:
    path = models.linear(tmp_path / "linear.onnx")
    model = OnnxModel.load(path, RuntimeOptions())
    assert model.provider == "CPUExecutionProvider"
    assert model.dynamic_batch
    assert [(t.name, t.datatype, t.shape) for t in model.inputs] == [
        ("x", "FP32", (-1, 4)),
        ("k", "INT64", (-1, 2)),
    ]
    rng = np.random.default_rng(1)
    feeds: dict[str, np.ndarray] = {
        "x": rng.standard_normal((5, 4)).astype(np.float32),
        "k": rng.integers(-9, 9, (5, 2)),
    }
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = model.infer(feeds)
    np.testing.assert_array_equal(got["y"], plain[0])
    np.testing.assert_array_equal(got["s"], plain[1])
    bound = OnnxModel(model.session, model.artifact, model.options, 0.0, io_binding=True)
    got_bound = bound.infer(feeds)
    np.testing.assert_array_equal(got_bound["y"], plain[0])
    np.testing.assert_array_equal(got_bound["s"], plain[1])
    assert model.warmup(4, 8) > 0


def test_shapes_the_model_cannot_take_are_client_errors(tmp_path: Path) -> None:
    model = OnnxModel.load(models.linear(tmp_path / "linear.onnx"), RuntimeOptions())
    with pytest.raises(InvalidInput, match="the model rejected the input"):
        model.infer({"x": np.zeros((2, 5), np.float32), "k": np.zeros((2, 2), np.int64)})


def test_fixed_shape_model_has_no_dynamic_batch(tmp_path: Path) -> None:
    model = OnnxModel.load(models.fixed(tmp_path / "fixed.onnx"), RuntimeOptions())
    assert not model.dynamic_batch
    assert model.sample_feeds(8)["x"].shape == (2, 4)


def test_unsupported_tensor_types_and_garbage_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"input 't' has type tensor\(string\)"):
        OnnxModel.load(models.string_input(tmp_path / "strings.onnx"), RuntimeOptions())
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not protobuf")
    with pytest.raises(ArtifactError):
        OnnxModel.load(garbage, RuntimeOptions())


def test_trim_heap_gives_freed_memory_back() -> None:
    """In a fresh interpreter: 200 MB freed in 100 KB blocks stays resident (the heap's top is
    still in use) until trim_heap."""
    script = """
import re
from pathlib import Path
from ptm_runtime.serve.model import trim_heap

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024

blocks = [bytearray(100_000) for _ in range(2000)]
keep = bytearray(100_000)  # above the freed blocks: the heap cannot shrink from the top
del blocks
before = rss()
assert trim_heap()
print(before, rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = (int(x) for x in out.stdout.split())
    assert before - after > 150, f"RSS {before} MB before the trim, {after} MB after"
