"""The canary state machine: steps, weights by replica ratio, analysis, promotion, rollback.

Pure, like planning.py which calls it. All state lives in the resource's status
(canaryRevision, currentStep, stepStartedAt, analysisFailures, ...), so an operator killed
mid-canary resumes at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from ptm_operator.analysis import Verdict, judge
from ptm_operator.api import (
    PretrainedModel,
    PretrainedModelStatus,
    RemediationAction,
    RemediationRecord,
    RevisionState,
    RolloutStrategy,
    TrafficRoutingType,
    duration_seconds,
)
from ptm_operator.observed import BAD_WAITING, DeploymentObservation, Observed


@dataclass
class RolloutResult:
    """What the rollout decided this round."""

    stable: str
    replicas: dict[str, int | None] = field(default_factory=dict)
    """Revision -> replicas to apply (None: left to the autoscaler)."""
    events: list[tuple[str, str, str]] = field(default_factory=list)
    """(type, reason, message)."""
    waiting: list[str] = field(default_factory=list)
    requeue_after: float | None = None
    consume_annotations: list[str] = field(default_factory=list)
    progressing: tuple[str, str] | None = None
    """(reason, message) for the Progressing condition while the rollout moves."""
    rolled_back: tuple[str, str] | None = None
    """(reason, message) when the canary was rolled back this round."""
    route_weights: dict[str, int] | None = None
    """Revision -> percent of traffic, for weighted routing (gatewayAPI)."""
    retire: set[str] = field(default_factory=set)
    """Revisions to remove now, without the scale-down delay (Recreate)."""


def canary_replicas(stable_replicas: int, weight: int) -> int:
    """Canary pods so that canary/(stable+canary) comes as close to `weight`% as whole pods allow.

    The stable Deployment keeps its size during the canary (capacity never drops), so the
    canary is added on top: c = s * w / (100 - w), at least one pod.
    """
    s = max(stable_replicas, 1)
    if weight >= 100:
        return s
    return max(1, round(s * weight / (100 - weight)))


def gateway_canary_replicas(stable_replicas: int, weight: int) -> int:
    """With weighted routing the canary only needs its share of the capacity (at least one pod)."""
    return max(1, math.ceil(max(stable_replicas, 1) * weight / 100))


def achieved_weight(stable_replicas: int, canary: int) -> int:
    total = max(stable_replicas, 0) + canary
    return round(100 * canary / total) if total else 0


def desired_replicas(model: PretrainedModel, observed: DeploymentObservation | None) -> int:
    """Fixed replicas, or (with autoscaling) what the HPA set, bounded by min/max."""
    auto = model.spec.serving.autoscaling
    if auto is None:
        return model.spec.serving.replicas
    current = observed.replicas if observed is not None else auto.min_replicas
    return max(auto.min_replicas, min(auto.max_replicas, current or auto.min_replicas))


def stable_size(model: PretrainedModel, observed: Observed, stable: str) -> int:
    """The stable revision's current size: the HPA's choice (at least one pod) when autoscaling,
    else spec.replicas."""
    if model.spec.serving.autoscaling is None:
        return model.spec.serving.replicas
    return max(desired_replicas(model, observed.deployments.get(stable)), 1)


def _elapsed(now: datetime, since: datetime | None) -> float:
    return (now - since).total_seconds() if since is not None else 0.0


def _trouble(model: PretrainedModel, observed: Observed, revision: str) -> tuple[str, str] | None:
    """A crash loop (or image/config error) in the revision's pods, per spec.remediation."""
    policy = model.spec.remediation.rollback_on_crash_loop
    for pod in observed.pods:
        if pod.revision != revision or pod.waiting_reason not in BAD_WAITING:
            continue
        if pod.waiting_reason == "CrashLoopBackOff" and not pod.crash_looping(policy.restart_threshold):
            continue
        detail = f", last terminated: {pod.last_termination_reason}" if pod.last_termination_reason else ""
        return str(
            pod.waiting_reason
        ), f"pod {pod.name} is in {pod.waiting_reason} ({pod.restarts} restarts{detail})"
    return None


def step_rollout(
    model: PretrainedModel,
    observed: Observed,
    status: PretrainedModelStatus,
    stable: str,
    candidate: str,
    now: datetime,
    requeue: float,
) -> RolloutResult:
    """Advance the canary of `candidate` beside `stable` as far as it can go right now."""
    spec = model.spec.rollout
    result = RolloutResult(stable=stable)
    autoscaled = model.spec.serving.autoscaling is not None
    size = stable_size(model, observed, stable)
    rec = status.revision(candidate)
    assert rec is not None
    weighted = spec.traffic_routing.type is TrafficRoutingType.GATEWAY_API
    replicas_for = gateway_canary_replicas if weighted else canary_replicas

    def promote(why: str) -> RolloutResult:
        old = status.revision(stable)
        if old is not None:
            old.state = RevisionState.SUPERSEDED
            old.state_since = now
        rec.state = RevisionState.STABLE
        rec.state_since = now
        _clear(status)
        result.stable = candidate
        result.replicas = {candidate: None if autoscaled else size}
        if spec.strategy is RolloutStrategy.RECREATE:
            result.retire.add(stable)  # replaced at once: no second set of GPUs
        else:
            result.replicas[stable] = size  # keeps serving until scaleDownDelaySeconds passed
        result.events.append(("Normal", "Promoted", f"revision {candidate} promoted to stable ({why})"))
        result.progressing = ("Promoted", f"revision {candidate} replaced {stable} ({why})")
        return result

    def rollback(reason: str, message: str) -> RolloutResult:
        rec.state = RevisionState.ROLLED_BACK
        rec.state_since = now
        rec.reason = reason
        step = status.current_step
        rec.message = (
            f"rolled back at step {step}: {message}" if step is not None else f"rolled back: {message}"
        )
        _clear(status)
        result.replicas = {stable: None if autoscaled else size}
        result.rolled_back = (reason, f"revision {candidate} {rec.message}; revision {stable} serves")
        result.events.append(("Warning", "RolledBack", f"revision {candidate} {rec.message}"))
        return result

    if status.canary_revision != candidate:
        status.canary_revision = candidate
        status.current_step = 0
        status.step_started_at = now
        status.analysis_failures = 0
        status.last_analysis_at = None
        status.last_measurement = None
        status.canary_weight = 0
        rec.state = RevisionState.CANARY
        rec.state_since = now
        result.events.append(("Normal", "CanaryStarted", f"revision {candidate} starts beside {stable}"))
    rec.state = RevisionState.CANARY

    if spec.strategy is RolloutStrategy.RECREATE:
        return promote("strategy Recreate")
    if model.abort_requested:
        result.consume_annotations.append("ptm.dev/abort")
        return rollback("Aborted", "aborted by the ptm.dev/abort annotation")
    trouble = _trouble(model, observed, candidate)
    if (
        trouble is not None
        and model.spec.remediation.rollback_on_crash_loop.enabled
        and not _rate_limited(model, status, now)
    ):
        out = rollback(trouble[0], trouble[1])
        entry = RemediationRecord(
            time=now,
            action=RemediationAction.ROLLBACK,
            reason=trouble[0],
            revision=candidate,
            message=trouble[1],
        )
        status.remediations = [*status.remediations, entry][-model.spec.remediation.history_limit :]
        return out
    if model.promote_requested:
        result.consume_annotations.append("ptm.dev/promote")
        return promote("promoted by the ptm.dev/promote annotation")

    steps = spec.steps
    index = status.current_step or 0
    weight = max([s.set_weight for s in steps[:index] if s.set_weight is not None] or [0])
    dep = observed.deployments.get(candidate)
    ready = dep.ready_replicas if dep is not None else 0

    while index < len(steps):
        step = steps[index]
        if step.set_weight is not None:
            weight = step.set_weight
            want = replicas_for(size, weight)
            result.replicas[candidate] = want
            if ready >= want and _pods_settled(observed, candidate) and spec.paused:
                result.waiting.append(f"rollout paused at step {index}")
                break
            if ready >= want and _pods_settled(observed, candidate):
                index, status.step_started_at = index + 1, now
                continue
            waited = _elapsed(now, status.step_started_at)
            if waited > spec.progress_deadline_seconds:
                pending = next(
                    (p.unschedulable for p in observed.pods if p.revision == candidate and p.unschedulable),
                    None,
                )
                why = f"{ready}/{want} canary pods ready after {waited:.0f}s > progressDeadlineSeconds {spec.progress_deadline_seconds}"
                status.current_step = index
                return rollback("ProgressDeadlineExceeded", why + (f" ({pending})" if pending else ""))
            result.waiting.append(
                f"{ready}/{want} canary pods of revision {candidate} ready (step {index}, setWeight {weight})"
            )
            break
        if spec.paused and step.analysis is None:
            result.waiting.append(f"rollout paused at step {index}")
            break
        if step.pause is not None:
            if step.pause.duration is None:
                result.waiting.append(f"paused at step {index} until annotated ptm.dev/promote=true")
                break
            remaining = duration_seconds(step.pause.duration) - _elapsed(now, status.step_started_at)
            if remaining <= 0:
                index, status.step_started_at = index + 1, now
                continue
            result.waiting.append(f"pause at step {index}: {remaining:.0f}s left")
            result.requeue_after = min(requeue, remaining)
            break
        if step.analysis is not None:
            analysis = spec.analysis
            interval = duration_seconds(analysis.interval)
            if status.last_analysis_at is None or _elapsed(now, status.last_analysis_at) >= interval:
                measured = judge(
                    observed.samples.get(candidate),
                    observed.samples.get(stable),
                    analysis,
                    observed.agreement,
                )
                status.last_analysis_at = now
                status.last_measurement = f"{measured.verdict.value}: {measured.message}"
                if measured.verdict is Verdict.FAIL:
                    status.analysis_failures = (status.analysis_failures or 0) + 1
                    if status.analysis_failures > analysis.failure_limit:
                        status.current_step = index
                        return rollback(
                            "AnalysisFailed",
                            f"analysis failed {status.analysis_failures} times: {measured.message}",
                        )
                elif measured.verdict is Verdict.PASS:
                    status.analysis_failures = 0
            remaining = duration_seconds(step.analysis.duration) - _elapsed(now, status.step_started_at)
            if spec.paused:
                result.waiting.append(f"rollout paused at step {index} (analysis keeps measuring)")
                result.requeue_after = min(requeue, interval)
                break
            if remaining <= 0:
                index, status.step_started_at = index + 1, now
                continue
            result.waiting.append(
                f"analysis at step {index}: {remaining:.0f}s left ({status.last_measurement})"
            )
            result.requeue_after = min(requeue, remaining, interval)
            break

    status.current_step = index
    if index >= len(steps):
        return promote(f"all {len(steps)} steps passed")
    canary_count = result.replicas.get(candidate) or replicas_for(size, max(weight, 1))
    if weight == 0:
        canary_count = 0
    result.replicas[candidate] = canary_count
    result.replicas[stable] = None if autoscaled else size
    status.canary_weight = weight if weighted else achieved_weight(size, canary_count)
    result.route_weights = {stable: 100 - status.canary_weight, candidate: status.canary_weight}
    result.progressing = (
        "Canary",
        f"revision {candidate} at step {index}/{len(steps)}, weight {status.canary_weight}% "
        f"({canary_count} canary + {size} stable pods)",
    )
    return result


def _rate_limited(model: PretrainedModel, status: PretrainedModelStatus, now: datetime) -> bool:
    """True when remediation.maxActionsPerHour actions were already taken in the last hour."""
    recent = [r for r in status.remediations if _elapsed(now, r.time) < 3600]
    return len(recent) >= model.spec.remediation.max_actions_per_hour


def _pods_settled(observed: Observed, revision: str) -> bool:
    return not any(p.unschedulable for p in observed.pods if p.revision == revision)


def _clear(status: PretrainedModelStatus) -> None:
    status.canary_revision = None
    status.current_step = None
    status.canary_weight = None
    status.step_started_at = None
    status.analysis_failures = None
    status.last_analysis_at = None


def needs_samples(model: PretrainedModel) -> bool:
    """Whether this round may run an analysis measurement (so kube.observe should read metrics)."""
    st = model.status
    if st.canary_revision is None or st.current_step is None:
        return False
    # Any step: a pause may end into an analysis step within the same reconcile.
    return any(step.analysis is not None for step in model.spec.rollout.steps[st.current_step :])
