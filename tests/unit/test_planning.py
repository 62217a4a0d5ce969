"""plan(): from a resource and what the operator observed to manifests, status, events and requeue.

Scenarios run plan() round after round, feeding each round's status back in wire form, as the
handlers do through the API server.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ptm_operator.api import (
    PROMOTE_ANNOTATION,
    ArtifactStatus,
    Condition,
    ConditionStatus,
    PretrainedModel,
    PretrainedModelStatus,
    RevisionState,
    RevisionStatus,
)
from ptm_operator.builders import jobs, serving
from ptm_operator.builders.store import store_from_settings
from ptm_operator.conditions import get_condition
from ptm_operator.observed import DeploymentObservation, JobObservation, Observed, PodObservation
from ptm_operator.planning import (
    Deletion,
    Event,
    Plan,
    candidates_summary,
    plan,
    pod_problems,
    termination_record,
)
from ptm_operator.revision import revision_of
from ptm_operator.rollout import desired_replicas
from ptm_operator.settings import Settings
from ptm_runtime.options import Precision, TensorSpec
from ptm_runtime.report import (
    EXIT_INTERNAL,
    EXIT_INVALID,
    EXIT_TRANSIENT,
    EXIT_VALIDATION_FAILED,
    Candidate,
    Failure,
    Metrics,
    Report,
)
from tests.unit.specs import resnet_s3_source

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SETTINGS = Settings(requeue_seconds=5.0)
STORE = store_from_settings(Settings(store_uri="file:///var/lib/ptm"))
NS = "vision"
OLD = "01d0000000"  # a revision built from an earlier spec
SIZE = 97_800_000

BODY: dict[str, Any] = {
    "apiVersion": "ptm.dev/v1alpha1",
    "kind": "PretrainedModel",
    "metadata": {"name": "resnet50", "namespace": NS, "uid": "0b1e-c7", "generation": 1},
    "spec": {
        "source": resnet_s3_source(),
        "optimization": {"precision": ["fp16", "fp32"]},
        "validation": {"samples": 64, "minTop1Agreement": 0.99},
        "serving": {
            "replicas": 2,
            "resources": {
                "requests": {"cpu": "2", "memory": "4Gi"},
                "limits": {"memory": "8Gi", "nvidia.com/gpu": 1},
            },
            "gpuSelector": {"products": ["NVIDIA-L4"]},
        },
    },
}


def make(
    status: PretrainedModelStatus | dict[str, Any] | None = None,
    generation: int = 1,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> PretrainedModel:
    """The vision model; spec sections given replace (serving and rollout merge one level)."""
    body = copy.deepcopy(BODY)
    body["metadata"]["generation"] = generation
    body["metadata"]["annotations"] = annotations or {}
    for key, value in spec.items():
        if key in ("serving", "rollout") and isinstance(value, dict):
            body["spec"][key] = {**body["spec"].get(key, {}), **value}
        else:
            body["spec"][key] = value
    if status is not None:
        body["status"] = status.wire() if isinstance(status, PretrainedModelStatus) else status
    return PretrainedModel.from_body(body)


REV = revision_of(make().spec)


def report(revision: str = REV, passed: bool = True, size: int = SIZE) -> Report:
    return Report(
        artifact_uri=f"file:///var/lib/ptm/{NS}/resnet50/{revision}/model.onnx",
        sha256="ab" * 32,
        size_bytes=size,
        opset=18,
        precision=Precision.FP16 if passed else Precision.FP32,
        inputs=[TensorSpec(name="input", shape=[-1, 3, 224, 224])],
        outputs=[TensorSpec(name="logits", shape=[-1, 1000])],
        exporter="dynamo",
        optimizations=["ort-extended", "fp16"],
        validation_passed=passed,
        metrics=Metrics(cosine_similarity=0.9995, top1_agreement=1.0),
        source_sha256="cd" * 32,
        candidates=[
            Candidate(
                precision=Precision.FP16,
                passed=passed,
                reason="" if passed else "top-1 agreement 0.82 < 0.99",
            ),
            Candidate(
                precision=Precision.FP32, passed=passed, reason="" if passed else "cosine 0.97 < 0.999"
            ),
        ],
        revision=revision,
    )


def failure(reason: str, exit_code: int, permanent: bool, message: str = "", **extra: Any) -> str:
    return Failure(
        revision=REV,
        reason=reason,
        message=message or f"{reason}: details",
        exit_code=exit_code,
        permanent=permanent,
        **extra,
    ).compact()


GATE_FAILURE = failure(
    "ValidationFailed",
    EXIT_VALIDATION_FAILED,
    True,
    "no candidate passed the validation gate",
    candidates=[
        Candidate(precision=Precision.FP16, passed=False, reason="top-1 agreement 0.82 < 0.99"),
        Candidate(precision=Precision.FP32, passed=False, reason="cosine 0.97 < 0.999"),
    ],
)


def job(revision: str = REV, **kw: Any) -> JobObservation:
    return JobObservation(name=f"resnet50-convert-{revision}", revision=revision, **kw)


def succeeded(revision: str = REV, passed: bool = True) -> dict[str, JobObservation]:
    return {
        revision: job(
            revision, succeeded=True, exit_code=0, termination_message=report(revision, passed).compact()
        )
    }


def dep(revision: str, replicas: int = 2, ready: int | None = None) -> DeploymentObservation:
    ready = replicas if ready is None else ready
    return DeploymentObservation(
        name=f"resnet50-{revision}",
        revision=revision,
        replicas=replicas,
        ready_replicas=ready,
        available_replicas=ready,
        updated_replicas=replicas,
    )


def run(m: PretrainedModel, observed: Observed | None = None, now: datetime = T0) -> Plan:
    return plan(m, observed or Observed(), now, SETTINGS, STORE)


def then(m: PretrainedModel, p: Plan, **spec: Any) -> PretrainedModel:
    """The model as the next round reads it: the plan's status written back (and the spec, maybe changed)."""
    body = m.model_dump(by_alias=True, mode="json", exclude={"status"})
    for key, value in spec.items():
        body["spec"][key] = value
    body["status"] = p.status_patch()
    return PretrainedModel.from_body(body)


def cond(p: Plan | PretrainedModelStatus, type_: str) -> Condition:
    st = p.status if isinstance(p, Plan) else p
    found = get_condition(st.conditions, type_)
    assert found is not None, f"no {type_} condition in {[c.type for c in st.conditions]}"
    return found


def says(p: Plan, type_: str) -> tuple[str, str]:
    """(status, reason) of a condition."""
    c = cond(p, type_)
    return c.status.value, c.reason


def kinds(p: Plan) -> list[tuple[str, str]]:
    return [(m["kind"], m["metadata"]["name"]) for m in p.apply]


#: Planned in every reconcile from the first: they select the model's pods, whichever revision.
MODEL_WIDE = [("Service", "resnet50"), ("PodDisruptionBudget", "resnet50")]


def revision_kinds(p: Plan) -> list[tuple[str, str]]:
    """kinds(p) without the model-wide Service and PDB."""
    return [k for k in kinds(p) if k not in MODEL_WIDE]


def rec(p: Plan, revision: str = REV) -> RevisionStatus:
    found = p.status.revision(revision)
    assert found is not None
    return found


def serving_model(**spec: Any) -> PretrainedModel:
    """A model whose revision REV converted and serves 2/2 pods (three rounds of plan())."""
    m = make(**spec)
    m = then(m, run(m))
    m = then(m, run(m, Observed(jobs=succeeded()), T0 + timedelta(minutes=5)))
    m = then(m, run(m, Observed(jobs=succeeded(), deployments={REV: dep(REV)}), T0 + timedelta(minutes=6)))
    assert m.status.stable_revision == REV
    return m


def old_serving(**spec: Any) -> PretrainedModel:
    """OLD serves (converted from an earlier spec); the spec now builds REV."""
    st = PretrainedModelStatus(
        stable_revision=OLD,
        revisions=[
            RevisionStatus(
                revision=OLD,
                state=RevisionState.STABLE,
                artifact=ArtifactStatus(uri="file:///old/model.onnx", sha256="ef" * 32, size_bytes=SIZE),
                created=T0 - timedelta(days=1),
                state_since=T0 - timedelta(days=1),
            )
        ],
    )
    base = make(status=st, **spec)
    first = run(base, Observed(deployments={OLD: dep(OLD)}), T0 - timedelta(minutes=1))
    assert says(first, "Available") == ("True", "Serving")
    return then(base, first)


# --- a new resource, step by step -------------------------------------------------------------------


def test_a_new_resource_gets_its_conversion_job() -> None:
    p = run(make())
    assert kinds(p) == [("Job", jobs.job_name(make(), REV)), *MODEL_WIDE]
    assert p.apply[0] == jobs.conversion_job(make(), REV, SETTINGS, STORE)
    assert p.delete == []
    assert says(p, "Converted") == ("False", "Converting")
    assert says(p, "Progressing") == ("True", "Converting")
    assert says(p, "Available") == ("False", "NoArtifact")
    assert says(p, "Ready") == ("False", "Converting")
    assert rec(p).state is RevisionState.CONVERTING
    assert rec(p).created == T0
    assert p.status.stable_revision is None
    assert p.status.observed_generation == 1
    assert p.requeue_after == SETTINGS.requeue_seconds
    assert p.waiting_for == f"conversion of revision {REV}"


def test_a_running_job_is_waited_for_not_recreated() -> None:
    m = then(make(), run(make()))
    p = run(m, Observed(jobs={REV: job(active=1)}), T0 + timedelta(seconds=30))
    assert revision_kinds(p) == []
    assert says(p, "Converted") == ("False", "Converting")
    assert f"conversion Job resnet50-convert-{REV} is running" in cond(p, "Converted").message
    assert rec(p).state is RevisionState.CONVERTING
    assert p.requeue_after == SETTINGS.requeue_seconds
    assert p.waiting_for == f"conversion Job resnet50-convert-{REV}"
    assert p.events == []  # nothing flipped


def test_a_succeeded_job_with_a_report_is_validated_and_served() -> None:
    m = then(make(), run(make()))
    now = T0 + timedelta(minutes=5)
    p = run(m, Observed(jobs=succeeded()), now)
    assert says(p, "Converted") == ("True", "Converted")
    assert cond(p, "Converted").message == f"revision {REV}: dynamo opset 18"
    assert says(p, "Validated") == ("True", "Validated")
    assert cond(p, "Validated").message == f"revision {REV}: fp16 passed (fp16: passed; fp32: passed)"
    r = rec(p)
    assert r.state is RevisionState.STABLE
    assert r.state_since == now
    assert r.artifact == ArtifactStatus(uri=report().artifact_uri, sha256="ab" * 32, size_bytes=SIZE)
    assert r.precision is Precision.FP16
    assert r.source_digest == "cd" * 32
    assert r.metrics is not None and r.metrics.top1_agreement == 1.0
    assert p.status.stable_revision == REV
    m_ = make()
    assert kinds(p) == [
        ("Deployment", serving.deployment_name(m_, REV)),
        ("Service", "resnet50"),
        ("PodDisruptionBudget", "resnet50"),
    ]
    deployment = p.apply[0]
    assert deployment["spec"]["replicas"] == 2
    assert deployment == serving.serving_deployment(
        m_, REV, f"/var/lib/ptm/store/{NS}/resnet50/{REV}", 2, SETTINGS, STORE, size_bytes=SIZE
    )
    assert says(p, "Available") == ("False", "Deploying")
    assert says(p, "Ready") == ("False", "Deploying")
    assert p.status.endpoint is not None
    assert p.status.endpoint.rest == f"http://resnet50.{NS}.svc:8080"
    assert p.status.endpoint.grpc == f"resnet50.{NS}.svc:8081"
    assert p.requeue_after == SETTINGS.requeue_seconds


def test_serving_pods_ready_make_the_model_ready_and_settled() -> None:
    m = serving_model()
    assert says_status(m.status, "Available") == ("True", "Serving")
    assert says_status(m.status, "Ready") == ("True", "Serving")
    assert says_status(m.status, "Progressing") == ("False", "Settled")
    assert says_status(m.status, "Degraded") == ("False", "Healthy")
    assert cond(m.status, "Ready").message == f"revision {REV}: 2/2 pods ready"
    assert (m.status.replicas, m.status.ready_replicas) == (2, 2)
    p = run(m, Observed(jobs=succeeded(), deployments={REV: dep(REV)}), T0 + timedelta(minutes=7))
    assert p.requeue_after is None
    assert p.events == []
    assert p.delete == []


def says_status(st: PretrainedModelStatus, type_: str) -> tuple[str, str]:
    c = cond(st, type_)
    return c.status.value, c.reason


def test_validation_warned_is_served_but_said() -> None:
    m = then(make(), run(make()))
    p = run(m, Observed(jobs=succeeded(passed=False)), T0 + timedelta(minutes=5))
    assert says(p, "Validated") == ("False", "ValidationWarned")
    assert "top-1 agreement 0.82 < 0.99" in cond(p, "Validated").message
    assert rec(p).state is RevisionState.STABLE
    assert p.status.stable_revision == REV
    assert "Deployment" in [k for k, _ in kinds(p)]


@pytest.mark.parametrize(
    "message",
    [
        None,
        "",
        "Error: container exited (FallbackToLogsOnError tail)",
        '{"artifactUri": "file:///x"}',  # a Report missing most fields
        GATE_FAILURE,  # a Failure from a Job that says it succeeded
    ],
)
def test_a_succeeded_job_without_a_readable_report(message: str | None) -> None:
    m = then(make(), run(make()))
    observed = Observed(jobs={REV: job(succeeded=True, exit_code=0, termination_message=message)})
    p = run(m, observed, T0 + timedelta(minutes=5))
    assert says(p, "Converted") == ("False", "ReportMissing")
    assert rec(p).state is RevisionState.FAILED
    assert rec(p).message == "the conversion Job succeeded but its pod left no readable report"
    assert says(p, "Available") == ("False", "NoArtifact")
    assert says(p, "Ready") == ("False", "ReportMissing")
    assert revision_kinds(p) == []
    assert p.status.stable_revision is None


FAILED_JOBS = [
    pytest.param(
        job(
            failed=True,
            exit_code=EXIT_VALIDATION_FAILED,
            failure_reason="PodFailurePolicy",
            termination_message=GATE_FAILURE,
        ),
        ("Converted", "True", "Converted"),
        ("Validated", "False", "ValidationFailed"),
        "validation failed: no candidate passed the validation gate (fp16: top-1 agreement 0.82 < 0.99; fp32: cosine 0.97 < 0.999)",
        id="exit 3 with a Failure",
    ),
    pytest.param(
        job(
            failed=True,
            exit_code=EXIT_VALIDATION_FAILED,
            failure_reason="PodFailurePolicy",
            termination_message="gate said no",
        ),
        ("Converted", "True", "Converted"),
        ("Validated", "False", "ValidationFailed"),
        "validation failed: gate said no",
        id="exit 3 with plain text",
    ),
    pytest.param(
        job(
            failed=True,
            exit_code=EXIT_INVALID,
            failure_reason="PodFailurePolicy",
            termination_message=failure(
                "InvalidSource", EXIT_INVALID, True, "sha256 mismatch: expected ab.., got cd.."
            ),
        ),
        ("Converted", "False", "InvalidSource"),
        None,
        "InvalidSource: sha256 mismatch: expected ab.., got cd..",
        id="exit 2 with a Failure",
    ),
    pytest.param(
        job(
            failed=True,
            exit_code=EXIT_INVALID,
            termination_message=failure("ExportFailed", EXIT_INVALID, True, "torch.export: unsupported op"),
        ),
        ("Converted", "False", "ExportFailed"),
        None,
        "ExportFailed: torch.export: unsupported op",
        id="exit 2, ExportFailed",
    ),
    pytest.param(
        job(
            failed=True,
            exit_code=EXIT_INVALID,
            failure_reason="PodFailurePolicy",
            failure_message="container convert exited 2",
        ),
        ("Converted", "False", "InvalidSource"),
        None,
        "InvalidSource: container convert exited 2",
        id="exit 2 without a message",
    ),
    pytest.param(
        job(
            failed=True,
            exit_code=EXIT_INTERNAL,
            failure_reason="BackoffLimitExceeded",
            termination_message=failure("InternalError", EXIT_INTERNAL, False, "KeyError: 'logits'"),
        ),
        ("Converted", "False", "ConversionFailed"),
        None,
        "conversion failed (BackoffLimitExceeded): KeyError: 'logits'",
        id="exit 1, retried out",
    ),
    pytest.param(
        job(
            failed=True,
            exit_code=EXIT_TRANSIENT,
            failure_reason="BackoffLimitExceeded",
            termination_message=failure("Unavailable", EXIT_TRANSIENT, False, "s3: connection refused"),
        ),
        ("Converted", "False", "ConversionFailed"),
        None,
        "conversion failed (BackoffLimitExceeded): s3: connection refused",
        id="exit 75, retried out",
    ),
    pytest.param(
        job(
            failed=True,
            failure_reason="DeadlineExceeded",
            failure_message="Job was active longer than specified deadline",
        ),
        ("Converted", "False", "ConversionFailed"),
        None,
        "conversion failed (DeadlineExceeded): Job was active longer than specified deadline",
        id="deadline, no exit code",
    ),
]


@pytest.mark.parametrize(("observed_job", "converted", "validated", "message"), FAILED_JOBS)
def test_a_failed_job_fails_the_revision_with_the_right_reason(
    observed_job: JobObservation,
    converted: tuple[str, str, str],
    validated: tuple[str, str, str] | None,
    message: str,
) -> None:
    m = then(make(), run(make()))
    p = run(m, Observed(jobs={REV: observed_job}), T0 + timedelta(minutes=5))
    assert says(p, converted[0]) == converted[1:]
    if validated is not None:
        assert says(p, validated[0]) == validated[1:]
    else:
        assert get_condition(p.status.conditions, "Validated") is None
    assert rec(p).state is RevisionState.FAILED
    assert rec(p).message == message
    assert message in cond(p, validated[0] if validated else "Converted").message
    assert says(p, "Available") == ("False", "NoArtifact")
    assert cond(p, "Available").message == f"revision {REV} failed and no earlier revision serves"
    assert cond(p, "Ready").status is ConditionStatus.FALSE
    assert p.status.stable_revision is None
    assert revision_kinds(p) == []
    assert p.requeue_after is None  # a failed revision waits for a spec change


@pytest.mark.parametrize(("observed_job", "converted", "validated", "message"), FAILED_JOBS)
def test_a_failed_update_keeps_the_previous_revision_serving(
    observed_job: JobObservation,
    converted: tuple[str, str, str],
    validated: tuple[str, str, str] | None,
    message: str,
) -> None:
    m = old_serving()
    observed = Observed(jobs={REV: observed_job}, deployments={OLD: dep(OLD)})
    p = run(m, observed, T0 + timedelta(minutes=5))
    assert rec(p).state is RevisionState.FAILED
    assert p.status.stable_revision == OLD
    assert rec(p, OLD).state is RevisionState.STABLE
    assert says(p, "Degraded") == ("True", "UpdateFailed")
    assert (
        cond(p, "Degraded").message
        == f"revision {REV} failed ({message[:300]}); revision {OLD} keeps serving"
    )
    assert says(p, "Available") == ("True", "Serving")
    ready = cond(p, "Ready")
    assert ready.status is ConditionStatus.TRUE  # degraded, not un-Ready
    assert "Degraded: " in ready.message
    assert ("Deployment", f"resnet50-{OLD}") in kinds(p)
    assert p.delete == []
    assert Event("Warning", "UpdateFailed", f"Degraded=True: {cond(p, 'Degraded').message}") in p.events


def test_a_failed_update_stays_failed_on_later_rounds() -> None:
    m = old_serving()
    failed_job = {REV: job(failed=True, exit_code=EXIT_VALIDATION_FAILED, termination_message=GATE_FAILURE)}
    observed = Observed(jobs=failed_job, deployments={OLD: dep(OLD)})
    first = run(m, observed, T0 + timedelta(minutes=5))
    second = run(then(m, first), observed, T0 + timedelta(minutes=6))
    assert second.apply == first.apply
    assert says(second, "Validated") == ("False", "ValidationFailed")
    assert says(second, "Degraded") == ("True", "UpdateFailed")
    assert cond(second, "Degraded").last_transition_time == T0 + timedelta(minutes=5)
    assert second.events == []
    assert not [k for k, _ in kinds(second) if k == "Job"]  # never retried


# --- pinned revisions --------------------------------------------------------------------------------


def test_a_pinned_revision_not_in_history_is_reported() -> None:
    m = old_serving(revision="deadbeef00")
    p = run(m, Observed(deployments={OLD: dep(OLD)}), T0)
    assert says(p, "Degraded") == ("True", "RevisionNotFound")
    assert cond(p, "Degraded").message == (
        f"spec.revision deadbeef00 is not a converted revision in status.revisions; known: {OLD}"
    )
    assert p.status.stable_revision == OLD  # the serving revision keeps serving
    assert says(p, "Available") == ("True", "Serving")
    assert "Job" not in [k for k, _ in kinds(p)]
    assert p.status.revision("deadbeef00") is None


def test_a_pinned_revision_on_a_new_resource() -> None:
    p = run(make(revision="deadbeef00"))
    assert says(p, "Degraded") == ("True", "RevisionNotFound")
    assert cond(p, "Degraded").message.endswith("known: none")
    assert says(p, "Available") == ("False", "NoArtifact")
    assert revision_kinds(p) == []
    assert p.status.revisions == []


def test_pinning_a_superseded_revision_rolls_back_to_it() -> None:
    m = old_serving()
    st = m.status.model_copy(deep=True)
    st.revisions.append(
        RevisionStatus(
            revision="0a0a0a0a0a",
            state=RevisionState.SUPERSEDED,
            artifact=ArtifactStatus(uri="file:///a/model.onnx", sha256="aa" * 32, size_bytes=1),
        )
    )
    pinned = make(status=st, revision="0a0a0a0a0a", rollout={"strategy": "Recreate"})
    p = run(pinned, Observed(deployments={OLD: dep(OLD)}), T0)
    assert p.status.stable_revision == "0a0a0a0a0a"
    assert rec(p, OLD).state is RevisionState.SUPERSEDED
    assert "Job" not in [k for k, _ in kinds(p)]
    degraded = get_condition(p.status.conditions, "Degraded")
    assert degraded is None or degraded.reason != "RevisionNotFound", degraded.message


# --- pods in trouble ---------------------------------------------------------------------------------


GPU_MESSAGE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"


@pytest.mark.parametrize(
    ("pods", "reason", "message"),
    [
        (
            [
                PodObservation(
                    name="resnet50-b",
                    revision=REV,
                    phase="Running",
                    waiting_reason="CrashLoopBackOff",
                    restarts=4,
                    last_termination_reason="OOMKilled",
                ),
                PodObservation(
                    name="resnet50-a",
                    revision=REV,
                    phase="Running",
                    waiting_reason="CrashLoopBackOff",
                    restarts=4,
                    last_termination_reason="Error",
                ),
            ],
            "CrashLoopBackOff",
            "2 serving pod(s) in CrashLoopBackOff (last terminated: OOMKilled in 1): resnet50-a, resnet50-b",
        ),
        (
            [PodObservation(name="resnet50-a", revision=REV, waiting_reason="ImagePullBackOff")],
            "ImagePullBackOff",
            "1 serving pod(s) in ImagePullBackOff: resnet50-a",
        ),
        (
            [
                PodObservation(name="resnet50-a", revision=REV, unschedulable=GPU_MESSAGE),
                PodObservation(name="resnet50-b", revision=REV, unschedulable=GPU_MESSAGE),
            ],
            "Unschedulable",
            f"2 pod(s) wait for resources: {GPU_MESSAGE}",
        ),
    ],
)
def test_pod_problems_make_the_model_unavailable_with_the_reason(
    pods: list[PodObservation], reason: str, message: str
) -> None:
    m = serving_model()
    observed = Observed(jobs=succeeded(), deployments={REV: dep(REV, ready=0)}, pods=pods)
    now = T0 + timedelta(minutes=10)
    p = run(m, observed, now)
    assert says(p, "Available") == ("False", reason)
    assert cond(p, "Available").message == message
    assert cond(p, "Available").last_transition_time == now
    assert says(p, "Degraded") == ("True", reason)
    assert says(p, "Ready") == ("False", reason)
    assert cond(p, "Ready").message == f"Available: {message}"
    assert p.requeue_after == SETTINGS.requeue_seconds
    assert Event("Warning", reason, f"Available=False: {message}") in p.events
    assert Event("Warning", reason, f"Degraded=True: {message}") in p.events
    assert p.status.stable_revision == REV  # nothing is rolled back for a stable revision


def test_pod_problems_pick_the_most_common_bad_reason_and_ignore_other_revisions() -> None:
    pods = [
        PodObservation(name="c", revision="other00000", waiting_reason="CrashLoopBackOff"),
        PodObservation(name="x", revision=REV, waiting_reason="ErrImagePull"),
        PodObservation(name="y", revision=REV, waiting_reason="ImagePullBackOff"),
        PodObservation(name="z", revision=REV, waiting_reason="ImagePullBackOff"),
        PodObservation(name="w", revision=REV, waiting_reason="ContainerCreating"),
        PodObservation(name="u", revision=REV, unschedulable=GPU_MESSAGE),
    ]
    assert pod_problems(pods, REV) == ("ImagePullBackOff", "3 serving pod(s) in ImagePullBackOff: x, y, z")
    assert pod_problems(pods[4:], REV) == ("Unschedulable", f"1 pod(s) wait for resources: {GPU_MESSAGE}")
    assert pod_problems(pods[4:5], REV) is None
    assert pod_problems([], REV) is None


def test_recovery_clears_degraded_and_flips_available_back() -> None:
    m = serving_model()
    crash = [PodObservation(name="a", revision=REV, waiting_reason="CrashLoopBackOff", restarts=5)]
    bad = run(m, Observed(deployments={REV: dep(REV, ready=0)}, pods=crash), T0 + timedelta(minutes=10))
    good = run(then(m, bad), Observed(deployments={REV: dep(REV)}), T0 + timedelta(minutes=20))
    assert says(good, "Available") == ("True", "Serving")
    assert says(good, "Degraded") == ("False", "Healthy")
    assert says(good, "Ready") == ("True", "Serving")
    assert cond(good, "Available").last_transition_time == T0 + timedelta(minutes=20)
    assert {e.reason for e in good.events} == {"Serving"}
    assert all(e.type == "Normal" for e in good.events)


def test_starting_pods_are_waited_for() -> None:
    m = then(make(), run(make()))
    m = then(m, run(m, Observed(jobs=succeeded()), T0 + timedelta(minutes=5)))
    p = run(m, Observed(jobs=succeeded(), deployments={REV: dep(REV, ready=0)}), T0 + timedelta(minutes=6))
    assert says(p, "Available") == ("False", "Starting")
    assert cond(p, "Available").message == f"0/2 serving pods of revision {REV} ready"
    assert p.requeue_after == SETTINGS.requeue_seconds
    partly = run(
        m, Observed(jobs=succeeded(), deployments={REV: dep(REV, ready=1)}), T0 + timedelta(minutes=6)
    )
    assert says(partly, "Available") == ("True", "Serving")
    assert partly.waiting_for == f"1 more pods of revision {REV}"
    assert says(partly, "Progressing") == ("True", "Converting")  # still waiting: not settled yet


def test_ready_pods_count_before_the_deployment_says_so() -> None:
    m = then(make(), run(make()))
    m = then(m, run(m, Observed(jobs=succeeded()), T0 + timedelta(minutes=5)))
    pods = [
        PodObservation("resnet50-a", REV, phase="Running", ready=True),
        PodObservation("resnet50-b", REV, phase="Running"),
        PodObservation("resnet50-c", OLD, phase="Running", ready=True),
    ]
    observed = Observed(jobs=succeeded(), deployments={REV: dep(REV, ready=0)}, pods=pods)
    p = run(m, observed, T0 + timedelta(minutes=6))
    assert says(p, "Available") == ("True", "Serving")
    assert cond(p, "Available").message == f"revision {REV}: 1/2 pods ready"
    assert p.status.ready_replicas == 1


# --- conditions over time ----------------------------------------------------------------------------


def test_transition_times_move_only_when_a_status_flips() -> None:
    m0 = make()
    p0 = run(m0, now=T0)
    m1 = then(m0, p0)
    p1 = run(m1, Observed(jobs={REV: job(active=1)}), T0 + timedelta(minutes=1))
    assert cond(p1, "Converted").last_transition_time == T0  # False -> False, new message
    assert cond(p1, "Ready").last_transition_time == T0
    p2 = run(then(m1, p1), Observed(jobs=succeeded()), T0 + timedelta(minutes=2))
    assert cond(p2, "Converted").last_transition_time == T0 + timedelta(minutes=2)
    assert cond(p2, "Validated").last_transition_time == T0 + timedelta(minutes=2)
    assert cond(p2, "Available").last_transition_time == T0  # NoArtifact -> Deploying: still False
    assert cond(p2, "Ready").last_transition_time == T0
    assert all(c.observed_generation == 1 for c in p2.status.conditions)


def test_events_only_on_transitions() -> None:
    m0 = make()
    p0 = run(m0)
    # A new resource is on its way, nothing went wrong: no Event yet.
    assert p0.events == []
    assert not [e for e in p0.events if e.message.startswith("Progressing=")]
    p1 = run(then(m0, p0), Observed(jobs={REV: job(active=1)}), T0 + timedelta(minutes=1))
    assert p1.events == []
    m = serving_model()
    again = run(m, Observed(jobs=succeeded(), deployments={REV: dep(REV)}), T0 + timedelta(hours=1))
    assert again.events == []


def test_the_round_that_serves_announces_it() -> None:
    m = then(make(), run(make()))
    m = then(m, run(m, Observed(jobs=succeeded()), T0 + timedelta(minutes=5)))
    p = run(m, Observed(jobs=succeeded(), deployments={REV: dep(REV)}), T0 + timedelta(minutes=6))
    reasons = {(e.type, e.reason, e.message.split(":")[0]) for e in p.events}
    assert reasons == {("Normal", "Serving", "Available=True")}  # Ready only summarizes: no second Event


def test_observed_generation_follows_the_resource() -> None:
    m = serving_model()
    body = m.model_dump(by_alias=True, mode="json")
    body["metadata"]["generation"] = 7
    p = run(PretrainedModel.from_body(body), Observed(deployments={REV: dep(REV)}), T0 + timedelta(hours=1))
    assert p.status.observed_generation == 7
    for type_ in ("Ready", "Available", "Progressing", "Degraded"):  # the ones evaluated every round
        assert cond(p, type_).observed_generation == 7, type_


def test_plan_is_pure() -> None:
    m = serving_model()
    snapshot = m.model_dump()
    observed = Observed(jobs=succeeded(), deployments={REV: dep(REV)})
    a = run(m, observed, T0 + timedelta(hours=1))
    b = run(m, observed, T0 + timedelta(hours=1))
    assert m.model_dump() == snapshot
    assert a.apply == b.apply and a.status == b.status and a.events == b.events


# --- status patches and history ------------------------------------------------------------------


def test_status_patch_sends_null_for_cleared_fields() -> None:
    p = Plan(
        apply=[], delete=[], status=PretrainedModelStatus(stable_revision="b"), events=[], requeue_after=None
    )
    previous = {
        "stableRevision": "a",
        "canaryRevision": "b",
        "currentStep": 3,
        "canaryWeight": 50,
        "kopf": {"progress": {}},
    }
    patch = p.status_patch(previous)
    assert patch["stableRevision"] == "b"
    assert patch["canaryRevision"] is None
    assert patch["currentStep"] is None
    assert patch["canaryWeight"] is None
    assert "kopf" not in patch  # kopf's own bookkeeping is left alone
    assert patch["conditions"] == [] and patch["revisions"] == []  # lists are sent whole
    assert p.status_patch() == p.status.wire()
    assert None not in p.status_patch().values()


@pytest.mark.parametrize(
    ("states", "limit", "stable", "kept"),
    [
        (["Superseded", "Superseded", "Stable"], 5, "r2", ["r0", "r1", "r2"]),
        (["Superseded", "Failed", "Superseded", "RolledBack", "Stable"], 3, "r4", ["r3", "r4"]),
        (["Stable", "Superseded", "Failed", "Superseded", "Superseded"], 3, "r0", ["r0", "r4"]),
        (["Stable", "Superseded", "Failed", "Superseded", "Superseded"], 1, "r0", ["r0"]),
    ],
)
def test_revision_history_is_trimmed_but_serving_revisions_stay(
    states: list[str], limit: int, stable: str, kept: list[str]
) -> None:
    """History r0..rN (oldest first) plus the revision the spec builds now (REV, converting)."""
    revisions = [
        RevisionStatus(
            revision=f"r{i}",
            state=RevisionState(s),
            artifact=ArtifactStatus(uri=f"file:///r{i}", sha256="ab" * 32, size_bytes=1),
        )
        for i, s in enumerate(states)
    ]
    m = make(
        status=PretrainedModelStatus(stable_revision=stable, revisions=revisions),
        rollout={"revisionHistoryLimit": limit},
    )
    p = run(m, Observed(deployments={stable: dep(stable)}), T0)
    assert [r.revision for r in p.status.revisions] == [*kept, REV]
    # bounded by the limit, except that the serving and the desired revision always stay
    assert len(p.status.revisions) == min(len(states) + 1, max(limit, 2))


# --- updates: canary through plan() ----------------------------------------------------------------


def canary_steps(**rollout: Any) -> dict[str, Any]:
    return {"steps": [{"setWeight": 50}, {"pause": {}}], "scaleDownDelaySeconds": 30, **rollout}


def test_a_validated_update_starts_a_canary_beside_the_stable() -> None:
    m = old_serving(rollout=canary_steps())
    now = T0 + timedelta(minutes=5)
    p = run(m, Observed(jobs=succeeded(), deployments={OLD: dep(OLD)}), now)
    assert p.status.stable_revision == OLD
    assert p.status.canary_revision == REV
    assert p.status.current_step == 0
    assert p.status.step_started_at == now
    assert p.status.canary_weight == 50
    assert rec(p).state is RevisionState.CANARY
    replicas = {
        d["metadata"]["name"]: d["spec"].get("replicas") for d in p.apply if d["kind"] == "Deployment"
    }
    assert replicas == {f"resnet50-{OLD}": 2, f"resnet50-{REV}": 2}
    assert says(p, "Progressing") == ("True", "Canary")
    assert says(p, "Available") == ("True", "Serving")  # the stable still serves
    assert Event("Normal", "CanaryStarted", f"revision {REV} starts beside {OLD}") in p.events
    assert p.requeue_after == SETTINGS.requeue_seconds


def test_promotion_clears_the_canary_and_scales_the_old_revision_down_after_a_delay() -> None:
    m = old_serving(rollout=canary_steps())
    observed = Observed(jobs=succeeded(), deployments={OLD: dep(OLD), REV: dep(REV)})
    started = run(m, observed, T0 + timedelta(minutes=5))
    assert started.status.current_step == 1  # canary pods were ready: on to the indefinite pause
    previous = started.status_patch()
    promote_at = T0 + timedelta(minutes=6)
    promoted_model = then(m, started)
    promoted_model.metadata.annotations[PROMOTE_ANNOTATION] = "true"
    promoted = run(promoted_model, observed, promote_at)
    assert promoted.consume_annotations == [PROMOTE_ANNOTATION]
    assert promoted.status.stable_revision == REV
    assert rec(promoted).state is RevisionState.STABLE
    assert rec(promoted, OLD).state is RevisionState.SUPERSEDED
    assert rec(promoted, OLD).state_since == promote_at
    patch = promoted.status_patch(previous)
    for key in ("canaryRevision", "currentStep", "canaryWeight", "stepStartedAt"):
        assert key in previous
        assert patch[key] is None, key
    assert says(promoted, "Progressing") == ("True", "Promoted")
    assert any(e.reason == "Promoted" for e in promoted.events)

    after = then(m, promoted)
    during = run(after, observed, promote_at + timedelta(seconds=10))
    assert ("Deployment", f"resnet50-{OLD}") in kinds(during)  # still there for scaleDownDelaySeconds
    assert during.delete == []
    assert during.requeue_after == pytest.approx(5.0)
    later = run(after, observed, promote_at + timedelta(seconds=27))
    assert later.requeue_after == pytest.approx(3.0)
    gone = run(after, observed, promote_at + timedelta(seconds=31))
    assert ("Deployment", f"resnet50-{OLD}") not in kinds(gone)
    assert gone.delete == [Deletion("apps/v1", "Deployment", f"resnet50-{OLD}")]
    assert says(gone, "Progressing") == ("False", "Settled")
    assert says(gone, "Ready") == ("True", "Serving")


def test_a_rolled_back_canary_leaves_the_stable_serving_and_says_so() -> None:
    m = old_serving(rollout=canary_steps())
    observed = Observed(jobs=succeeded(), deployments={OLD: dep(OLD), REV: dep(REV, ready=0)})
    started = then(m, run(m, observed, T0 + timedelta(minutes=5)))
    crash = [
        PodObservation(name=f"resnet50-{REV}-a", revision=REV, waiting_reason="CrashLoopBackOff", restarts=3)
    ]
    now = T0 + timedelta(minutes=7)
    p = run(started, Observed(jobs=succeeded(), deployments=observed.deployments, pods=crash), now)
    assert rec(p).state is RevisionState.ROLLED_BACK
    assert p.status.stable_revision == OLD
    assert p.status.canary_revision is None
    assert says(p, "Degraded") == ("True", "RolledBack")
    assert (
        f"revision {REV} rolled back at step 0: pod resnet50-{REV}-a is in CrashLoopBackOff"
        in cond(p, "Degraded").message
    )
    assert says(p, "Available") == ("True", "Serving")
    assert [(r.action.value, r.reason, r.revision) for r in p.status.remediations] == [
        ("Rollback", "CrashLoopBackOff", REV)
    ]
    assert ("Deployment", f"resnet50-{REV}") not in kinds(p)
    assert p.delete == [Deletion("apps/v1", "Deployment", f"resnet50-{REV}")]
    assert any(e.type == "Warning" and e.reason == "RolledBack" for e in p.events)


def test_the_spec_moving_away_from_a_canary_clears_it() -> None:
    m = old_serving(rollout=canary_steps())
    observed = Observed(jobs=succeeded(), deployments={OLD: dep(OLD), REV: dep(REV)})
    in_canary = then(m, run(m, observed, T0 + timedelta(minutes=5)))
    assert in_canary.status.canary_revision == REV
    back = then(in_canary, Plan([], [], in_canary.status, [], None), revision=OLD)
    p = run(back, observed, T0 + timedelta(minutes=6))
    assert p.status.canary_revision is None
    assert p.status.current_step is None
    assert p.status.stable_revision == OLD
    assert p.delete == [Deletion("apps/v1", "Deployment", f"resnet50-{REV}")]


def test_annotations_without_a_canary_are_consumed() -> None:
    m = serving_model()
    body = m.model_dump(by_alias=True, mode="json")
    body["metadata"]["annotations"] = {PROMOTE_ANNOTATION: "true"}
    p = run(PretrainedModel.from_body(body), Observed(deployments={REV: dep(REV)}), T0 + timedelta(hours=1))
    assert p.consume_annotations == ["ptm.dev/promote", "ptm.dev/abort"]


# --- autoscaling through plan() ------------------------------------------------------------------


@pytest.mark.parametrize("keda_available", [False, True])
def test_autoscaled_models_leave_replicas_to_the_autoscaler(keda_available: bool) -> None:
    m = serving_model(
        serving={**BODY["spec"]["serving"], "autoscaling": {"minReplicas": 1, "maxReplicas": 4}}
    )
    p = run(
        m,
        Observed(deployments={REV: dep(REV, replicas=3)}, keda_available=keda_available),
        T0 + timedelta(hours=1),
    )
    deployment = next(x for x in p.apply if x["kind"] == "Deployment")
    assert "replicas" not in deployment["spec"]
    assert [k for k, _ in kinds(p)].count("HorizontalPodAutoscaler") == 1
    assert "ScaledObject" not in [k for k, _ in kinds(p)]
    assert p.status.replicas == 3


@pytest.mark.parametrize(("keda_available", "scaled"), [(False, 0), (True, 1)])
def test_keda_scaled_object_only_where_keda_runs(keda_available: bool, scaled: int) -> None:
    auto = {"minReplicas": 0, "maxReplicas": 4, "keda": {}}
    m = serving_model(serving={**BODY["spec"]["serving"], "autoscaling": auto})
    p = run(m, Observed(deployments={REV: dep(REV)}, keda_available=keda_available), T0 + timedelta(hours=1))
    assert [k for k, _ in kinds(p)].count("ScaledObject") == scaled
    # Without KEDA the operator falls back to an HPA and says so.
    assert ("HorizontalPodAutoscaler" in [k for k, _ in kinds(p)]) is not keda_available
    assert any(e.reason == "KedaMissing" for e in p.events) is not keda_available


@pytest.mark.parametrize(
    ("autoscaling", "observed_replicas", "expected"),
    [
        (None, None, 2),
        (None, 5, 2),
        ({"minReplicas": 2, "maxReplicas": 6}, None, 2),
        ({"minReplicas": 2, "maxReplicas": 6}, 4, 4),
        ({"minReplicas": 2, "maxReplicas": 6}, 9, 6),
        ({"minReplicas": 2, "maxReplicas": 6}, 0, 2),
    ],
)
def test_desired_replicas(
    autoscaling: dict[str, Any] | None, observed_replicas: int | None, expected: int
) -> None:
    m = make(serving={"autoscaling": autoscaling})
    observed = None if observed_replicas is None else dep(REV, replicas=observed_replicas)
    assert desired_replicas(m, observed) == expected


def test_network_policy_joins_the_plan_when_enabled() -> None:
    m = serving_model(serving={**BODY["spec"]["serving"], "networkPolicy": {"enabled": True}})
    p = run(m, Observed(deployments={REV: dep(REV)}), T0 + timedelta(hours=1))
    assert ("NetworkPolicy", "resnet50") in kinds(p)


# --- helpers -------------------------------------------------------------------------------------


def test_termination_record_tells_report_failure_and_noise_apart() -> None:
    assert isinstance(termination_record(report().compact()), Report)
    assert isinstance(termination_record(GATE_FAILURE), Failure)
    for noise in (None, "", "not json", "[]", '{"reason": "X"}', "Traceback (most recent call last):"):
        assert termination_record(noise) is None


def test_candidates_summary() -> None:
    assert (
        candidates_summary(report(passed=False).candidates)
        == "fp16: top-1 agreement 0.82 < 0.99; fp32: cosine 0.97 < 0.999"
    )
    assert (
        candidates_summary([Candidate(precision=Precision.INT8_DYNAMIC, passed=False)])
        == "int8-dynamic: failed"
    )
    assert candidates_summary([]) == ""


# --- bugs found while writing these tests (see the report) ---------------------------------------


def test_a_permanent_failure_keeps_its_reason_on_the_next_round() -> None:
    """Converted's reason is InvalidSource on the round that sees the failed Job and must stay so."""
    m = then(make(), run(make()))
    failed = job(
        failed=True,
        exit_code=EXIT_INVALID,
        termination_message=failure("InvalidSource", EXIT_INVALID, True, "pickle refused"),
    )
    first = run(m, Observed(jobs={REV: failed}), T0 + timedelta(minutes=5))
    assert says(first, "Converted") == ("False", "InvalidSource")
    second = run(then(m, first), Observed(jobs={REV: failed}), T0 + timedelta(minutes=6))
    assert says(second, "Converted") == ("False", "InvalidSource")


def test_a_pod_waiting_for_a_gpu_makes_the_model_not_ready_even_beside_serving_pods() -> None:
    """Issue 6: never Ready while pods crash-loop or are unschedulable; the message names the wait."""
    m = serving_model()
    pods = [
        PodObservation(name="resnet50-a", revision=REV, phase="Running", ready=True),
        PodObservation(name="resnet50-b", revision=REV, phase="Running", ready=True),
        PodObservation(name="resnet50-c", revision=REV, unschedulable=GPU_MESSAGE),
    ]
    p = run(m, Observed(deployments={REV: dep(REV, replicas=3, ready=2)}, pods=pods), T0 + timedelta(hours=1))
    assert says(p, "Available") == ("False", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in cond(p, "Available").message
    assert cond(p, "Ready").status is ConditionStatus.FALSE
    assert says(p, "Degraded")[0] == "True"


def test_pinning_a_rolled_back_revision_serves_it() -> None:
    """planning.py widens `servable` with RolledBack for pinned revisions, but the pin check refuses them first."""
    m = old_serving()
    st = m.status.model_copy(deep=True)
    st.revisions.append(
        RevisionStatus(
            revision="0a0a0a0a0a",
            state=RevisionState.ROLLED_BACK,
            message="rolled back at step 2: analysis failed 3 times",
            artifact=ArtifactStatus(uri="file:///a/model.onnx", sha256="aa" * 32, size_bytes=1),
        )
    )
    pinned = make(status=st, revision="0a0a0a0a0a", rollout={"strategy": "Recreate"})
    p = run(pinned, Observed(deployments={OLD: dep(OLD)}), T0)
    degraded = get_condition(p.status.conditions, "Degraded")
    assert degraded is None or degraded.reason != "RevisionNotFound", degraded.message
    assert p.status.stable_revision == "0a0a0a0a0a"


def test_a_rolled_back_revision_is_not_rolled_out_again() -> None:
    """The round after a rollback re-validates the rolled-back revision from its finished Job and
    starts a new canary of it (RolledBack is neither in SERVABLE nor FAILED, so step 2 runs again)."""
    m = old_serving(rollout=canary_steps())
    observed = Observed(jobs=succeeded(), deployments={OLD: dep(OLD), REV: dep(REV, ready=0)})
    started = then(m, run(m, observed, T0 + timedelta(minutes=5)))
    crash = [
        PodObservation(name=f"resnet50-{REV}-a", revision=REV, waiting_reason="CrashLoopBackOff", restarts=3)
    ]
    now = T0 + timedelta(minutes=7)
    rolled_back = run(started, Observed(jobs=succeeded(), deployments=observed.deployments, pods=crash), now)
    assert rec(rolled_back).state is RevisionState.ROLLED_BACK
    settled = run(
        then(started, rolled_back),
        Observed(jobs=succeeded(), deployments={OLD: dep(OLD)}),
        now + timedelta(seconds=30),
    )
    assert rec(settled).state is RevisionState.ROLLED_BACK
    assert settled.status.canary_revision is None
    assert ("Deployment", f"resnet50-{REV}") not in kinds(settled)
    assert says(settled, "Degraded") == ("True", "RolledBack")  # until the spec changes


def test_recreate_does_not_keep_the_old_revision_running_beside_the_new_one() -> None:
    """rollout.strategy: 'Recreate: the old revision is replaced at once (no extra GPUs)'."""
    m = old_serving(rollout={"strategy": "Recreate", "scaleDownDelaySeconds": 30})
    observed = Observed(jobs=succeeded(), deployments={OLD: dep(OLD)})
    promoted = run(m, observed, T0 + timedelta(minutes=5))
    assert promoted.status.stable_revision == REV
    after = run(then(m, promoted), observed, T0 + timedelta(minutes=5, seconds=5))
    for p in (promoted, after):
        old = [d for d in p.apply if d["kind"] == "Deployment" and d["metadata"]["name"] == f"resnet50-{OLD}"]
        assert not old or old[0]["spec"].get("replicas") == 0, "the old revision keeps its GPU pods"
