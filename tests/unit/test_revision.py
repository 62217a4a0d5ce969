"""revision_of(): one short, stable id per artifact, blind to how the artifact is served."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from ptm_operator.api import PretrainedModelSpec
from ptm_operator.revision import REVISION_LENGTH, artifact_inputs, revision_of
from tests.unit.specs import resnet_s3_source

Mutation = Callable[[dict[str, Any]], None]

HF: dict[str, Any] = {
    "source": {
        "uri": "hf://sentence-transformers/all-MiniLM-L6-v2@main",
        "format": "huggingface",
        "task": "feature-extraction",
    },
    "conversion": {"dynamicAxes": {"input_ids": [0, 1], "attention_mask": [0, 1]}},
    "optimization": {"precision": ["int8-dynamic", "fp32"]},
    "serving": {"replicas": 2, "executionProviders": ["CPUExecutionProvider"]},
}

S3: dict[str, Any] = {
    "source": resnet_s3_source(),
    "optimization": {"precision": ["fp16", "fp32"]},
    "validation": {"samples": 64, "minTop1Agreement": 0.99},
    "serving": {"resources": {"limits": {"memory": "8Gi", "nvidia.com/gpu": 1}}},
}


def spec(base: dict[str, Any], mutate: Mutation | None = None) -> PretrainedModelSpec:
    data = copy.deepcopy(base)
    if mutate is not None:
        mutate(data)
    return PretrainedModelSpec.model_validate(data)


def setter(*path: str, value: Any) -> Mutation:
    """A mutation that sets spec[path...] = value, creating sections on the way."""

    def mutate(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    return mutate


def test_revision_is_a_short_lowercase_hex_id_and_deterministic() -> None:
    first = revision_of(spec(HF))
    assert re.fullmatch(rf"[0-9a-f]{{{REVISION_LENGTH}}}", first)
    assert revision_of(spec(HF)) == first
    assert revision_of(spec(S3)) != first


@pytest.mark.parametrize(
    ("base", "mutate"),
    [
        pytest.param(
            HF,
            setter("source", "uri", value="hf://sentence-transformers/all-MiniLM-L6-v2@v2"),
            id="source.uri",
        ),
        pytest.param(HF, setter("source", "task", value="sentence-similarity"), id="source.task"),
        pytest.param(S3, setter("source", "sha256", value="ab" * 32), id="source.sha256"),
        pytest.param(S3, setter("source", "allowPickle", value=True), id="source.allowPickle"),
        pytest.param(
            S3,
            setter("source", "inputs", value=[{"name": "input", "shape": [-1, 3, 256, 256]}]),
            id="source.inputs",
        ),
        pytest.param(HF, setter("conversion", "opset", value=17), id="conversion.opset"),
        pytest.param(HF, setter("conversion", "dynamicBatch", value=False), id="conversion.dynamicBatch"),
        pytest.param(
            HF, setter("conversion", "dynamicAxes", value={"input_ids": [0]}), id="conversion.dynamicAxes"
        ),
        pytest.param(HF, setter("conversion", "targets", value=["onnx", "ort"]), id="conversion.targets"),
        pytest.param(HF, setter("optimization", "precision", value=["fp32"]), id="optimization.precision"),
        pytest.param(
            HF, setter("optimization", "precision", value=["fp32", "int8-dynamic"]), id="precision order"
        ),
        pytest.param(
            HF, setter("optimization", "graphOptimizationLevel", value="basic"), id="optimization.level"
        ),
        pytest.param(
            HF,
            setter("optimization", "pruning", value={"method": "magnitude", "sparsity": 0.5}),
            id="optimization.pruning",
        ),
        pytest.param(S3, setter("validation", "samples", value=128), id="validation.samples"),
        pytest.param(S3, setter("validation", "failurePolicy", value="Warn"), id="validation.failurePolicy"),
        pytest.param(
            S3, setter("validation", "minCosineSimilarity", value=0.95), id="validation.minCosineSimilarity"
        ),
        pytest.param(
            S3,
            setter("validation", "dataset", value={"uri": "s3://models/vision/val.npz"}),
            id="validation.dataset",
        ),
    ],
)
def test_what_changes_the_artifact_changes_the_revision(base: dict[str, Any], mutate: Mutation) -> None:
    assert revision_of(spec(base, mutate)) != revision_of(spec(base))


@pytest.mark.parametrize(
    ("base", "mutate"),
    [
        pytest.param(HF, setter("serving", "replicas", value=7), id="serving.replicas"),
        pytest.param(HF, setter("serving", "batching", value={"maxBatchSize": 64}), id="serving.batching"),
        pytest.param(
            HF,
            setter("serving", "executionProviders", value=["CUDAExecutionProvider"]),
            id="serving.executionProviders",
        ),
        pytest.param(
            HF,
            setter("serving", "autoscaling", value={"minReplicas": 1, "maxReplicas": 5}),
            id="serving.autoscaling",
        ),
        pytest.param(S3, setter("serving", "resources", value={"limits": {"nvidia.com/gpu": 2}}), id="gpus"),
        pytest.param(HF, setter("rollout", "strategy", value="Recreate"), id="rollout.strategy"),
        pytest.param(HF, setter("rollout", "steps", value=[{"setWeight": 50}]), id="rollout.steps"),
        pytest.param(HF, setter("remediation", "maxActionsPerHour", value=1), id="remediation"),
        pytest.param(S3, setter("source", "credentialsSecretRef", value={"name": "other"}), id="credentials"),
        pytest.param(
            HF, setter("source", "tokenSecretRef", value={"name": "hf-token", "key": "t"}), id="token"
        ),
        pytest.param(
            HF,
            setter("source", "updatePolicy", value={"type": "Poll", "interval": "6h"}),
            id="source.updatePolicy",
        ),
        pytest.param(
            HF,
            setter("conversion", "resources", value={"requests": {"cpu": "8"}, "limits": {"memory": "32Gi"}}),
            id="conversion.resources",
        ),
        pytest.param(HF, setter("conversion", "timeout", value="2h"), id="conversion.timeout"),
        pytest.param(HF, setter("conversion", "backoffLimit", value=5), id="conversion.backoffLimit"),
        pytest.param(HF, setter("revision", value="7d4c1f0a9b"), id="revision pin"),
    ],
)
def test_how_it_is_served_or_fetched_leaves_the_revision_alone(
    base: dict[str, Any], mutate: Mutation
) -> None:
    assert revision_of(spec(base, mutate)) == revision_of(spec(base))


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(setter("conversion", "opset", value=18), id="default opset spelled out"),
        pytest.param(setter("validation", "failurePolicy", value="Block"), id="default failurePolicy"),
        pytest.param(setter("source", "allowPickle", value=False), id="default allowPickle"),
        pytest.param(
            setter("conversion", "dynamicAxes", value={"attention_mask": [0, 1], "input_ids": [0, 1]}),
            id="map keys in another order",
        ),
    ],
)
def test_equivalent_specs_share_a_revision(mutate: Mutation) -> None:
    assert revision_of(spec(HF, mutate)) == revision_of(spec(HF))


def test_source_digest_joins_the_hash_when_given() -> None:
    base = spec(HF)
    assert revision_of(base, source_digest=None) == revision_of(base) == revision_of(base, source_digest="")
    polled = revision_of(base, source_digest="cd" * 32)
    assert polled != revision_of(base)
    assert polled == revision_of(base, source_digest="cd" * 32)
    assert revision_of(base, source_digest="ef" * 32) != polled


def test_artifact_inputs_carry_no_secret_names_or_serving_settings() -> None:
    inputs = artifact_inputs(spec(S3))
    assert set(inputs) == {"source", "conversion", "optimization", "validation"}
    assert "credentialsSecretRef" not in inputs["source"]
    assert "updatePolicy" not in inputs["source"]
    assert not {"resources", "timeout", "backoffLimit"} & set(inputs["conversion"])
    assert "s3-models" not in repr(inputs)
    assert inputs["source"]["uri"] == "s3://models/vision/resnet50/weights.pt"
    assert inputs["optimization"]["precision"] == ["fp16", "fp32"]
