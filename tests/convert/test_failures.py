"""Bad input gets a precise message and a permanent exit code; the gate fails closed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptm_runtime.report import (
    EXIT_INVALID,
    EXIT_VALIDATION_FAILED,
    TERMINATION_MESSAGE_LIMIT,
    sha256_file,
)
from tests.convert.conftest import MLP, ConvertFn
from tests.convert.nets import tiny_mlp


def _store_args(tmp_path: Path, name: str = "m") -> tuple[str, ...]:
    return ("--store", str(tmp_path / "store"), "--name", name, "--revision", "r1")


def _no_artifact(tmp_path: Path, name: str = "m") -> bool:
    final = tmp_path / "store" / "default" / name
    return not final.exists() or not any(p.name == "r1" for p in final.iterdir())


def _assert_permanent(run: object, reason: str, *fragments: str) -> None:
    from tests.convert.conftest import Run

    assert isinstance(run, Run)
    assert run.code == EXIT_INVALID, (run.code, run.stderr[-2000:])
    failure = run.failure
    assert failure.permanent and failure.exit_code == EXIT_INVALID
    assert failure.reason == reason, failure.message
    for fragment in fragments:
        assert fragment in failure.message, failure.message
    assert len(run.termination.encode()) <= TERMINATION_MESSAGE_LIMIT


def test_missing_file(convert: ConvertFn, tmp_path: Path) -> None:
    run = convert("--source", str(tmp_path / "nope.pt"), *MLP, *_store_args(tmp_path))
    _assert_permanent(run, "InvalidSource", "no such file", "nope.pt")
    assert _no_artifact(tmp_path)


def test_truncated_checkpoint(convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path) -> None:
    data = mlp_checkpoint.read_bytes()
    mlp_checkpoint.write_bytes(data[: len(data) // 2])
    run = convert("--source", str(mlp_checkpoint), *MLP, *_store_args(tmp_path))
    _assert_permanent(run, "InvalidSource", "mlp.pt", "cannot read the checkpoint")


def test_full_pickle_is_refused_unless_allowed(convert: ConvertFn, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "whole-module.pt"
    torch.save(tiny_mlp(), ckpt)  # a pickled module object, not a state_dict
    run = convert("--source", str(ckpt), *MLP, *_store_args(tmp_path))
    _assert_permanent(run, "InvalidSource", "full pickle", "allowPickle")
    assert _no_artifact(tmp_path)
    allowed = convert("--source", str(ckpt), *MLP, "--allow-pickle", *_store_args(tmp_path))
    assert allowed.code == 0, allowed.stderr[-2000:]
    assert allowed.report.validation_passed


def test_architecture_that_does_not_match_the_state_dict(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path
) -> None:
    run = convert(
        "--source", str(mlp_checkpoint), "--format", "pytorch-state-dict",
        "--architecture", "tests.convert.nets:tiny_cnn", "--input", "x:float32:-1,3,16,16", *_store_args(tmp_path),
    )  # fmt: skip
    _assert_permanent(
        run, "InvalidSource", "does not match architecture tests.convert.nets:tiny_cnn", "Missing key"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--format", "keras"), "source.format: Input should be"),
        (("--format", "pytorch-state-dict", "--input", "x:float32:-1,16"), "architecture is required"),
        (
            (
                "--format",
                "pytorch-state-dict",
                "--architecture",
                "no_such_module_ptm:f",
                "--input",
                "x:float32:-1,16",
            ),
            "cannot import no_such_module_ptm",
        ),
        (
            ("--format", "pytorch-state-dict", "--architecture", "tests.convert.nets:tiny_mlp"),
            "source.inputs is required",
        ),
        ((*MLP, "--precision", "int8-static"), "needs quantization.mode static"),
        ((*MLP, "--min-cosine-similarity", "1.5"), "validation.minCosineSimilarity"),
        ((*MLP, "--input", "x:complex64:-1,16"), "dtype must be one of"),
    ],
)
def test_invalid_spec(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path, args: tuple[str, ...], fragment: str
) -> None:
    run = convert("--source", str(mlp_checkpoint), *args, *_store_args(tmp_path))
    _assert_permanent(run, "InvalidSpec", fragment)


def test_tensorflow_without_the_extra_names_it(convert: ConvertFn, tmp_path: Path) -> None:
    saved = tmp_path / "saved_model"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"\x08\x01")
    run = convert("--source", str(saved), "--format", "tensorflow-savedmodel", *_store_args(tmp_path))
    _assert_permanent(run, "InvalidSpec", "tensorflow extra", "pip install 'ptm[tensorflow]'")


def test_unsupported_operator_fails_export_naming_it(convert: ConvertFn, tmp_path: Path) -> None:
    from tests.convert.nets import mystery

    ckpt = tmp_path / "mystery.pt"
    torch.save(mystery().state_dict(), ckpt)
    run = convert(
        "--source", str(ckpt), "--format", "pytorch-state-dict", "--architecture", "tests.convert.nets:mystery",
        "--input", "x:float32:-1,16", *_store_args(tmp_path),
    )  # fmt: skip
    _assert_permanent(run, "ExportFailed", "dynamo:", "torchscript:", "mystery")
    assert _no_artifact(tmp_path)


def test_sha256_pin_mismatch(convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path) -> None:
    actual = sha256_file(mlp_checkpoint)
    wrong = "0" * 64
    run = convert("--source", str(mlp_checkpoint), *MLP, "--sha256", wrong, *_store_args(tmp_path))
    _assert_permanent(run, "InvalidSource", "sha256 mismatch", actual, wrong)
    ok = convert("--source", str(mlp_checkpoint), *MLP, "--sha256", actual, *_store_args(tmp_path))
    assert ok.code == 0 and ok.report.source_sha256 == actual


def test_dataset_without_the_model_inputs(convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path) -> None:
    import numpy as np

    np.savez(tmp_path / "val.npz", other=np.zeros((4, 16), np.float32))
    run = convert(
        "--source", str(mlp_checkpoint), *MLP, "--dataset", str(tmp_path / "val.npz"), *_store_args(tmp_path)
    )
    _assert_permanent(run, "InvalidSource", "lacks arrays for inputs ['x']")


IMPOSSIBLE = (
    "--precision",
    "int8-dynamic,fp16,fp32",
    "--max-abs-error",
    "1e-30",
    "--min-cosine-similarity",
    "1.0",
)


def test_impossible_threshold_fails_closed_listing_every_candidate(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path
) -> None:
    run = convert("--source", str(mlp_checkpoint), *MLP, *IMPOSSIBLE, *_store_args(tmp_path))
    assert run.code == EXIT_VALIDATION_FAILED, run.stderr[-2000:]
    failure = run.failure
    assert failure.reason == "ValidationFailed" and failure.permanent
    assert [c.precision.value for c in failure.candidates] == ["int8-dynamic", "fp16", "fp32"]
    for cand in failure.candidates:
        assert not cand.passed
        assert "maxAbsError 1e-30" in cand.reason
        assert cand.metrics.max_abs_error is not None
    assert "failurePolicy Block" in failure.message
    # nothing at the final path, no staging left behind
    assert _no_artifact(tmp_path)
    parent = tmp_path / "store" / "default" / "m"
    assert not parent.exists() or not list(parent.iterdir())
    # the table is on stdout for a person
    assert "int8-dynamic" in run.stdout and "why not" in run.stdout


def test_warn_policy_serves_fp32_and_says_so(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path
) -> None:
    run = convert(
        "--source", str(mlp_checkpoint), *MLP, "--precision", "int8-dynamic", "--max-abs-error", "1e-30",
        "--failure-policy", "Warn", *_store_args(tmp_path),
    )  # fmt: skip
    assert run.code == 0, run.stderr[-2000:]
    report = run.report
    assert report.precision.value == "fp32" and not report.validation_passed
    assert [c.precision.value for c in report.candidates] == ["int8-dynamic", "fp32"]
    assert "failurePolicy Warn" in report.validation_message
    assert (tmp_path / "store" / "default" / "m" / "r1" / "model.onnx").is_file()
