"""Remediation decisions: memory bumps, crash-loop rollback of the stable revision, stuck pods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ptm_operator.api import (
    ArtifactStatus,
    PretrainedModel,
    RemediationAction,
    RemediationRecord,
    RevisionState,
    RevisionStatus,
)
from ptm_operator.observed import Observed, PodObservation
from ptm_operator.remediation import effective_memory_limit, format_mebibytes, parse_bytes, remediate

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
STABLE, OLD = "aaaaaaaaaa", "bbbbbbbbbb"


def model(
    remediation: dict[str, Any] | None = None, memory: str = "2Gi", bumped: str | None = None
) -> PretrainedModel:
    artifact = ArtifactStatus(uri="file:///s/model.onnx", sha256="0" * 64)
    m = PretrainedModel.from_body(
        {
            "apiVersion": "ptm.dev/v1alpha1",
            "kind": "PretrainedModel",
            "metadata": {"name": "m", "namespace": "ns", "generation": 1},
            "spec": {
                "source": {"uri": "file:///m/model.onnx", "format": "onnx"},
                "serving": {"resources": {"limits": {"memory": memory}}},
                "remediation": remediation or {},
            },
        }
    )
    m.status.stable_revision = STABLE
    m.status.memory_limit = bumped
    m.status.revisions = [
        RevisionStatus(revision=OLD, state=RevisionState.SUPERSEDED, artifact=artifact),
        RevisionStatus(revision=STABLE, state=RevisionState.STABLE, artifact=artifact),
    ]
    return m


def pod(name: str = "m-aaaaaaaaaa-1", **kw: Any) -> PodObservation:
    return PodObservation(name=name, revision=STABLE, phase="Running", **kw)


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("2Gi", 2 * 2**30),
        ("1500Mi", 1500 * 2**20),
        ("1G", 10**9),
        ("512", 512),
        (1024, 1024),
        ("1.5Gi", 3 * 2**29),
    ],
)
def test_parse_bytes(quantity: str | int, expected: int) -> None:
    assert parse_bytes(quantity) == expected


def test_parse_bytes_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        parse_bytes("lots")


@pytest.mark.parametrize(("n", "text"), [(3 * 2**30, "3Gi"), (3 * 2**29, "1536Mi"), (2**20 + 1, "2Mi")])
def test_format_mebibytes(n: int, text: str) -> None:
    assert format_mebibytes(n) == text


def test_oom_raises_memory_by_the_factor_and_records_it() -> None:
    m = model()
    remedy = remediate(
        m, Observed(pods=[pod(last_termination_reason="OOMKilled", memory_limit="2Gi")]), m.status, NOW
    )
    assert remedy.memory_limit == "3Gi"
    assert m.status.memory_limit == "3Gi"
    assert m.status.remediations[-1].action is RemediationAction.MEMORY_BUMP
    assert "2Gi -> 3Gi" in m.status.remediations[-1].message
    assert remedy.degraded is not None and remedy.degraded[0] == "OOMKilled"


def test_oom_never_goes_above_the_ceiling() -> None:
    m = model({"memoryBumpOnOOM": {"factor": 4, "ceiling": "5Gi"}})
    remedy = remediate(
        m, Observed(pods=[pod(last_termination_reason="OOMKilled", memory_limit="2Gi")]), m.status, NOW
    )
    assert remedy.memory_limit == "5Gi"
    m2 = model({"memoryBumpOnOOM": {"ceiling": "5Gi"}}, bumped="5Gi")
    again = remediate(
        m2, Observed(pods=[pod(last_termination_reason="OOMKilled", memory_limit="5Gi")]), m2.status, NOW
    )
    assert m2.status.memory_limit == "5Gi" and not m2.status.remediations
    assert again.degraded is not None and "ceiling 5Gi is reached" in again.degraded[1]


def test_oom_with_bumps_disabled_only_reports() -> None:
    m = model({"memoryBumpOnOOM": {"enabled": False}})
    remedy = remediate(
        m, Observed(pods=[pod(last_termination_reason="OOMKilled", memory_limit="2Gi")]), m.status, NOW
    )
    assert m.status.memory_limit is None and not m.status.remediations
    assert remedy.degraded is not None and "disabled" in remedy.degraded[1]
    assert remedy.events and remedy.events[0][1] == "OOMKilled"


def test_oom_of_an_old_pod_template_does_not_bump_twice() -> None:
    m = model(bumped="3Gi")
    remediate(m, Observed(pods=[pod(last_termination_reason="OOMKilled", memory_limit="2Gi")]), m.status, NOW)
    assert m.status.memory_limit == "3Gi" and not m.status.remediations


def test_the_user_raising_memory_wins_over_the_bump() -> None:
    assert effective_memory_limit(model(memory="8Gi", bumped="3Gi")) == "8Gi"
    assert effective_memory_limit(model(memory="2Gi", bumped="3Gi")) == "3Gi"


def test_max_actions_per_hour_stops_remediation() -> None:
    m = model({"maxActionsPerHour": 1})
    m.status.remediations = [
        RemediationRecord(
            time=NOW - timedelta(minutes=10), action=RemediationAction.RESTART_POD, reason="NotReady"
        )
    ]
    remedy = remediate(
        m, Observed(pods=[pod(last_termination_reason="OOMKilled", memory_limit="2Gi")]), m.status, NOW
    )
    assert m.status.memory_limit is None
    assert remedy.degraded is not None and "maxActionsPerHour 1" in remedy.degraded[1]


def test_crash_looping_stable_rolls_back_to_the_previous_good_revision() -> None:
    m = model()
    crashing = [pod(f"m-{i}", waiting_reason="CrashLoopBackOff", restarts=5) for i in range(2)]
    remedy = remediate(m, Observed(pods=crashing), m.status, NOW)
    assert remedy.rollback_to == OLD
    assert m.status.remediations[-1].action is RemediationAction.ROLLBACK


def test_one_crashing_pod_of_two_is_not_a_rollback() -> None:
    m = model()
    pods = [pod("m-0", waiting_reason="CrashLoopBackOff", restarts=5), pod("m-1", ready=True)]
    assert remediate(m, Observed(pods=pods), m.status, NOW).rollback_to is None


def test_stuck_pod_is_deleted_once() -> None:
    m = model({"restartStuckPods": {"notReadyFor": "5m"}})
    stuck = pod("m-stuck", ready=False, not_ready_since=NOW - timedelta(minutes=6))
    fresh = pod("m-fresh", ready=False, not_ready_since=NOW - timedelta(minutes=1))
    first = remediate(m, Observed(pods=[stuck, fresh]), m.status, NOW)
    assert first.delete_pods == ["m-stuck"]
    second = remediate(m, Observed(pods=[stuck, fresh]), m.status, NOW + timedelta(seconds=5))
    assert second.delete_pods == []


def test_nothing_to_do_while_a_canary_runs() -> None:
    m = model()
    m.status.canary_revision = "cccccccccc"
    remedy = remediate(
        m, Observed(pods=[pod(last_termination_reason="OOMKilled", memory_limit="2Gi")]), m.status, NOW
    )
    assert remedy.memory_limit is None and not m.status.remediations
