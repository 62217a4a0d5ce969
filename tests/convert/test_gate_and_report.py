"""Pure parts: metrics, the gate's verdicts, the termination message size, option parsing."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from ptm_runtime.convert import cli, samples, validate
from ptm_runtime.convert.errors import InvalidSpec
from ptm_runtime.options import TensorSpec, ValidationOptions
from ptm_runtime.report import (
    TERMINATION_MESSAGE_LIMIT,
    Candidate,
    Failure,
    Metrics,
    Report,
    read_termination_message,
)


def test_metrics_of_identical_flipped_and_zero_outputs() -> None:
    ref = [[np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]], np.float32)]]
    same = validate.compare(ref, ref, logits=0)
    assert same.max_abs_error == 0 and same.cosine_similarity == 1.0 and same.top1_agreement == 1.0
    flipped = [[np.array([[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]], np.float32)]]
    m = validate.compare(ref, flipped, logits=0)
    assert m.cosine_similarity == pytest.approx(-1.0)
    assert m.top1_agreement == pytest.approx(2 / 3)
    assert m.max_abs_error == pytest.approx(6.0)
    one_zero = [[np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [3.0, 1.0, 0.0]], np.float32)]]
    assert validate.compare(ref, one_zero, logits=None).cosine_similarity == 0.0


def test_multi_output_cosine_takes_the_worst_output_per_sample() -> None:
    ref = [[np.ones((2, 4), np.float32), np.ones((2, 3), np.float32)]]
    out = [[np.ones((2, 4), np.float32), np.array([[1, 1, 1], [1, -1, 1]], np.float32)]]
    m = validate.compare(ref, out, logits=None)
    assert m.cosine_similarity == pytest.approx(1 / 3)
    assert m.mean_cosine_similarity == pytest.approx((1 + 1 / 3) / 2)


@pytest.mark.parametrize(
    ("metrics", "options", "classifier", "passed", "fragment"),
    [
        (
            Metrics(max_abs_error=0.1, cosine_similarity=0.999, mean_cosine_similarity=0.999),
            {},
            False,
            True,
            "",
        ),
        (
            Metrics(max_abs_error=0.1, cosine_similarity=0.98, mean_cosine_similarity=0.995),
            {},
            False,
            False,
            "min cosine 0.980000 < minCosineSimilarity 0.99",
        ),
        (
            Metrics(max_abs_error=0.1, cosine_similarity=0.999, mean_cosine_similarity=0.999),
            {"maxAbsError": 0.01},
            False,
            False,
            "max abs error 0.1 > maxAbsError 0.01",
        ),
        (
            Metrics(cosine_similarity=0.999, mean_cosine_similarity=0.999, top1_agreement=0.95),
            {},
            True,
            False,
            "accuracy drop 0.05 (top-1) > maxAccuracyDrop 0.01",
        ),
        (
            Metrics(cosine_similarity=0.999, mean_cosine_similarity=0.999),
            {"minTop1Agreement": 0.9},
            False,
            False,
            "top-1 agreement unavailable",
        ),
        (Metrics(cosine_similarity=float("nan"), mean_cosine_similarity=0.9), {}, False, False, "not finite"),
        (
            Metrics(cosine_similarity=0.995, mean_cosine_similarity=0.985),
            {"minCosineSimilarity": 0.9},
            False,
            False,
            "(mean cosine) > maxAccuracyDrop",
        ),
    ],
)
def test_gate_verdicts(
    metrics: Metrics, options: dict[str, float], classifier: bool, passed: bool, fragment: str
) -> None:
    ok, reason, _ = validate.judge(metrics, ValidationOptions.model_validate(options), classifier)
    assert ok is passed
    assert fragment in reason


def test_termination_messages_stay_under_the_kubernetes_limit() -> None:
    big = [
        Candidate(
            precision="fp32", passed=False, reason="r" * 5000, optimizations=["step"] * 200, size_bytes=1
        )
        for _ in range(64)
    ]
    failure = Failure(
        reason="ValidationFailed", message="m" * 20000, exit_code=3, permanent=True, candidates=big
    )
    text = failure.compact()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = read_termination_message(text)
    assert isinstance(parsed, Failure) and parsed.exit_code == 3 and parsed.permanent
    few = Failure(
        reason="ValidationFailed", message="m" * 20000, exit_code=3, permanent=True, candidates=big[:3]
    )
    kept = read_termination_message(few.compact())
    assert isinstance(kept, Failure) and len(kept.candidates) == 3  # trimmed, not dropped

    inputs = [TensorSpec(name=f"input_{i}_" + "x" * 100, shape=[-1, 3]) for i in range(64)]
    report = Report(
        artifact_uri="s3://b/k/model.onnx", sha256="a" * 64, size_bytes=1, opset=18, precision="fp32",
        validation_passed=True, inputs=inputs, outputs=inputs, candidates=big,
        timings={"total": 1.0}, revision="r1",
    )  # fmt: skip
    compact = report.compact()
    assert len(compact.encode()) <= TERMINATION_MESSAGE_LIMIT
    again = read_termination_message(compact)
    assert isinstance(again, Report) and again.revision == "r1" and again.sha256 == "a" * 64


def test_sample_sources_shapes_and_errors(tmp_path: Path) -> None:
    specs = [TensorSpec(name="x", shape=[-1, 3, -1]), TensorSpec(name="ids", dtype="int64", shape=[-1, 5])]
    batches = samples.synthetic(specs, samples=10, batch=4)
    assert [b["x"].shape for b in batches] == [(4, 3, 16), (4, 3, 16), (2, 3, 16)]
    assert batches[0]["ids"].dtype == np.int64 and set(np.unique(batches[0]["ids"])) <= {0, 1}
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 3, 7), np.float64), ids=np.ones((6, 5), np.int32))
    loaded = samples.from_npz(tmp_path / "d.npz", specs, samples=5, batch=4, what="validation.dataset")
    assert [b["x"].shape for b in loaded] == [(4, 3, 7), (1, 3, 7)]
    assert loaded[0]["x"].dtype == np.float32 and loaded[0]["ids"].dtype == np.int64
    np.savez(tmp_path / "bad.npz", x=np.zeros((6, 4, 7)), ids=np.ones((6, 5)))
    with pytest.raises(Exception, match=r"has shape \[4, 7\] per sample"):
        samples.from_npz(tmp_path / "bad.npz", specs, samples=5, batch=4, what="validation.dataset")


def test_spec_file_and_flags_merge_with_flags_winning(tmp_path: Path) -> None:
    spec = tmp_path / "model.yaml"
    spec.write_text(
        """
apiVersion: ptm.dev/v1alpha1
kind: PretrainedModel
metadata: {name: resnet, namespace: vision}
spec:
  source:
    uri: s3://models/resnet18.pt
    format: pytorch-state-dict
    architecture: torchvision.models:resnet18
    inputs: [{name: input, shape: [-1, 3, 224, 224]}]
  optimization:
    precision: [fp16, fp32]
    quantization: {perChannel: true}
  validation: {minTop1Agreement: 0.99, samples: 16}
  serving: {replicas: 2}
"""
    )
    args = cli.parser().parse_args(
        ["--spec", str(spec), "--store", "/tmp/s", "--samples", "4", "--opset", "17"]
    )
    request = cli.build_request(args)
    assert (request.namespace, request.name) == ("vision", "resnet")
    assert request.source.architecture == "torchvision.models:resnet18"
    assert [p.value for p in request.optimization.precision] == ["fp16", "fp32"]
    assert request.optimization.quantization.per_channel
    assert request.validation.samples == 4 and request.validation.min_top1_agreement == 0.99
    assert request.conversion.opset == 17
    # the default revision is a digest of what changes the artifact
    other = cli.build_request(
        cli.parser().parse_args(["--spec", str(spec), "--store", "/tmp/s", "--samples", "5"])
    )
    assert request.revision != other.revision and len(request.revision) == 16


def test_spec_json_is_what_the_operator_passes() -> None:
    import json

    inline = json.dumps(
        {
            "spec": {
                "source": {"uri": "hf://sentence-transformers/all-MiniLM-L6-v2", "format": "huggingface"},
                "optimization": {"precision": ["int8-dynamic", "fp32"]},
            }
        }
    )
    args = cli.parser().parse_args(
        ["--spec-json", inline, "--store", "/s", "--name", "m", "--revision", "abc"]
    )
    request = cli.build_request(args)
    assert request.source.uri.startswith("hf://") and request.revision == "abc"
    assert [p.value for p in request.optimization.precision] == ["int8-dynamic", "fp32"]
    bad = cli.parser().parse_args(["--spec-json", "{not json", "--store", "/s", "--name", "m"])
    with pytest.raises(InvalidSpec, match="--spec-json"):
        cli.build_request(bad)


def test_bad_flags_are_spec_errors() -> None:
    args = cli.parser().parse_args(["--store", "/tmp/s", "--source", "/x", "--format", "onnx"])
    with pytest.raises(InvalidSpec, match="--name is required"):
        cli.build_request(args)
    args = argparse.Namespace(**{**vars(args), "name": "m", "dynamic_axis": ["ids=a,b"]})
    with pytest.raises(InvalidSpec, match="--dynamic-axis"):
        cli.build_request(args)
