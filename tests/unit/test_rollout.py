"""The canary state machine, one step_rollout() call at a time, with every fact in status."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ptm_operator.analysis import Sample
from ptm_operator.api import (
    ABORT_ANNOTATION,
    PROMOTE_ANNOTATION,
    ArtifactStatus,
    PretrainedModel,
    PretrainedModelStatus,
    RemediationAction,
    RemediationRecord,
    RevisionState,
    RevisionStatus,
)
from ptm_operator.observed import DeploymentObservation, Observed, PodObservation
from ptm_operator.rollout import (
    RolloutResult,
    achieved_weight,
    canary_replicas,
    needs_samples,
    stable_size,
    step_rollout,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
STABLE = "5ab1e00000"
CANARY = "ca9a7f1111"
REQUEUE = 5.0
INF = float("inf")

BASE: dict[str, Any] = {
    "apiVersion": "ptm.dev/v1alpha1",
    "kind": "PretrainedModel",
    "metadata": {"name": "minilm", "namespace": "nlp", "uid": "u-1", "generation": 4},
    "spec": {
        "source": {"uri": "hf://sentence-transformers/all-MiniLM-L6-v2@main", "format": "huggingface"},
        "serving": {"replicas": 4, "executionProviders": ["CPUExecutionProvider"]},
    },
}

#: canary-update.yaml's steps, shortened.
STEPS: list[dict[str, Any]] = [
    {"setWeight": 10},  # 0
    {"pause": {"duration": "30s"}},  # 1
    {"analysis": {"duration": "2m"}},  # 2
    {"setWeight": 50},  # 3
    {"pause": {}},  # 4
]


def artifact(revision: str) -> ArtifactStatus:
    return ArtifactStatus(
        uri=f"file:///store/nlp/minilm/{revision}/model.onnx", sha256="ab" * 32, size_bytes=90_000_000
    )


def status(**canary: Any) -> dict[str, Any]:
    """Status with STABLE serving and CANARY validated, plus the given canary facts (wire names)."""
    st = PretrainedModelStatus(
        stable_revision=STABLE,
        revisions=[
            RevisionStatus(
                revision=STABLE, state=RevisionState.STABLE, artifact=artifact(STABLE), created=T0
            ),
            RevisionStatus(
                revision=CANARY, state=RevisionState.VALIDATED, artifact=artifact(CANARY), created=T0
            ),
        ],
    ).wire()
    if canary:
        st |= {"canaryRevision": CANARY, "analysisFailures": 0, **canary}
        st["revisions"][1]["state"] = "Canary"
    return st


def model(
    steps: list[dict[str, Any]] | None = None,
    st: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    serving: dict[str, Any] | None = None,
    remediation: dict[str, Any] | None = None,
    **rollout: Any,
) -> PretrainedModel:
    body = copy.deepcopy(BASE)
    body["spec"]["rollout"] = {"steps": STEPS if steps is None else steps, **rollout}
    body["spec"]["serving"].update(serving or {})
    if remediation is not None:
        body["spec"]["remediation"] = remediation
    body["metadata"]["annotations"] = annotations or {}
    body["status"] = status() if st is None else st
    return PretrainedModel.from_body(body)


def step(
    m: PretrainedModel, observed: Observed | None = None, now: datetime = NOW, requeue: float = REQUEUE
) -> tuple[RolloutResult, PretrainedModelStatus]:
    """One round; the status the round wrote is returned beside the result (the model's is untouched)."""
    st = m.status.model_copy(deep=True)
    result = step_rollout(m, observed or Observed(), st, STABLE, CANARY, now, requeue)
    return result, st


def canary_ready(ready: int, replicas: int | None = None) -> dict[str, DeploymentObservation]:
    return {
        CANARY: DeploymentObservation(
            name=f"minilm-{CANARY}", revision=CANARY, replicas=replicas or ready, ready_replicas=ready
        )
    }


def state(st: PretrainedModelStatus, revision: str) -> RevisionState:
    rec = st.revision(revision)
    assert rec is not None
    return rec.state


def assert_canary_cleared(st: PretrainedModelStatus) -> None:
    assert st.canary_revision is None
    assert st.current_step is None
    assert st.canary_weight is None
    assert st.step_started_at is None
    assert st.analysis_failures is None
    assert st.last_analysis_at is None


# --- replica math ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stable", "weight", "canary", "achieved"),
    [
        (4, 5, 1, 20),  # at least one pod
        (4, 10, 1, 20),
        (4, 25, 1, 20),
        (4, 50, 4, 50),
        (4, 75, 12, 75),
        (4, 100, 4, 50),  # 100%: as many as stable (stable keeps its size during the canary)
        (10, 10, 1, 9),
        (10, 25, 3, 23),
        (10, 50, 10, 50),
        (9, 10, 1, 10),
        (3, 40, 2, 40),
        (1, 10, 1, 50),
        (1, 90, 9, 90),
        (0, 50, 1, 100),  # no stable pods: counted as one for the ratio
    ],
)
def test_canary_replicas_and_achieved_weight(stable: int, weight: int, canary: int, achieved: int) -> None:
    assert canary_replicas(stable, weight) == canary
    assert achieved_weight(stable, canary) == achieved


@pytest.mark.parametrize(("stable", "canary", "weight"), [(0, 0, 0), (4, 0, 0), (0, 3, 100), (-1, 1, 100)])
def test_achieved_weight_edges(stable: int, canary: int, weight: int) -> None:
    assert achieved_weight(stable, canary) == weight


@pytest.mark.parametrize(
    ("autoscaling", "observed_replicas", "size"),
    [
        (None, None, 4),
        (None, 9, 4),  # fixed replicas: the spec wins
        ({"minReplicas": 2, "maxReplicas": 8}, None, 2),
        ({"minReplicas": 2, "maxReplicas": 8}, 6, 6),  # the HPA's choice
        ({"minReplicas": 2, "maxReplicas": 8}, 1, 2),
        ({"minReplicas": 0, "maxReplicas": 8, "keda": {}}, 0, 1),
    ],
)
def test_stable_size(autoscaling: dict[str, Any] | None, observed_replicas: int | None, size: int) -> None:
    m = model(serving={"autoscaling": autoscaling})
    deps = (
        {}
        if observed_replicas is None
        else {STABLE: DeploymentObservation(name="d", revision=STABLE, replicas=observed_replicas)}
    )
    assert stable_size(m, Observed(deployments=deps), STABLE) == size


# --- start and setWeight ---------------------------------------------------------------------------


def test_a_new_candidate_starts_a_canary_at_step_zero() -> None:
    result, st = step(model())
    assert st.canary_revision == CANARY
    assert st.current_step == 0
    assert st.step_started_at == NOW
    assert st.analysis_failures == 0
    assert state(st, CANARY) is RevisionState.CANARY
    assert state(st, STABLE) is RevisionState.STABLE
    assert result.stable == STABLE
    assert result.replicas == {CANARY: 1, STABLE: 4}
    assert st.canary_weight == 20  # 1 canary + 4 stable pods
    assert result.events == [("Normal", "CanaryStarted", f"revision {CANARY} starts beside {STABLE}")]
    assert result.progressing is not None and result.progressing[0] == "Canary"
    assert "step 0/5" in result.progressing[1]
    assert result.waiting == [f"0/1 canary pods of revision {CANARY} ready (step 0, setWeight 10)"]
    assert result.rolled_back is None


def test_a_canary_that_changes_restarts_from_step_zero() -> None:
    m = model(
        st=status(
            canaryRevision="0ther00000", currentStep=3, stepStartedAt=T0.isoformat(), analysisFailures=2
        )
    )
    _, st = step(m)
    assert (st.canary_revision, st.current_step, st.analysis_failures, st.step_started_at) == (
        CANARY,
        0,
        0,
        NOW,
    )


def test_set_weight_advances_once_the_canary_pods_are_ready() -> None:
    m = model(st=status(currentStep=0, stepStartedAt=T0.isoformat(), canaryWeight=20))
    result, st = step(m, Observed(deployments=canary_ready(1)))
    assert st.current_step == 1  # now in the 30 s pause, which starts now
    assert st.step_started_at == NOW
    assert result.waiting == ["pause at step 1: 30s left"]
    assert result.requeue_after == REQUEUE
    assert result.replicas == {CANARY: 1, STABLE: 4}
    assert result.events == []  # no new canary


@pytest.mark.parametrize(
    ("ready", "pods", "advances"),
    [
        (0, [], False),
        (1, [], True),
        (2, [], True),
        (1, [PodObservation(name="p", revision=CANARY, unschedulable="0/3 nodes are available")], False),
        (1, [PodObservation(name="p", revision=STABLE, unschedulable="0/3 nodes are available")], True),
    ],
)
def test_set_weight_waits_for_ready_and_scheduled_canary_pods(
    ready: int, pods: list[PodObservation], advances: bool
) -> None:
    started = NOW - timedelta(seconds=60)
    m = model(st=status(currentStep=0, stepStartedAt=started.isoformat()))
    _, st = step(m, Observed(deployments=canary_ready(ready), pods=pods))
    assert st.current_step == (1 if advances else 0)
    assert st.step_started_at == (NOW if advances else started)


def test_resuming_at_a_later_step_keeps_the_weight_of_earlier_steps() -> None:
    m = model(st=status(currentStep=4, stepStartedAt=T0.isoformat(), canaryWeight=50))
    result, st = step(m, Observed(deployments=canary_ready(4)))
    assert result.replicas == {CANARY: 4, STABLE: 4}  # setWeight 50 from step 3
    assert st.canary_weight == 50
    assert st.current_step == 4


def test_steps_without_a_weight_yet_run_no_canary_pods() -> None:
    m = model(steps=[{"pause": {}}, {"setWeight": 50}])
    result, st = step(m)
    assert result.replicas == {CANARY: 0, STABLE: 4}
    assert st.canary_weight == 0


# --- pauses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "requeue", "current", "requeue_after"),
    [
        (0, 5.0, 1, 5.0),
        (10, 60.0, 1, 20.0),  # looks again when the pause ends
        (29, 60.0, 1, 1.0),
        (30, 60.0, 2, 60.0),  # over: on to the analysis step, measured at once, requeued by interval
        (3600, 5.0, 2, 5.0),
    ],
)
def test_pause_with_a_duration(elapsed: int, requeue: float, current: int, requeue_after: float) -> None:
    started = NOW - timedelta(seconds=elapsed)
    m = model(st=status(currentStep=1, stepStartedAt=started.isoformat()), analysis={"interval": "1m"})
    result, st = step(m, Observed(deployments=canary_ready(1)), requeue=requeue)
    assert st.current_step == current
    assert result.requeue_after == pytest.approx(requeue_after)
    if current == 1:
        assert st.step_started_at == started
        assert result.waiting == [f"pause at step 1: {30 - elapsed}s left"]
    else:
        assert st.step_started_at == NOW


def test_indefinite_pause_waits_for_the_promote_annotation() -> None:
    m = model(st=status(currentStep=4, stepStartedAt=T0.isoformat(), canaryWeight=50))
    result, st = step(m, Observed(deployments=canary_ready(4)), now=T0 + timedelta(days=3))
    assert st.current_step == 4
    assert result.waiting == ["paused at step 4 until annotated ptm.dev/promote=true"]
    assert result.requeue_after is None
    assert result.consume_annotations == []
    assert st.canary_revision == CANARY


@pytest.mark.parametrize("value", ["true", "True", "TRUE"])
def test_promote_annotation_promotes_and_is_consumed(value: str) -> None:
    m = model(st=status(currentStep=4, stepStartedAt=T0.isoformat()), annotations={PROMOTE_ANNOTATION: value})
    result, st = step(m, Observed(deployments=canary_ready(4)))
    assert result.consume_annotations == [PROMOTE_ANNOTATION]
    assert result.stable == CANARY
    assert result.events[-1][:2] == ("Normal", "Promoted")
    assert "ptm.dev/promote" in result.events[-1][2]
    assert state(st, CANARY) is RevisionState.STABLE
    assert state(st, STABLE) is RevisionState.SUPERSEDED


@pytest.mark.parametrize("value", ["false", "", "yes"])
def test_other_annotation_values_do_nothing(value: str) -> None:
    m = model(
        st=status(currentStep=4, stepStartedAt=T0.isoformat()),
        annotations={PROMOTE_ANNOTATION: value, ABORT_ANNOTATION: value},
    )
    result, st = step(m, Observed(deployments=canary_ready(4)))
    assert result.consume_annotations == []
    assert (result.stable, st.current_step, st.canary_revision) == (STABLE, 4, CANARY)


def test_spec_paused_holds_at_a_pause_that_is_over() -> None:
    m = model(st=status(currentStep=1, stepStartedAt=T0.isoformat()), paused=True)
    result, st = step(m, Observed(deployments=canary_ready(1)))
    assert st.current_step == 1
    assert st.step_started_at == T0
    assert result.waiting == ["rollout paused at step 1"]


# --- analysis --------------------------------------------------------------------------------------


def good(requests: float = 200) -> Sample:
    return Sample(requests=requests, errors=0, buckets={0.01: requests, INF: requests}, pods=1)


def bad(requests: float = 200) -> Sample:
    return Sample(requests=requests, errors=requests / 10, buckets={0.01: requests, INF: requests}, pods=1)


def at_analysis(
    failures: int = 0, last: datetime | None = None, started: datetime | None = None
) -> PretrainedModel:
    st = status(
        currentStep=2,
        stepStartedAt=(started or NOW - timedelta(seconds=40)).isoformat(),
        analysisFailures=failures,
        canaryWeight=20,
        **({"lastAnalysisAt": last.isoformat()} if last is not None else {}),
    )
    return model(st=st, analysis={"interval": "30s", "failureLimit": 2, "minRequests": 20})


@pytest.mark.parametrize(
    ("samples", "failures_before", "failures_after", "verdict"),
    [
        ({CANARY: good(), STABLE: good()}, 0, 0, "Pass"),
        ({CANARY: good(), STABLE: good()}, 2, 0, "Pass"),  # a pass resets the count
        ({CANARY: bad(), STABLE: good()}, 0, 1, "Fail"),
        ({CANARY: bad(), STABLE: good()}, 1, 2, "Fail"),  # failureLimit 2 failures are tolerated
        ({CANARY: good(5), STABLE: good()}, 1, 1, "Inconclusive"),  # too few requests
        ({}, 1, 1, "Inconclusive"),  # nothing scraped
    ],
)
def test_analysis_measures_and_counts_failures(
    samples: dict[str, Sample], failures_before: int, failures_after: int, verdict: str
) -> None:
    result, st = step(at_analysis(failures_before), Observed(deployments=canary_ready(1), samples=samples))
    assert st.analysis_failures == failures_after
    assert st.last_analysis_at == NOW
    assert st.last_measurement is not None and st.last_measurement.startswith(f"{verdict}: ")
    assert st.current_step == 2  # 2m analysis, 40 s in
    assert result.rolled_back is None
    assert result.requeue_after == REQUEUE
    assert result.waiting == [f"analysis at step 2: 80s left ({st.last_measurement})"]


def test_analysis_requeues_by_the_interval_when_that_comes_first() -> None:
    result, _ = step(at_analysis(), Observed(samples={CANARY: good()}), requeue=300.0)
    assert result.requeue_after == 30.0


def test_one_failure_more_than_the_limit_rolls_back() -> None:
    m = at_analysis(failures=2)
    result, st = step(m, Observed(deployments=canary_ready(1), samples={CANARY: bad(), STABLE: good()}))
    assert result.rolled_back is not None
    reason, message = result.rolled_back
    assert reason == "AnalysisFailed"
    assert message.startswith(
        f"revision {CANARY} rolled back at step 2: analysis failed 3 times: error rate 10.00%"
    )
    assert message.endswith(f"; revision {STABLE} serves")
    assert result.replicas == {STABLE: 4}
    assert result.stable == STABLE
    assert state(st, CANARY) is RevisionState.ROLLED_BACK
    rec = st.revision(CANARY)
    assert rec is not None and rec.state_since == NOW
    assert result.events == [("Warning", "RolledBack", f"revision {CANARY} {rec.message}")]
    assert_canary_cleared(st)


def test_analysis_waits_for_its_interval() -> None:
    last = NOW - timedelta(seconds=10)
    m = at_analysis(failures=1, last=last)
    m.status.last_measurement = "Fail: error rate 10.00% > 1.00%"
    result, st = step(m, Observed(samples={CANARY: good(), STABLE: good()}))
    assert st.last_analysis_at == last  # not measured again
    assert st.analysis_failures == 1
    assert st.last_measurement == "Fail: error rate 10.00% > 1.00%"
    assert result.waiting == ["analysis at step 2: 80s left (Fail: error rate 10.00% > 1.00%)"]


def test_analysis_step_passes_when_its_duration_is_over() -> None:
    m = at_analysis(failures=1, started=NOW - timedelta(minutes=2))
    result, st = step(m, Observed(deployments=canary_ready(1), samples={CANARY: good(), STABLE: good()}))
    assert st.current_step == 3  # on to setWeight 50, which waits for 4 canary pods
    assert st.step_started_at == NOW
    assert result.replicas == {CANARY: 4, STABLE: 4}
    assert st.canary_weight == 50


def test_analysis_uses_the_stable_sample_for_the_latency_ratio() -> None:
    slow = Sample(requests=200, buckets={0.01: 100, 0.5: 200, INF: 200}, pods=1)
    _, st = step(at_analysis(), Observed(samples={CANARY: slow, STABLE: good()}))
    assert st.analysis_failures == 1
    assert st.last_measurement is not None and "x stable 10 ms" in st.last_measurement


@pytest.mark.parametrize(
    ("canary_revision", "current_step", "needed"),
    [
        (None, None, False),
        (CANARY, None, False),
        (CANARY, 0, True),  # setWeight, an analysis step ahead
        (CANARY, 1, True),  # pause that may end into the analysis step in the same round
        (CANARY, 2, True),  # analysis
        (CANARY, 4, False),
        (CANARY, 5, False),  # past the last step
        (None, 2, False),
    ],
)
def test_needs_samples_while_an_analysis_step_is_ahead(
    canary_revision: str | None, current_step: int | None, needed: bool
) -> None:
    st = status()
    st["canaryRevision"] = canary_revision
    st["currentStep"] = current_step
    assert needs_samples(model(st=st)) is needed


# --- abort, crash loops, progress deadline ---------------------------------------------------------


def test_abort_annotation_rolls_back_and_is_consumed() -> None:
    m = model(st=status(currentStep=3, stepStartedAt=T0.isoformat()), annotations={ABORT_ANNOTATION: "true"})
    result, st = step(m, Observed(deployments=canary_ready(4)))
    assert result.consume_annotations == [ABORT_ANNOTATION]
    assert result.rolled_back is not None and result.rolled_back[0] == "Aborted"
    assert "rolled back at step 3: aborted by the ptm.dev/abort annotation" in result.rolled_back[1]
    assert result.replicas == {STABLE: 4}
    assert state(st, CANARY) is RevisionState.ROLLED_BACK
    assert st.remediations == []  # a person acted, not the operator
    assert_canary_cleared(st)


def test_abort_wins_over_promote() -> None:
    m = model(
        st=status(currentStep=4, stepStartedAt=T0.isoformat()),
        annotations={ABORT_ANNOTATION: "true", PROMOTE_ANNOTATION: "true"},
    )
    result, st = step(m)
    assert result.stable == STABLE
    assert state(st, CANARY) is RevisionState.ROLLED_BACK


def crashing(revision: str = CANARY, restarts: int = 3, reason: str = "CrashLoopBackOff") -> PodObservation:
    return PodObservation(
        name=f"minilm-{revision}-7c9d-x2x4q",
        revision=revision,
        phase="Running",
        waiting_reason=reason,
        restarts=restarts,
        last_termination_reason="OOMKilled",
    )


@pytest.mark.parametrize(
    ("pod", "threshold", "rolls_back"),
    [
        (crashing(restarts=3), 3, True),
        (crashing(restarts=2), 3, False),
        (crashing(restarts=2), 2, True),
        (crashing(restarts=0, reason="ImagePullBackOff"), 3, True),  # never heals by waiting
        (crashing(restarts=0, reason="CreateContainerConfigError"), 3, True),
        (crashing(restarts=9, reason="ContainerCreating"), 3, False),
        (crashing(revision=STABLE, restarts=9), 3, False),  # the stable's trouble is not the canary's
    ],
)
def test_crash_looping_canary_pods_roll_back_as_a_remediation(
    pod: PodObservation, threshold: int, rolls_back: bool
) -> None:
    m = model(
        st=status(currentStep=1, stepStartedAt=NOW.isoformat()),
        remediation={"rollbackOnCrashLoop": {"restartThreshold": threshold}},
    )
    result, st = step(m, Observed(deployments=canary_ready(1), pods=[pod]))
    if not rolls_back:
        assert result.rolled_back is None
        assert st.remediations == []
        assert st.canary_revision == CANARY
        return
    assert result.rolled_back is not None
    assert result.rolled_back[0] == pod.waiting_reason
    message = (
        f"pod {pod.name} is in {pod.waiting_reason} ({pod.restarts} restarts, last terminated: OOMKilled)"
    )
    assert message in result.rolled_back[1]
    assert st.remediations == [
        RemediationRecord(
            time=NOW,
            action=RemediationAction.ROLLBACK,
            reason=str(pod.waiting_reason),
            revision=CANARY,
            message=message,
        )
    ]
    assert state(st, CANARY) is RevisionState.ROLLED_BACK
    assert result.replicas == {STABLE: 4}


def test_crash_loop_rollback_can_be_switched_off() -> None:
    m = model(
        st=status(currentStep=1, stepStartedAt=NOW.isoformat()),
        remediation={"rollbackOnCrashLoop": {"enabled": False}},
    )
    result, st = step(m, Observed(pods=[crashing(restarts=50)]))
    assert result.rolled_back is None
    assert st.remediations == []
    assert state(st, CANARY) is RevisionState.CANARY


def test_remediation_history_is_bounded() -> None:
    old = [
        RemediationRecord(
            time=T0 + timedelta(minutes=i), action=RemediationAction.RESTART_POD, reason="NotReady"
        ).wire()
        for i in range(3)
    ]
    m = model(
        st=status(currentStep=1, stepStartedAt=NOW.isoformat(), remediations=old),
        remediation={"historyLimit": 3},
    )
    _, st = step(m, Observed(pods=[crashing()]))
    assert len(st.remediations) == 3
    assert [r.time for r in st.remediations] == [T0 + timedelta(minutes=1), T0 + timedelta(minutes=2), NOW]
    assert st.remediations[-1].action is RemediationAction.ROLLBACK


UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"


@pytest.mark.parametrize(("waited", "rolls_back"), [(599, False), (600, False), (601, True)])
def test_progress_deadline_rolls_back_with_the_schedulers_message(waited: int, rolls_back: bool) -> None:
    started = NOW - timedelta(seconds=waited)
    m = model(st=status(currentStep=3, stepStartedAt=started.isoformat()), progressDeadlineSeconds=600)
    pods = [
        PodObservation(name="minilm-c-1", revision=CANARY, phase="Running", ready=True),
        PodObservation(name="minilm-c-2", revision=CANARY, unschedulable=UNSCHEDULABLE),
    ]
    result, st = step(m, Observed(deployments=canary_ready(1, replicas=4), pods=pods))
    if not rolls_back:
        assert result.rolled_back is None
        assert st.current_step == 3
        assert result.waiting == [f"1/4 canary pods of revision {CANARY} ready (step 3, setWeight 50)"]
        return
    assert result.rolled_back is not None
    assert result.rolled_back[0] == "ProgressDeadlineExceeded"
    assert (
        f"rolled back at step 3: 1/4 canary pods ready after {waited}s > progressDeadlineSeconds 600 ({UNSCHEDULABLE})"
        in result.rolled_back[1]
    )
    assert state(st, CANARY) is RevisionState.ROLLED_BACK
    assert st.remediations == []


# --- promotion -------------------------------------------------------------------------------------


def test_recreate_promotes_at_once() -> None:
    m = model(strategy="Recreate")
    result, st = step(m)
    assert result.stable == CANARY
    assert state(st, CANARY) is RevisionState.STABLE
    assert state(st, STABLE) is RevisionState.SUPERSEDED
    assert result.progressing == ("Promoted", f"revision {CANARY} replaced {STABLE} (strategy Recreate)")
    assert [e[1] for e in result.events] == ["CanaryStarted", "Promoted"]
    assert_canary_cleared(st)


def test_passing_the_last_step_promotes() -> None:
    m = model(
        steps=[{"setWeight": 50}], st=status(currentStep=0, stepStartedAt=T0.isoformat(), canaryWeight=50)
    )
    m.status.last_measurement = "Pass: error rate 0.00%"
    result, st = step(m, Observed(deployments=canary_ready(4)))
    assert result.stable == CANARY
    assert result.replicas == {CANARY: 4, STABLE: 4}  # the old one keeps its pods for scaleDownDelaySeconds
    assert result.events == [
        ("Normal", "Promoted", f"revision {CANARY} promoted to stable (all 1 steps passed)")
    ]
    assert result.progressing is not None and result.progressing[0] == "Promoted"
    for revision, new_state in ((CANARY, RevisionState.STABLE), (STABLE, RevisionState.SUPERSEDED)):
        rec = st.revision(revision)
        assert rec is not None and rec.state is new_state and rec.state_since == NOW
    assert_canary_cleared(st)


def test_autoscaled_canary_leaves_the_stable_to_the_hpa() -> None:
    m = model(serving={"autoscaling": {"minReplicas": 2, "maxReplicas": 10}})
    deps = {STABLE: DeploymentObservation(name="s", revision=STABLE, replicas=6, ready_replicas=6)}
    result, st = step(m, Observed(deployments=deps))
    assert result.replicas == {CANARY: 1, STABLE: None}
    assert st.canary_weight == 14  # 1 of 7 pods
    promoted, _ = step(
        model(steps=[], serving={"autoscaling": {"minReplicas": 2, "maxReplicas": 10}}),
        Observed(deployments=deps),
    )
    assert promoted.replicas == {CANARY: None, STABLE: 6}


# --- bugs found while writing these tests (see the report) ---------------------------------------


def test_spec_paused_does_not_advance_past_a_ready_set_weight_step() -> None:
    """rollout.paused: 'Hold the rollout at its current step (... nothing advances)'."""
    m = model(st=status(currentStep=0, stepStartedAt=T0.isoformat()), paused=True)
    _, st = step(m, Observed(deployments=canary_ready(1)))
    assert st.current_step == 0


def test_spec_paused_keeps_analysis_running() -> None:
    """rollout.paused: '(analysis keeps running; nothing advances)'."""
    m = at_analysis(failures=0)
    m.spec.rollout.paused = True
    _, st = step(m, Observed(samples={CANARY: bad(), STABLE: good()}))
    assert st.last_analysis_at == NOW
    assert st.analysis_failures == 1


def test_max_actions_per_hour_zero_disables_the_crash_loop_rollback() -> None:
    """remediation.maxActionsPerHour: 'Rate limit over all actions ...; 0 disables remediation.'"""
    m = model(
        st=status(currentStep=1, stepStartedAt=NOW.isoformat()),
        remediation={"maxActionsPerHour": 0},
    )
    result, st = step(m, Observed(pods=[crashing(restarts=10)]))
    assert st.remediations == []
    assert result.rolled_back is None
