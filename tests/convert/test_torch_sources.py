"""Real conversions of small torch models: every PyTorch source format, every precision,
the ORT target, pruning, calibration, datasets and re-use of a finished revision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ptm_runtime.report import REPORT_FILE, Report, sha256_file
from tests.convert.conftest import MLP, ConvertFn
from tests.convert.nets import tiny_cnn, tiny_mlp, two_heads


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds))


def test_state_dict_builds_every_candidate_picks_the_first_that_passes_and_reuses_it(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    args = (
        "--source", str(mlp_checkpoint), *MLP,
        "--precision", "int8-dynamic,fp16,fp32", "--target", "onnx", "--target", "ort",
        "--store", str(store), "--namespace", "team-a", "--name", "mlp", "--revision", "r1",
    )  # fmt: skip
    run = convert(*args)
    assert run.code == 0, run.stderr
    report = run.report
    final = store / "team-a" / "mlp" / "r1"
    assert report.artifact_uri == (final / "model.onnx").as_uri()
    assert report.sha256 == sha256_file(final / "model.onnx")
    assert report.size_bytes == (final / "model.onnx").stat().st_size
    assert report.source_sha256 == sha256_file(mlp_checkpoint)
    assert report.revision == "r1" and report.validation_passed
    assert report.exporter in {"dynamo", "torchscript"}
    assert [c.precision.value for c in report.candidates] == ["int8-dynamic", "fp16", "fp32"]
    assert report.precision.value == "int8-dynamic", report.candidates
    for cand in report.candidates:
        assert cand.passed, cand.reason
        assert cand.latency_ms is not None and cand.latency_ms > 0
        assert cand.latency_ms_batch8 is not None and cand.size_bytes
        assert cand.metrics.cosine_similarity is not None and cand.metrics.cosine_similarity > 0.99
    fp32 = report.candidates[2].metrics
    assert fp32.max_abs_error is not None and fp32.max_abs_error < 1e-4
    assert fp32.top1_agreement == 1.0
    assert [(s.name, s.dtype.value, s.shape) for s in report.inputs] == [("x", "float32", [-1, 16])]
    assert [o.name for o in report.outputs] == ["output"]
    assert report.latency_ms_before and report.latency_ms_after and report.speedup
    assert report.timings["total"] > 0 and "export" in report.timings
    # the full report sits beside the artifact
    assert Report.read(final).candidates == report.candidates
    # the ORT-format artifact loads and has its own digest
    assert report.ort_sha256 == sha256_file(final / "model.ort")
    assert report.ort_artifact_uri == (final / "model.ort").as_uri()
    # the stored artifact computes what the torch model computes (dynamic batch of 5)
    model = tiny_mlp()
    model.load_state_dict(torch.load(mlp_checkpoint, weights_only=True))
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    want = model.eval()(torch.from_numpy(x)).detach().numpy()
    (got,) = _outputs(final / "model.onnx", {"x": x})
    np.testing.assert_allclose(got, want, atol=0.05)
    assert (got.argmax(1) == want.argmax(1)).all()
    (got_ort,) = _outputs(final / "model.ort", {"x": x})
    np.testing.assert_allclose(got_ort, got, atol=1e-5)

    # the same revision again: nothing is fetched or converted (the checkpoint is even gone)
    mtime = (final / REPORT_FILE).stat().st_mtime_ns
    mlp_checkpoint.unlink()
    again = convert(*args)
    assert again.code == 0, again.stderr
    assert again.stdout.startswith("reused:")
    assert again.report.sha256 == report.sha256
    assert (final / REPORT_FILE).stat().st_mtime_ns == mtime


def test_dict_outputs_keep_their_names_and_fixed_batch_is_respected(
    convert: ConvertFn, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    ckpt = tmp_path / "heads.pt"
    torch.save(two_heads().state_dict(), ckpt)
    run = convert(
        "--source", str(ckpt), "--format", "pytorch-state-dict", "--architecture", "tests.convert.nets:two_heads",
        "--input", "x:float32:1,16", "--no-dynamic-batch", "--samples", "6",
        "--store", str(tmp_path / "store"), "--name", "heads",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    report = run.report
    assert [o.name for o in report.outputs] == ["scores", "embedding"]
    assert report.inputs[0].shape == [1, 16]
    assert report.outputs[0].shape == [1, 3]
    assert report.candidates[0].latency_ms_batch8 is None  # no batch axis to grow


def test_torchscript_and_torch_export_sources(convert: ConvertFn, tmp_path: Path) -> None:
    torch.manual_seed(2)
    scripted = tmp_path / "cnn.torchscript.pt"
    torch.jit.save(torch.jit.script(tiny_cnn().eval()), str(scripted))
    run = convert(
        "--source", str(scripted), "--format", "pytorch-torchscript", "--input", "image:float32:-1,3,16,16",
        "--samples", "8", "--store", str(tmp_path / "store"), "--name", "cnn-ts",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert run.report.inputs[0].name == "image"
    assert run.report.candidates[0].metrics.top1_agreement == 1.0

    program = torch.export.export(
        tiny_mlp().eval(), (torch.randn(4, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    pt2 = tmp_path / "mlp.pt2"
    torch.export.save(program, str(pt2))
    run = convert(
        "--source", str(pt2), "--format", "pytorch-exported", "--samples", "8",
        "--store", str(tmp_path / "store"), "--name", "mlp-pt2",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    report = run.report
    assert report.exporter == "dynamo"
    assert report.inputs[0].shape == [-1, 16]  # the signature comes from the program itself
    assert report.metrics.max_abs_error is not None and report.metrics.max_abs_error < 1e-4


def test_onnx_passthrough_with_static_int8_calibration_and_a_dataset(
    convert: ConvertFn, tmp_path: Path
) -> None:
    torch.manual_seed(3)
    model = tiny_cnn().eval()
    src = tmp_path / "cnn.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 3, 16, 16),), str(src), input_names=["image"], output_names=["scores"],
        dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calibration.npz", image=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    np.savez(tmp_path / "validation.npz", image=rng.standard_normal((12, 3, 16, 16)).astype(np.float32))
    run = convert(
        "--source", str(src), "--format", "onnx", "--precision", "int8-static,fp32",
        "--calibration", str(tmp_path / "calibration.npz"), "--calibration-method", "MinMax",
        "--calibration-samples", "24", "--dataset", str(tmp_path / "validation.npz"), "--samples", "100",
        "--min-cosine-similarity", "0.9", "--max-accuracy-drop", "0.1",
        "--store", str(tmp_path / "store"), "--name", "cnn-onnx",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    report = run.report
    assert report.exporter == "passthrough"
    static = report.candidates[0]
    assert static.precision.value == "int8-static" and static.passed, static.reason
    assert report.precision.value == "int8-static"
    assert any("MinMax calibration on 24 samples" in step for step in report.optimizations)
    stored = onnx.load(str(tmp_path / "store" / "default" / "cnn-onnx" / report.revision / "model.onnx"))  # type: ignore[operator]
    assert any(n.op_type == "QuantizeLinear" for n in stored.graph.node)
    # the dataset had 12 samples: the metrics cover exactly those, against the source graph
    assert report.candidates[1].metrics.max_abs_error is not None
    assert report.candidates[1].metrics.max_abs_error < 1e-4


@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_pruning_records_the_measured_sparsity(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path, method: str
) -> None:
    run = convert(
        "--source", str(mlp_checkpoint), *MLP, "--pruning", method, "--sparsity", "0.5",
        "--min-cosine-similarity", "0.1", "--max-accuracy-drop", "0.9", "--graph-optimization-level", "disabled",
        "--store", str(tmp_path / "store"), "--name", f"mlp-{method}",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    report = run.report
    assert report.sparsity is not None and 0.49 <= report.sparsity <= 0.55
    assert report.optimizations[0].startswith(f"pruning:{method} 0.5")
    # the reference is the unpruned model, so the gate sees what pruning cost
    assert report.metrics.max_abs_error is not None and report.metrics.max_abs_error > 1e-3
    stored = onnx.load(
        str(tmp_path / "store" / "default" / f"mlp-{method}" / str(report.revision) / "model.onnx")
    )
    weights = [onnx.numpy_helper.to_array(t) for t in stored.graph.initializer if t.dims and len(t.dims) == 2]
    assert weights and all((w == 0).mean() >= 0.45 for w in weights)


def test_resnet18_state_dict_agrees_top1_at_fp32(convert: ConvertFn, tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(4)
    ckpt = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    run = convert(
        "--source", str(ckpt), "--format", "pytorch-state-dict", "--architecture", "torchvision.models:resnet18",
        "--input", "input:float32:-1,3,224,224", "--samples", "8", "--min-top1-agreement", "1.0",
        "--store", str(tmp_path / "store"), "--name", "resnet18",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    report = run.report
    assert report.precision.value == "fp32" and report.validation_passed
    assert report.metrics.top1_agreement == 1.0
    assert report.metrics.cosine_similarity is not None and report.metrics.cosine_similarity > 0.9999
    assert report.outputs[0].shape == [-1, 1000]


def test_fp16_without_fp32_io_changes_the_signature(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path
) -> None:
    run = convert(
        "--source", str(mlp_checkpoint), *MLP, "--precision", "fp16", "--no-keep-io-fp32",
        "--store", str(tmp_path / "store"), "--name", "mlp-fp16",
    )  # fmt: skip
    assert run.code == 0, run.stderr[-2000:]
    report = run.report
    assert report.precision.value == "fp16" and report.validation_passed
    assert [(s.name, s.dtype.value) for s in report.inputs] == [("x", "float16")]
    assert [o.dtype.value for o in report.outputs] == ["float16"]
    assert "fp16" in report.optimizations
    assert report.metrics.cosine_similarity is not None and report.metrics.cosine_similarity > 0.999
