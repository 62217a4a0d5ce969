"""Planning: (model, observed children, now) -> what to apply, delete, report and when to look again.

Pure: no kopf, no Kubernetes client. Handlers and timers call `plan()` with what `kube.observe()`
read and carry out the result, so every decision here is unit-tested without a cluster, and a
restarted operator recomputes the same plan from the resource's status and its children.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ptm_operator.api import (
    ArtifactStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    EndpointStatus,
    PretrainedModel,
    PretrainedModelStatus,
    RevisionState,
    RevisionStatus,
    RolloutStrategy,
    TrafficRoutingType,
    UpdatePolicyType,
    duration_seconds,
)
from ptm_operator.builders import jobs, serving
from ptm_operator.builders.store import Store
from ptm_operator.conditions import set_condition, with_ready
from ptm_operator.observed import (
    BAD_WAITING,
    Observed,
    PodObservation,
)
from ptm_operator.remediation import effective_memory_limit, remediate
from ptm_operator.revision import revision_of
from ptm_operator.rollout import step_rollout
from ptm_operator.settings import Settings
from ptm_runtime.report import (
    EXIT_INVALID,
    EXIT_VALIDATION_FAILED,
    Candidate,
    Failure,
    Report,
    SourceDigest,
    read_termination_message,
)

#: Revisions still on their way to an artifact.
IN_CONVERSION = frozenset({RevisionState.PENDING, RevisionState.CONVERTING})
#: Revisions that have a usable artifact.
SERVABLE = frozenset(
    {RevisionState.VALIDATED, RevisionState.STABLE, RevisionState.CANARY, RevisionState.SUPERSEDED}
)
#: What spec.revision may pin: any revision with an artifact, a rolled-back one included.
PINNABLE = SERVABLE | {RevisionState.ROLLED_BACK}


# --- what to do ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Deletion:
    api_version: str
    kind: str
    name: str


@dataclass
class Plan:
    apply: list[dict[str, Any]]
    delete: list[Deletion]
    status: PretrainedModelStatus
    events: list[Event]
    requeue_after: float | None
    waiting_for: str = ""
    consume_annotations: list[str] = field(default_factory=list)
    """Annotations acted on (ptm.dev/promote, ptm.dev/abort), to be removed."""
    route: tuple[str, list[dict[str, Any]]] | None = None
    """(HTTPRoute name, backendRefs) for gatewayAPI routing: the model's rules get these refs."""
    timed: bool = False
    """The wait is for a time (a pause, an analysis interval, a scale-down delay), not for a
    child to change: only then must the operator wake itself; children's events wake it otherwise."""

    def status_patch(self, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole status in wire form, as a merge patch over `previous`.

        Lists are replaced whole, so they are sent complete; fields cleared since `previous`
        (e.g. canaryRevision after a promotion) are sent as null, or a merge patch keeps them.
        """
        patch: dict[str, Any] = self.status.wire()
        for key in previous or {}:
            if key not in patch and key != "kopf":
                patch[key] = None
        return patch


# --- helpers ---------------------------------------------------------------------------------------


def termination_record(message: str | None) -> Report | Failure | SourceDigest | None:
    """The converter's Report or Failure from a termination message; None if it is neither."""
    if not message:
        return None
    try:
        return read_termination_message(message)
    except (ValueError, ValidationError):
        return None


def candidates_summary(candidates: list[Candidate]) -> str:
    """'fp16: cosine 0.91 < 0.99; fp32: passed' — the candidates table in one line."""
    return "; ".join(
        f"{c.precision.value}: {'passed' if c.passed else (c.reason or 'failed')}" for c in candidates
    )


def pod_problems(pods: list[PodObservation], revision: str) -> tuple[str, str] | None:
    """(reason, message) for the worst trouble of a revision's pods, or None.

    Unschedulable pods name the scheduler's reason (e.g. Insufficient nvidia.com/gpu), so a
    cluster autoscaler that is adding a GPU node is visible in status rather than silent.
    """
    mine = [p for p in pods if p.revision == revision]
    crashing = [p for p in mine if p.waiting_reason in BAD_WAITING]
    if crashing:
        reasons = Counter(p.waiting_reason for p in crashing)
        reason, _ = reasons.most_common(1)[0]
        oom = [p for p in crashing if p.last_termination_reason == "OOMKilled"]
        detail = f" (last terminated: OOMKilled in {len(oom)})" if oom else ""
        names = ", ".join(sorted(p.name for p in crashing)[:3])
        return str(reason), f"{len(crashing)} serving pod(s) in {reason}{detail}: {names}"
    pending = [p for p in mine if p.unschedulable]
    if pending:
        msg = pending[0].unschedulable or ""
        return "Unschedulable", f"{len(pending)} pod(s) wait for resources: {msg}"
    return None


def endpoint(model: PretrainedModel) -> EndpointStatus:
    ns = model.metadata.namespace or "default"
    host = f"{serving.service_name(model)}.{ns}.svc"
    spec = model.spec.serving
    return EndpointStatus(
        rest=f"http://{host}:{spec.port}" if "rest" in spec.protocols else None,
        grpc=f"{host}:{spec.grpc_port}" if "grpc" in spec.protocols else None,
    )


def _upsert(revisions: list[RevisionStatus], record: RevisionStatus) -> list[RevisionStatus]:
    out = [r for r in revisions if r.revision != record.revision]
    out.append(record)
    return out


def _trim(revisions: list[RevisionStatus], keep: int, protected: set[str]) -> list[RevisionStatus]:
    """Keep the newest `keep` revisions plus any that serve."""
    if len(revisions) <= keep:
        return revisions
    droppable = [r for r in revisions if r.revision not in protected]
    drop = {r.revision for r in droppable[: len(revisions) - keep]}
    return [r for r in revisions if r.revision not in drop]


# --- the plan --------------------------------------------------------------------------------------


#: Reasons that mean "on the way", not "went wrong": no Event for them.
PROGRESS_REASONS = frozenset({"Converting", "Deploying", "Starting", "NoArtifact", "Reconciling", "Healthy"})


class _Conditions:
    """Collects condition changes and the Events their transitions deserve."""

    def __init__(self, start: list[Condition], generation: int | None, now: datetime) -> None:
        self.items = list(start)
        self.before = {c.type: c.status for c in start}
        self.generation = generation
        self.now = now
        self.extra_events: list[Event] = []
        self.touched: set[str] = set()
        """Condition types set during this plan (a stale True from an earlier round is not)."""

    def set(
        self, type_: ConditionType, status: ConditionStatus | bool, reason: str, message: str = ""
    ) -> None:
        self.touched.add(type_.value)
        self.items = set_condition(
            self.items, type_, status, reason, message, observed_generation=self.generation, now=self.now
        )

    def finish(self) -> tuple[list[Condition], list[Event]]:
        self.items = with_ready(self.items, observed_generation=self.generation, now=self.now)
        events = list(self.extra_events)
        for c in self.items:
            if self.before.get(c.type) == c.status:
                continue
            bad = (c.type == ConditionType.DEGRADED.value and c.status is ConditionStatus.TRUE) or (
                c.type != ConditionType.DEGRADED.value and c.status is ConditionStatus.FALSE
            )
            if (
                c.type in (ConditionType.PROGRESSING.value, ConditionType.READY.value)
                or c.reason in PROGRESS_REASONS
            ):
                continue  # progress is visible in status and Ready only summarizes: events are for outcomes
            if c.status is ConditionStatus.UNKNOWN:
                continue
            events.append(
                Event("Warning" if bad else "Normal", c.reason, f"{c.type}={c.status.value}: {c.message}")
            )
        return self.items, events


def plan(model: PretrainedModel, observed: Observed, now: datetime, settings: Settings, store: Store) -> Plan:
    """Decide everything for one resource at one moment."""
    spec = model.spec
    status = model.status.model_copy(deep=True)
    cond = _Conditions(status.conditions, model.metadata.generation, now)
    manifests: list[dict[str, Any]] = []
    deletions: list[Deletion] = []
    waiting: list[str] = []
    namespace = model.metadata.namespace or "default"
    name = model.metadata.name

    # 0. updatePolicy Poll: the source's digest is part of the revision.
    polling = spec.source.update_policy.type is UpdatePolicyType.POLL and not spec.revision
    if polling:
        _poll_source(model, observed, status, now, settings, store, manifests, deletions, cond)
        if status.source_digest is None:
            waiting.append("the first digest of the source (updatePolicy Poll)")

    # 1. Which revision should serve.
    built = revision_of(spec, status.source_digest if polling else None)
    pinned = spec.revision
    desired = pinned or built
    record = status.revision(desired)
    if pinned and (record is None or record.state not in PINNABLE):
        cond.set(
            ConditionType.DEGRADED,
            True,
            "RevisionNotFound",
            f"spec.revision {pinned} is not a converted revision in status.revisions; "
            f"known: {', '.join(r.revision for r in status.revisions) or 'none'}",
        )
        record = None
    elif polling and status.source_digest is None:
        record = None  # nothing to convert before the source's digest is known
        cond.set(
            ConditionType.CONVERTED, False, "PollingSource", "reading the source's digest before converting"
        )
    elif record is None:
        record = RevisionStatus(
            revision=desired,
            state=RevisionState.PENDING,
            created=now,
            source_digest=status.source_digest if polling else None,
        )
        status.revisions = _upsert(status.revisions, record)

    # 2. Conversion of the desired revision.
    if record is not None and record.state in IN_CONVERSION:
        job = observed.jobs.get(desired)
        if job is None:
            manifests.append(jobs.conversion_job(model, desired, settings, store))
            record.state = RevisionState.CONVERTING
            # The words the running Job's rounds use: its appearance on the watch is no status write.
            job_name = jobs.job_name(model, desired)
            cond.set(ConditionType.CONVERTED, False, "Converting", f"conversion Job {job_name} is running")
            cond.set(ConditionType.PROGRESSING, True, "Converting", f"converting revision {desired}")
            waiting.append(f"conversion of revision {desired}")
        elif job.succeeded:
            report = termination_record(job.termination_message)
            if not isinstance(report, Report):
                record.state = RevisionState.FAILED
                record.reason = "ReportMissing"
                record.message = "the conversion Job succeeded but its pod left no readable report"
                cond.set(ConditionType.CONVERTED, False, "ReportMissing", record.message)
            else:
                _record_report(record, report)
                cond.set(
                    ConditionType.CONVERTED,
                    True,
                    "Converted",
                    f"revision {desired}: {report.exporter or 'onnx'} opset {report.opset}",
                )
                table = candidates_summary(report.candidates)
                if report.validation_passed:
                    record.state = RevisionState.VALIDATED
                    cond.set(
                        ConditionType.VALIDATED,
                        True,
                        "Validated",
                        f"revision {desired}: {report.precision.value} passed ({table})",
                    )
                else:  # failurePolicy Warn: served, but said so
                    record.state = RevisionState.VALIDATED
                    record.message = f"validation failed, served anyway (failurePolicy Warn): {table}"
                    cond.set(
                        ConditionType.VALIDATED,
                        False,
                        "ValidationWarned",
                        f"revision {desired}: {record.message}",
                    )
        elif job.failed:
            failure = termination_record(job.termination_message)
            record.state = RevisionState.FAILED
            detail = job.termination_message or job.failure_message or job.failure_reason
            if isinstance(failure, Failure):
                table = candidates_summary(failure.candidates)
                detail = f"{failure.message}" + (f" ({table})" if table else "")
            validation = job.exit_code == EXIT_VALIDATION_FAILED or (
                isinstance(failure, Failure) and failure.reason == "ValidationFailed"
            )
            if validation:
                record.reason = "ValidationFailed"
                record.message = f"validation failed: {detail[-1500:]}"
                cond.set(ConditionType.CONVERTED, True, "Converted", f"revision {desired} converted")
                cond.set(
                    ConditionType.VALIDATED,
                    False,
                    "ValidationFailed",
                    f"revision {desired}: {record.message}",
                )
            elif job.exit_code == EXIT_INVALID or (isinstance(failure, Failure) and failure.permanent):
                reason = failure.reason if isinstance(failure, Failure) else "InvalidSource"
                record.reason = reason
                record.message = f"{reason}: {detail[-1500:]}"
                cond.set(ConditionType.CONVERTED, False, reason, f"revision {desired}: {record.message}")
            else:
                record.reason = "ConversionFailed"
                record.message = f"conversion failed ({job.failure_reason or 'Failed'}): {detail[-1500:]}"
                cond.set(
                    ConditionType.CONVERTED,
                    False,
                    "ConversionFailed",
                    f"revision {desired}: {record.message}",
                )
        else:
            record.state = RevisionState.CONVERTING
            cond.set(ConditionType.CONVERTED, False, "Converting", f"conversion Job {job.name} is running")
            cond.set(ConditionType.PROGRESSING, True, "Converting", f"converting revision {desired}")
            waiting.append(f"conversion Job {job.name}")
        status.revisions = _upsert(status.revisions, record)
    elif record is not None and record.state is RevisionState.FAILED:
        reason = record.reason or "ConversionFailed"
        if reason == "ValidationFailed":
            cond.set(ConditionType.VALIDATED, False, reason, f"revision {desired}: {record.message}")
        else:
            cond.set(ConditionType.CONVERTED, False, reason, f"revision {desired}: {record.message}")

    # 3. Serving: the stable revision, and the desired one rolling in as a canary when it differs.
    stable = status.stable_revision
    stable_record = status.revision(stable) if stable else None
    if stable_record is None or stable_record.state not in SERVABLE:
        stable = None
    servable = PINNABLE if pinned else SERVABLE
    candidate = desired if record is not None and record.state in servable else None
    if stable is None and candidate is not None:
        stable = candidate
    autoscaled = spec.serving.autoscaling is not None
    route: tuple[str, list[dict[str, Any]]] | None = None
    replicas: dict[str, int | None] = {}
    retired: set[str] = set()
    route_weights: dict[str, int] | None = None
    requeue: float | None = None
    consume: list[str] = []
    rolling = stable is not None and candidate is not None and candidate != stable
    if rolling:
        assert stable is not None and candidate is not None
        rolled = step_rollout(model, observed, status, stable, candidate, now, settings.requeue_seconds)
        stable = rolled.stable
        replicas.update(rolled.replicas)
        waiting.extend(rolled.waiting)
        requeue = rolled.requeue_after
        consume = rolled.consume_annotations
        retired = rolled.retire
        route_weights = rolled.route_weights
        for ev in rolled.events:
            cond.extra_events.append(Event(*ev))
        if rolled.progressing is not None:
            cond.set(ConditionType.PROGRESSING, True, *rolled.progressing)
            if rolled.progressing[0] == "Promoted":
                waiting.append(f"revision {stable} to take over")
        if rolled.rolled_back is not None:
            cond.set(ConditionType.DEGRADED, True, "RolledBack", rolled.rolled_back[1])
    else:
        if status.canary_revision is not None:  # the spec moved away from the canary
            status.canary_revision = None
            status.current_step = None
            status.canary_weight = None
            status.step_started_at = None
        if model.promote_requested or model.abort_requested:
            consume = ["ptm.dev/promote", "ptm.dev/abort"]
    remedy = remediate(model, observed, status, now) if stable is not None and not rolling else None
    if remedy is not None:
        for ev in remedy.events:
            cond.extra_events.append(Event(*ev))
        if remedy.degraded is not None:
            cond.set(ConditionType.DEGRADED, True, *remedy.degraded)
        deletions.extend(Deletion("v1", "Pod", pod) for pod in remedy.delete_pods)
        if remedy.rollback_to is not None and stable is not None:
            failed = status.revision(stable)
            if failed is not None:
                failed.state = RevisionState.ROLLED_BACK
                failed.state_since = now
                failed.reason = "CrashLoopBackOff"
                failed.message = f"rolled back: {remedy.degraded[1] if remedy.degraded else 'crash loop'}"
            replicas.pop(stable, None)
            stable = remedy.rollback_to
            back = status.revision(stable)
            if back is not None:
                back.state = RevisionState.STABLE
                back.state_since = now
            status.stable_revision = stable
            waiting.append(f"revision {stable} to take over again")
    if stable is not None:
        replicas.setdefault(stable, None if autoscaled else spec.serving.replicas)
    # A superseded revision keeps its pods for scaleDownDelaySeconds after a canary promotion
    # (Recreate replaces at once: no second set of GPUs).
    keep_superseded = spec.rollout.strategy is not RolloutStrategy.RECREATE
    for rec in status.revisions:
        if (
            rec.state is RevisionState.SUPERSEDED
            and rec.revision in observed.deployments
            and rec.revision not in replicas
            and rec.revision not in retired
            and keep_superseded
        ):
            left = spec.rollout.scale_down_delay_seconds - (
                (now - rec.state_since).total_seconds() if rec.state_since else 1e9
            )
            if left > 0:
                replicas[rec.revision] = observed.deployments[rec.revision].replicas
                requeue = min(requeue or left, left)
    if (
        record is not None
        and record.state is RevisionState.FAILED
        and stable is not None
        and candidate is None
    ):
        cond.set(
            ConditionType.DEGRADED,
            True,
            "UpdateFailed",
            f"revision {desired} failed ({record.message[:300]}); revision {stable} keeps serving",
        )
    if (
        record is not None
        and record.state is RevisionState.ROLLED_BACK
        and candidate is None
        and stable is not None
    ):
        cond.set(
            ConditionType.DEGRADED,
            True,
            "RolledBack",
            f"revision {desired} {record.message}; revision {stable} serves",
        )

    serving_revisions = list(replicas)
    for rev, count in replicas.items():
        served = status.revision(rev)
        assert served is not None and served.artifact is not None
        manifests.append(
            serving.serving_deployment(
                model,
                rev,
                store.artifact_dir(namespace, name, rev),
                count,
                settings,
                store,
                size_bytes=served.artifact.size_bytes,
                memory_limit=effective_memory_limit(model),
            )
        )
    for rev, dep in observed.deployments.items():
        if rev not in serving_revisions:
            deletions.append(Deletion("apps/v1", "Deployment", dep.name))

    # The Service and the PDB select the model's serving pods, whichever revision: they exist
    # from the first reconcile, so the endpoint's name resolves from the start and a Service's
    # creation (ClusterIP allocation: 3 s at N=1000 on the benchmark cluster) overlaps the
    # conversion instead of delaying the first Deployment.
    manifests.append(serving.service(model))
    manifests.append(serving.pod_disruption_budget(model))
    if stable is not None:
        stable_record = status.revision(stable)
        if stable_record is not None and stable_record.state is not RevisionState.STABLE:
            stable_record.state = RevisionState.STABLE
            stable_record.state_since = now
        status.stable_revision = stable
        auto = spec.serving.autoscaling
        keda_missing = auto is not None and auto.keda is not None and not observed.keda_available
        hpa = serving.horizontal_pod_autoscaler(model, stable, ignore_keda=keda_missing)
        if hpa is not None:
            manifests.append(hpa)
        if keda_missing:
            cond.extra_events.append(
                Event(
                    "Warning",
                    "KedaMissing",
                    "autoscaling.keda is set but KEDA is not installed; using an HPA",
                )
            )
        elif observed.keda_available:
            scaled = serving.keda_scaled_object(model, stable)
            if scaled is not None:
                manifests.append(scaled)
        policy = serving.network_policy(model)
        if policy is not None:
            manifests.append(policy)
        routing = spec.rollout.traffic_routing
        if routing.type is TrafficRoutingType.GATEWAY_API and routing.http_route is not None:
            manifests.extend(serving.revision_service(model, rev) for rev in serving_revisions)
            weights = route_weights or {stable: 100}
            route = (routing.http_route.name, serving.route_backends(model, weights))
        status.endpoint = endpoint(model)
        _availability(model, observed, stable, cond, waiting)
    elif not any(c.type == ConditionType.AVAILABLE.value for c in cond.items):
        cond.set(ConditionType.AVAILABLE, False, "NoArtifact", "no validated revision to serve yet")
    elif record is not None and record.state is RevisionState.FAILED:
        cond.set(
            ConditionType.AVAILABLE,
            False,
            "NoArtifact",
            f"revision {desired} failed and no earlier revision serves",
        )

    # 4. Facts and summary.
    status.replicas = sum(d.replicas for r, d in observed.deployments.items() if r in serving_revisions)
    status.ready_replicas = sum(
        ready_pods(observed, r) for r in observed.deployments if r in serving_revisions
    )
    protected = {r for r in (stable, status.canary_revision, desired) if r}
    status.revisions = _trim(status.revisions, spec.rollout.revision_history_limit, protected)
    if not waiting:
        cond.set(
            ConditionType.PROGRESSING,
            False,
            "Settled",
            f"revision {stable or desired} is {'serving' if stable else 'not serving'}",
        )
    # Degraded clears only when nothing this round said otherwise and the pods are fine.
    if ConditionType.DEGRADED.value not in cond.touched and _no_trouble(observed, serving_revisions):
        cond.set(ConditionType.DEGRADED, False, "Healthy", "no trouble observed")
    status.observed_generation = model.metadata.generation
    status.conditions, events = cond.finish()
    return Plan(
        apply=manifests,
        delete=deletions,
        status=status,
        events=events,
        requeue_after=min(requeue or settings.requeue_seconds, settings.requeue_seconds)
        if waiting or requeue
        else None,
        waiting_for="; ".join(waiting) or "scale-down of a superseded revision",
        timed=requeue is not None,
        consume_annotations=consume,
        route=route,
    )


def _poll_source(
    model: PretrainedModel,
    observed: Observed,
    status: PretrainedModelStatus,
    now: datetime,
    settings: Settings,
    store: Store,
    manifests: list[dict[str, Any]],
    deletions: list[Deletion],
    cond: _Conditions,
) -> None:
    """Read finished source polls, start the next one when due, keep only the newest Job."""
    finished = sorted((j for j in observed.polls if j.succeeded or j.failed), key=lambda j: j.created)
    for job in finished:
        found = termination_record(job.termination_message)
        if isinstance(found, SourceDigest):
            if status.source_digest is not None and found.source_digest != status.source_digest:
                cond.extra_events.append(
                    Event(
                        "Normal",
                        "SourceChanged",
                        f"source digest {found.source_digest[:12]}: a new revision follows",
                    )
                )
            status.source_digest = found.source_digest
        elif job is finished[-1] and job.failed:
            detail = (
                found.message if isinstance(found, Failure) else (job.failure_message or job.failure_reason)
            )
            cond.extra_events.append(
                Event("Warning", "SourcePollFailed", f"polling the source failed: {detail[-300:]}")
            )
    deletions.extend(Deletion("batch/v1", "Job", j.name) for j in finished[:-1])
    active = [j for j in observed.polls if not (j.succeeded or j.failed)]
    interval = duration_seconds(model.spec.source.update_policy.interval)
    due = status.last_poll_at is None or (now - status.last_poll_at).total_seconds() >= interval
    if due and not active:
        nonce = format(int(now.timestamp()), "x")
        manifests.append(jobs.source_poll_job(model, nonce, settings, store))
        status.last_poll_at = now


def _no_trouble(observed: Observed, revisions: list[str]) -> bool:
    return all(pod_problems(observed.pods, r) is None for r in revisions)


def _record_report(record: RevisionStatus, report: Report) -> None:
    record.artifact = ArtifactStatus(
        uri=report.artifact_uri, sha256=report.sha256, size_bytes=report.size_bytes
    )
    record.precision = report.precision
    record.metrics = report.metrics
    record.source_digest = report.source_sha256 or record.source_digest


def _availability(
    model: PretrainedModel, observed: Observed, stable: str, cond: _Conditions, waiting: list[str]
) -> None:
    dep = observed.deployments.get(stable)
    problem = pod_problems(observed.pods, stable)
    if dep is None:
        cond.set(
            ConditionType.AVAILABLE,
            False,
            "Deploying",
            f"creating the serving Deployment for revision {stable}",
        )
        waiting.append(f"Deployment of revision {stable}")
        return
    if problem is not None:
        reason, message = problem
        cond.set(ConditionType.AVAILABLE, False, reason, message)
        cond.set(ConditionType.DEGRADED, True, reason, message)
        waiting.append(message)
        return
    ready = ready_pods(observed, stable)
    if ready < 1:
        cond.set(
            ConditionType.AVAILABLE,
            False,
            "Starting",
            f"0/{dep.replicas} serving pods of revision {stable} ready",
        )
        waiting.append(f"serving pods of revision {stable}")
        return
    cond.set(
        ConditionType.AVAILABLE,
        True,
        "Serving",
        f"revision {stable}: {ready}/{dep.replicas} pods ready",
    )
    if ready < dep.replicas:
        waiting.append(f"{dep.replicas - ready} more pods of revision {stable}")


def ready_pods(observed: Observed, revision: str) -> int:
    """Ready serving pods of a revision: its Deployment's readyReplicas, or the ready pods
    observed when more (the Deployment's count follows a pod's Ready only after the ReplicaSet
    and Deployment controllers' status writes; terminating pods are never ready)."""
    dep = observed.deployments.get(revision)
    counted = dep.ready_replicas if dep is not None else 0
    return max(counted, sum(1 for p in observed.pods if p.revision == revision and p.ready))
