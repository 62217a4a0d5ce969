"""`ptm doctor`'s diagnosis: broken set-ups as the API would return them, and the first cause named."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from ptm_operator.doctor import Diagnosis, Severity, diagnose, render

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
T0 = "2026-01-01T11:50:00Z"


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": T0}


def model(*conditions: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ptm.dev/v1alpha1",
        "kind": "PretrainedModel",
        "metadata": {"name": "resnet", "namespace": "ml"},
        "spec": {"source": {"uri": "s3://models/resnet.pt"}},
        "status": {"conditions": list(conditions), **status},
    }


def pod(
    name: str,
    revision: str = "r1",
    component: str = "serving",
    gpus: int = 0,
    unschedulable: str | None = None,
    waiting: tuple[str, str] | None = None,
    restarts: int = 0,
    last: tuple[str, int] | None = None,
    image: str = "ptm/serve:1",
    job: str | None = None,
) -> dict[str, Any]:
    labels = {
        "app.kubernetes.io/name": "ptm",
        "app.kubernetes.io/instance": "resnet",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "ptm-operator",
        "ptm.dev/model": "resnet",
        "ptm.dev/revision": revision,
    }
    if job:
        labels["batch.kubernetes.io/job-name"] = job
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    status: dict[str, Any] = {"phase": "Pending" if unschedulable or waiting else "Running", "conditions": []}
    if unschedulable:
        status["conditions"].append(cond("PodScheduled", "False", "Unschedulable", unschedulable))
    else:
        cs: dict[str, Any] = {"name": "server", "image": image, "restartCount": restarts, "state": {}}
        if waiting:
            cs["state"] = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
        else:
            cs["state"] = {"running": {"startedAt": T0}}
        if last:
            cs["lastState"] = {"terminated": {"reason": last[0], "exitCode": last[1]}}
        status["containerStatuses"] = [cs]
    return {
        "metadata": {"name": name, "namespace": "ml", "labels": labels},
        "spec": {"containers": [{"name": "server", "image": image, "resources": {"limits": limits}}]},
        "status": status,
    }


def event(kind: str, name: str, reason: str, message: str, count: int = 1) -> dict[str, Any]:
    return {
        "type": "Warning",
        "reason": reason,
        "message": message,
        "count": count,
        "involvedObject": {"kind": kind, "name": name, "namespace": "ml"},
        "lastTimestamp": T0,
    }


def first(d: Diagnosis) -> str:
    assert d.findings, "no findings"
    return d.findings[0].summary


SERVING = cond("Available", "True", "Serving", "revision r1: 2/2 pods ready")
NOT_SERVING = cond("Available", "False", "NoArtifact", "no validated revision to serve yet")


def test_failed_validation_names_the_gate_and_the_numbers() -> None:
    d = diagnose(
        model(
            cond("Converted", "True", "Converted", "revision r1: onnx opset 17"),
            cond(
                "Validated",
                "False",
                "ValidationFailed",
                "revision r1: validation failed: fp16: cosine 0.91 < 0.99; fp32: max abs error 0.2 > 0.01",
            ),
            NOT_SERVING,
            cond("Ready", "False", "ValidationFailed", "Validated: ..."),
        ),
        now=NOW,
    )
    top = d.findings[0]
    assert top.severity is Severity.BLOCKING
    assert top.summary == (
        "conversion failed the validation gate: fp16: cosine 0.91 < 0.99; fp32: max abs error 0.2 > 0.01 "
        "(revision r1)"
    )
    assert "spec.validation" in top.hint
    assert not d.healthy


def test_unschedulable_gpu_pods_quote_the_scheduler() -> None:
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    d = diagnose(
        model(
            cond("Converted", "True", "Converted"),
            cond("Validated", "True", "Validated"),
            cond("Available", "False", "Unschedulable", "2 pod(s) wait for resources: " + msg),
            cond("Ready", "False", "Unschedulable"),
            stableRevision="r1",
        ),
        pods=[pod("resnet-r1-a", gpus=1, unschedulable=msg), pod("resnet-r1-b", gpus=1, unschedulable=msg)],
        events=[event("Pod", "resnet-r1-a", "FailedScheduling", msg, count=7)],
        now=NOW,
    )
    assert first(d) == f"2 serving pods wait for nvidia.com/gpu: {msg}"
    assert d.findings[0].severity is Severity.BLOCKING
    assert d.findings[0].objects == ("pod/resnet-r1-a", "pod/resnet-r1-b")
    assert "autoscaler" in d.findings[0].hint
    # the FailedScheduling event says the same thing: not repeated
    assert not any("FailedScheduling" in f.summary for f in d.findings)


def test_pods_without_gpus_that_cannot_be_scheduled_are_not_called_gpu_waits() -> None:
    msg = "0/3 nodes are available: 3 Insufficient memory."
    d = diagnose(model(NOT_SERVING), pods=[pod("p", unschedulable=msg)], now=NOW)
    assert first(d) == f"1 serving pod cannot be scheduled: {msg}"


def test_crash_looping_canary_while_stable_serves_is_a_warning_with_the_exit_reason() -> None:
    d = diagnose(
        model(
            SERVING,
            cond("Progressing", "True", "Canary", "revision r2 at step 1/3, weight 10%"),
            cond("Ready", "True", "Serving"),
            stableRevision="r1",
            canaryRevision="r2",
        ),
        pods=[
            pod("resnet-r1-a"),
            pod(
                "resnet-r2-a",
                revision="r2",
                waiting=("CrashLoopBackOff", "back-off 40s"),
                restarts=4,
                last=("OOMKilled", 137),
            ),
        ],
        now=NOW,
    )
    top = d.findings[0]
    assert top.summary == "1 canary pod crash-loops: 4 restarts, last exit: OOMKilled (code 137)"
    assert top.severity is Severity.WARNING  # the stable revision still serves
    assert "limits.memory" in top.hint
    assert any(f.summary.startswith("rollout: revision r2 at step 1/3") for f in d.findings)


def test_missing_source_is_reported_as_a_source_problem() -> None:
    d = diagnose(
        model(
            cond(
                "Converted",
                "False",
                "InvalidSource",
                "revision r1: InvalidSource: s3://models/resnet.pt: NoSuchKey: the key does not exist",
            ),
            NOT_SERVING,
            cond("Ready", "False", "InvalidSource"),
        ),
        now=NOW,
    )
    assert first(d) == (
        "the source cannot be converted (InvalidSource): InvalidSource: s3://models/resnet.pt: "
        "NoSuchKey: the key does not exist (revision r1)"
    )
    assert "spec.source.uri" in d.findings[0].hint


def test_image_pull_failure_names_the_image() -> None:
    d = diagnose(
        model(
            cond("Converted", "True", "Converted"),
            cond("Available", "False", "ErrImagePull", "1 serving pod(s) in ErrImagePull"),
            stableRevision="r1",
        ),
        pods=[
            pod(
                "resnet-r1-a",
                image="ghcr.io/ptm-dev/ptm-serve:nope",
                waiting=("ImagePullBackOff", 'Back-off pulling image "ghcr.io/ptm-dev/ptm-serve:nope"'),
            )
        ],
        now=NOW,
    )
    assert first(d) == (
        "1 serving pod cannot pull image ghcr.io/ptm-dev/ptm-serve:nope: "
        'Back-off pulling image "ghcr.io/ptm-dev/ptm-serve:nope"'
    )
    assert d.findings[0].severity is Severity.BLOCKING


def test_conversion_pods_refused_by_pod_security_point_at_the_store() -> None:
    msg = (
        'pods "resnet-convert-r1-x" is forbidden: violates PodSecurity "restricted:latest": restricted '
        'volume types (volume "ptm-store" uses restricted volume type "hostPath")'
    )
    d = diagnose(
        model(
            cond("Converted", "False", "Converting", "conversion Job resnet-convert-r1 is running"),
            NOT_SERVING,
        ),
        events=[event("Job", "resnet-convert-r1", "FailedCreate", msg, count=3)],
        now=NOW,
    )
    assert first(d) == f"conversion Job resnet-convert-r1 cannot create pods (3x): {msg}"
    assert "pvc://" in d.findings[0].hint
    # the conversion is still "running" as far as the status knows: listed, but after the cause
    assert any(f.summary.startswith("converting: conversion Job") and "10m" in f.summary for f in d.findings)


def test_rolled_back_canary_quotes_the_analysis() -> None:
    message = "revision r2 rolled back at step 2: p99 412 ms > 200 ms; revision r1 serves"
    d = diagnose(
        model(
            SERVING,
            cond("Degraded", "True", "RolledBack", message),
            cond("Ready", "True", "Serving"),
            stableRevision="r1",
            remediations=[
                {
                    "time": "2026-01-01T11:55:00Z",
                    "action": "Rollback",
                    "reason": "AnalysisFailed",
                    "revision": "r2",
                    "message": "p99 412 ms > 200 ms",
                }
            ],
        ),
        pods=[pod("resnet-r1-a")],
        now=NOW,
    )
    assert first(d) == f"canary rolled back: {message}"
    assert d.findings[0].severity is Severity.WARNING
    remediation = next(f for f in d.findings if f.summary.startswith("automatic remediations"))
    assert remediation.summary == (
        "automatic remediations recorded: 1x Rollback; latest 5m ago: "
        "Rollback (AnalysisFailed, revision r2): p99 412 ms > 200 ms"
    )


def test_failed_job_is_read_from_its_pod_when_the_status_does_not_say() -> None:
    failure = {"reason": "ExportFailed", "message": "torch.onnx.export: unsupported operator aten::foo"}
    converter = pod("resnet-convert-r1-x", component="converter", job="resnet-convert-r1")
    converter["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 1, "message": json.dumps(failure)}
    }
    job = {
        "metadata": {"name": "resnet-convert-r1", "labels": {"ptm.dev/revision": "r1"}},
        "status": {
            "conditions": [cond("Failed", "True", "BackoffLimitExceeded", "Job has reached the limit")]
        },
    }
    d = diagnose(
        model(cond("Converted", "False", "Converting", "conversion Job resnet-convert-r1 is running")),
        jobs=[job],
        pods=[converter],
        now=NOW,
    )
    assert first(d) == (
        "conversion Job resnet-convert-r1 failed: ExportFailed: torch.onnx.export: unsupported operator aten::foo"
    )


def test_missing_store_claim_is_a_mount_problem() -> None:
    msg = 'persistentvolumeclaim "ptm-artifacts" not found'
    d = diagnose(
        model(NOT_SERVING),
        pods=[pod("resnet-r1-a", waiting=("ContainerCreating", ""))],
        events=[event("Pod", "resnet-r1-a", "FailedMount", msg)],
        now=NOW,
    )
    assert first(d) == f"pod resnet-r1-a cannot mount a volume: {msg}"
    assert "PersistentVolumeClaim" in d.findings[0].hint


def test_invalid_spec_comes_first() -> None:
    d = diagnose(
        model(cond("Ready", "False", "InvalidSpec", "spec.serving.replicas: must be >= 0")),
        now=NOW,
    )
    assert first(d) == "the spec is invalid: spec.serving.replicas: must be >= 0"


def test_no_status_means_the_operator_has_not_seen_it() -> None:
    d = diagnose(model(), now=NOW)
    assert first(d).startswith("the operator has not reconciled this resource yet")


def test_healthy_model_says_what_serves() -> None:
    d = diagnose(
        model(SERVING, cond("Ready", "True", "Serving"), stableRevision="r1"),
        pods=[pod("resnet-r1-a"), pod("resnet-r1-b")],
        now=NOW,
    )
    assert d.healthy
    assert [f.summary for f in d.findings] == ["serving revision r1: revision r1: 2/2 pods ready"]


@pytest.mark.parametrize("serving", [True, False])
def test_blocking_findings_rank_before_warnings_and_info(serving: bool) -> None:
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    d = diagnose(
        model(
            SERVING if serving else NOT_SERVING,
            cond("Degraded", "True", "UpdateFailed", "revision r2 failed; revision r1 keeps serving"),
            remediations=[{"time": T0, "action": "RestartPod", "reason": "NotReady"}],
        ),
        pods=[pod("p", component="converter", gpus=1, unschedulable=msg)],
        events=[event("Deployment", "resnet-r1", "SomethingOdd", "odd")],
        now=NOW,
    )
    severities = [f.severity for f in d.findings]
    assert severities == sorted(severities, reverse=True)
    assert first(d) == f"1 conversion pod waits for nvidia.com/gpu: {msg}"
    assert any(f.summary == "event SomethingOdd on deployment/resnet-r1: odd" for f in d.findings)


def test_render_numbers_findings_with_objects_and_hints() -> None:
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pods = [pod(f"p{i}", gpus=1, unschedulable=msg) for i in range(5)]
    text = render(diagnose(model(NOT_SERVING, cond("Ready", "False", "Unschedulable")), pods=pods, now=NOW))
    lines = text.splitlines()
    assert lines[0] == "ml/resnet: Ready=False (Unschedulable)"
    assert lines[1] == f"1. [blocking] 5 serving pods wait for nvidia.com/gpu: {msg}"
    assert lines[2] == "   objects: pod/p0, pod/p1, pod/p2 and 2 more"
    assert lines[3].startswith("   what to do: no node has a free GPU")
