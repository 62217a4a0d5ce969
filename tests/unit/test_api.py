"""The PretrainedModel pydantic models: defaults, composition, local mirrors of the CEL rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from ptm_operator import GROUP, KIND, VERSION
from ptm_operator.api import (
    API_VERSION,
    PROMOTE_ANNOTATION,
    AutoscalingMetric,
    AutoscalingSpec,
    ConversionSpec,
    KedaOptions,
    PretrainedModel,
    PretrainedModelSpec,
    PretrainedModelStatus,
    ResourceRequirements,
    RevisionState,
    RolloutSpec,
    ServingSpec,
    SourceSpec,
    duration_seconds,
    rules_of,
)
from ptm_runtime.options import (
    ConversionOptions,
    ExecutionProvider,
    Precision,
    RuntimeOptions,
    SourceFormat,
    SourceOptions,
)
from tests.integration.test_admission import BASE, CASES, case_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

MINIMAL = {"source": {"uri": "hf://org/model", "format": "huggingface"}}


def _get(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("source.allowPickle", False),
        ("source.updatePolicy.type", "Manual"),
        ("source.updatePolicy.interval", "1h"),
        ("conversion.opset", 18),
        ("conversion.targets", ["onnx"]),
        ("conversion.timeout", "30m"),
        ("conversion.resources.requests.memory", "4Gi"),
        ("optimization.precision", ["fp32"]),
        ("optimization.quantization.mode", "dynamic"),
        ("validation.failurePolicy", "Block"),
        ("validation.maxAccuracyDrop", 0.01),
        ("serving.replicas", 1),
        ("serving.port", 8080),
        ("serving.grpcPort", 8081),
        ("serving.protocols", ["rest", "grpc"]),
        ("serving.executionProviders", [p.value for p in ExecutionProvider]),
        ("serving.batching.maxBatchSize", 8),
        ("serving.resources.limits", {"memory": "2Gi"}),
        ("serving.networkPolicy.enabled", False),
        ("rollout.strategy", "Canary"),
        ("rollout.steps.0.setWeight", 10),
        ("rollout.steps.1.pause.duration", "30s"),
        ("rollout.steps.2.analysis.duration", "1m"),
        ("rollout.trafficRouting.type", "replicaRatio"),
        ("rollout.analysis.interval", "30s"),
        ("rollout.analysis.maxErrorRate", 0.01),
        ("rollout.revisionHistoryLimit", 5),
        ("remediation.rollbackOnCrashLoop.enabled", True),
        ("remediation.memoryBumpOnOOM.ceiling", "16Gi"),
        ("remediation.restartStuckPods.notReadyFor", "10m"),
    ],
)
def test_minimal_spec_gets_documented_defaults(path: str, value: Any) -> None:
    wire = PretrainedModelSpec.model_validate(MINIMAL).wire()
    assert _get(wire, path) == value


def test_minimal_spec_leaves_optional_parts_unset() -> None:
    spec = PretrainedModelSpec.model_validate(MINIMAL)
    assert spec.revision is None
    assert spec.serving.autoscaling is None
    assert spec.source.credentials_secret_ref is None
    assert "revision" not in spec.wire()


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_parse(example: Path) -> None:
    text = example.read_text()
    assert text.startswith("# "), "each example starts with a comment saying what it shows"
    body = yaml.safe_load(text)
    assert "namespace" not in body["metadata"], "examples are applied into a namespace of the user's choice"
    model = PretrainedModel.from_body(body)
    assert model.api_version == API_VERSION == f"{GROUP}/{VERSION}"
    assert model.kind == KIND


def test_required_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "minimal.yaml",
        "vision-resnet.yaml",
        "nlp-minilm.yaml",
        "speech.yaml",
        "recommendation.yaml",
        "canary-update.yaml",
        "rollback.yaml",
    } <= names


def _leaf(field: str) -> str:
    return field.rsplit(".", 1)[-1].split("[", 1)[0]


@pytest.mark.parametrize("case", [c for c in CASES if c.get("local", True)], ids=lambda c: c["id"])
def test_malformed_spec_is_rejected_locally(case: dict[str, Any]) -> None:
    """The models reject what the API server rejects, naming the same field."""
    spec = case_spec(BASE, case)
    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "bad"}}
    if spec is not None:
        body["spec"] = spec
    with pytest.raises(ValidationError) as raised:
        PretrainedModel.from_body(body)
    text = str(raised.value)
    assert _leaf(case["field"]) in text, text
    if "message" in case and not case["message"].startswith(("Required value", "unknown field")):
        assert case["message"] in text


def test_base_spec_of_the_case_table_is_valid() -> None:
    PretrainedModelSpec.model_validate(BASE)


def test_wrong_kind_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"expected ptm\.dev/v1alpha1 PretrainedModel"):
        PretrainedModel.from_body(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": MINIMAL}
        )


@pytest.mark.parametrize(
    ("steps", "ok"),
    [
        ([], True),
        ([{"setWeight": 100}], True),
        ([{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}], True),
        ([{"pause": {"duration": "1m"}}, {"analysis": {"duration": "30s"}}], True),
        ([{"setWeight": 50}, {"setWeight": 10}], False),
        ([{"setWeight": 10}, {"setWeight": 10}], False),
        ([{"setWeight": 10}, {"pause": {}}, {"setWeight": 5}], False),
    ],
)
def test_rollout_weights_must_increase(steps: list[dict[str, Any]], ok: bool) -> None:
    if ok:
        RolloutSpec.model_validate({"steps": steps})
    else:
        with pytest.raises(ValidationError, match="setWeight must increase"):
            RolloutSpec.model_validate({"steps": steps})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("500ms", 0.5), ("1.5h", 5400.0), ("2m30s", 150.0)],
)
def test_duration_seconds(text: str, seconds: float) -> None:
    assert duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 minutes", "-1m", "1d", "m5"])
def test_duration_seconds_rejects_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        duration_seconds(text)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (1, True),
        (0, True),
        ("500m", True),
        ("2Gi", True),
        ("1.5", True),
        ("1e3", True),
        (-1, False),
        ("-1", False),
        ("lots", False),
        ("2 Gi", False),
        (True, False),
    ],
)
def test_quantities(value: Any, ok: bool) -> None:
    if ok:
        ResourceRequirements.model_validate({"requests": {"cpu": value}})
    else:
        with pytest.raises(ValidationError):
            ResourceRequirements.model_validate({"requests": {"cpu": value}})


@pytest.mark.parametrize(
    ("resources", "gpus"),
    [
        ({}, 0),
        ({"limits": {"nvidia.com/gpu": 2}}, 2),
        ({"limits": {"nvidia.com/gpu": "1"}}, 1),
        ({"requests": {"nvidia.com/gpu": 1}}, 1),
        ({"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 4}}, 4),
    ],
)
def test_gpu_count(resources: dict[str, Any], gpus: int) -> None:
    assert ResourceRequirements.model_validate(resources).gpus() == gpus


@pytest.mark.parametrize("amount", ["0.5", "1500m", "1Gi"])
def test_gpus_must_be_whole(amount: str) -> None:
    with pytest.raises(ValidationError, match=r"nvidia\.com/gpu must be a whole"):
        ResourceRequirements.model_validate({"limits": {"nvidia.com/gpu": amount}})


@pytest.mark.parametrize(
    ("metric", "target", "effective"),
    [
        (AutoscalingMetric.CPU, None, 70.0),
        (AutoscalingMetric.INFLIGHT_REQUESTS, None, 8.0),
        (AutoscalingMetric.QUEUE_DEPTH, None, 16.0),
        (AutoscalingMetric.CPU, 50.0, 50.0),
    ],
)
def test_autoscaling_target(metric: AutoscalingMetric, target: float | None, effective: float) -> None:
    assert AutoscalingSpec(metric=metric, target=target).effective_target() == effective


def test_scale_to_zero_with_keda_is_allowed() -> None:
    scaling = AutoscalingSpec(min_replicas=0, max_replicas=3, keda=KedaOptions())
    assert scaling.min_replicas == 0


def test_composed_specs_narrow_to_the_runtime_options() -> None:
    serving = ServingSpec.model_validate(
        {"replicas": 3, "batching": {"maxBatchSize": 32}, "intraOpThreads": 2}
    )
    runtime = serving.runtime_options()
    assert type(runtime) is RuntimeOptions
    assert runtime.batching.max_batch_size == 32
    assert runtime.intra_op_threads == 2
    assert "replicas" not in runtime.wire()

    source = SourceSpec.model_validate(
        {
            "uri": "s3://b/k.pt",
            "format": "pytorch-state-dict",
            "architecture": "m:f",
            "credentialsSecretRef": {"name": "s"},
        }
    ).source_options()
    assert type(source) is SourceOptions
    assert source.format is SourceFormat.PYTORCH_STATE_DICT
    assert "credentialsSecretRef" not in source.wire()

    conversion = ConversionSpec.model_validate({"opset": 17, "timeout": "1h"}).conversion_options()
    assert type(conversion) is ConversionOptions
    assert conversion.opset == 17


def test_no_field_is_declared_twice() -> None:
    """Composed specs add operator fields; they never redeclare a runtime option."""
    pairs: list[tuple[type[BaseModel], type[BaseModel]]] = [
        (ServingSpec, RuntimeOptions),
        (SourceSpec, SourceOptions),
        (ConversionSpec, ConversionOptions),
    ]
    for composed, base in pairs:
        added = set(composed.__annotations__)
        assert not added & set(base.model_fields), (composed.__name__, added & set(base.model_fields))


def test_subclasses_keep_the_rules_of_the_options_they_extend() -> None:
    pairs: list[tuple[type[BaseModel], type[BaseModel]]] = [
        (ServingSpec, RuntimeOptions),
        (SourceSpec, SourceOptions),
    ]
    for composed, base in pairs:
        inherited = rules_of(base)
        assert all(rule in rules_of(composed) for rule in inherited)
    assert any("architecture" in r[0] for r in rules_of(SourceSpec))


def test_status_round_trip_ignores_unknown_fields() -> None:
    wire = {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Serving",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            }
        ],
        "revisions": [
            {
                "revision": "abc",
                "state": "Stable",
                "precision": "fp16",
                "metrics": {"cosineSimilarity": 0.999},
            }
        ],
        "stableRevision": "abc",
        "somethingNewer": {"x": 1},
    }
    status = PretrainedModelStatus.model_validate(wire)
    assert status.revision("abc") is not None
    assert status.revision("abc").state is RevisionState.STABLE  # type: ignore[union-attr]
    assert status.revisions[0].precision is Precision.FP16
    assert status.revision("zzz") is None
    again = status.wire()
    assert again["conditions"][0]["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    assert "somethingNewer" not in again


def test_promote_annotation() -> None:
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "m"},
        "spec": MINIMAL,
    }
    assert not PretrainedModel.from_body(body).promote_requested
    body["metadata"]["annotations"] = {PROMOTE_ANNOTATION: "true"}
    assert PretrainedModel.from_body(body).promote_requested
