"""The operator's children, reduced to what planning reads, and an in-memory index of them.

Every reconcile used to list a model's Jobs, Deployments and pods from the API server; at a
thousand models those reads were most of the operator's requests and most of its wait. The
watch streams the operator keeps anyway (one per kind, see handlers.py) now feed `ChildIndex`,
and a reconcile assembles `Observed` from it without a request. Only compact records are kept
(a few hundred bytes per child, not the bodies): memory grows with the number of children,
not with the size of their manifests.

Pure: no kopf, no Kubernetes client. `Kube.observe` (kube.py) builds the same records from
LIST responses when there is no index (`ptm plan` against a live cluster), so both paths plan
from identical observations.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Any

from ptm_operator.api import PretrainedModel
from ptm_operator.builders import jobs, serving
from ptm_operator.builders.names import MANAGED_BY, MANAGED_BY_LABEL, MODEL_LABEL, REVISION_LABEL, dns_name
from ptm_operator.observed import DeploymentObservation, JobObservation, PodObservation
from ptm_operator.planning import IN_CONVERSION

COMPONENT_LABEL = "app.kubernetes.io/component"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")

JOB = "Job"
DEPLOYMENT = "Deployment"
POD = "Pod"


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerEnd:
    """How a converter container ended: what planning reads from a Job's pod."""

    exit_code: int | None
    message: str | None
    finished: str
    """finishedAt (RFC 3339, sorts in time order)."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    job: JobObservation
    """Without exit code and termination message: those come from the Job's pods."""
    component: str


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    deployment: DeploymentObservation
    deleting: bool = False


@dataclass(frozen=True, slots=True)
class PodRecord:
    name: str
    component: str
    job_name: str = ""
    """The Job a converter or source-poll pod belongs to ("" for serving pods)."""
    end: ContainerEnd | None = None
    """Converter pods: the converter container's end, once it ended."""
    observation: PodObservation | None = None
    """Serving pods: what status and remediation read."""
    ip: str = ""
    """Serving pods: the pod IP (metrics scraping and golden-set checks during a canary)."""


Record = JobRecord | DeploymentRecord | PodRecord


def owner_of(body: dict[str, Any]) -> tuple[str, str] | None:
    """(namespace, model label) of a child the operator manages, None for anything else."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY or not labels.get(MODEL_LABEL) or not meta.get("namespace"):
        return None
    return str(meta["namespace"]), str(labels[MODEL_LABEL])


def _revision(meta: dict[str, Any]) -> str:
    return str((meta.get("labels") or {}).get(REVISION_LABEL, ""))


def job_record(body: dict[str, Any]) -> JobRecord:
    meta = body["metadata"]
    st = body.get("status") or {}
    conditions = st.get("conditions") or []
    failed = next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), None)
    complete = any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)
    return JobRecord(
        job=JobObservation(
            name=meta["name"],
            revision=_revision(meta),
            created=meta.get("creationTimestamp") or "",
            active=st.get("active") or 0,
            succeeded=complete,
            failed=failed is not None,
            failure_reason=(failed or {}).get("reason") or "",
            failure_message=(failed or {}).get("message") or "",
        ),
        component=str((meta.get("labels") or {}).get(COMPONENT_LABEL, "")),
    )


def deployment_record(body: dict[str, Any]) -> DeploymentRecord:
    meta = body["metadata"]
    st = body.get("status") or {}
    return DeploymentRecord(
        deployment=DeploymentObservation(
            name=meta["name"],
            revision=_revision(meta),
            replicas=(body.get("spec") or {}).get("replicas") or 0,
            ready_replicas=st.get("readyReplicas") or 0,
            available_replicas=st.get("availableReplicas") or 0,
            updated_replicas=st.get("updatedReplicas") or 0,
        ),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def pod_record(body: dict[str, Any]) -> PodRecord:
    meta = body["metadata"]
    labels = meta.get("labels") or {}
    component = str(labels.get(COMPONENT_LABEL, ""))
    if component == serving.COMPONENT:
        return PodRecord(
            name=meta["name"],
            component=component,
            observation=pod_observation(body),
            ip=str((body.get("status") or {}).get("podIP") or ""),
        )
    job_name = next((str(labels[k]) for k in JOB_NAME_LABELS if labels.get(k)), "")
    return PodRecord(name=meta["name"], component=component, job_name=job_name, end=container_end(body))


def record_of(kind: str, body: dict[str, Any]) -> Record:
    if kind == JOB:
        return job_record(body)
    if kind == DEPLOYMENT:
        return deployment_record(body)
    if kind == POD:
        return pod_record(body)
    raise ValueError(f"ptm does not index {kind}")


def container_end(pod: dict[str, Any]) -> ContainerEnd | None:
    """The converter container's terminated state (None while it has not ended)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if cs.get("name") == jobs.CONTAINER and term is not None:
            return ContainerEnd(
                exit_code=term.get("exitCode"),
                message=term.get("message"),
                finished=term.get("finishedAt") or "",
            )
    return None


def pod_observation(pod: dict[str, Any]) -> PodObservation:
    st = pod.get("status") or {}
    unschedulable = None
    ready = False
    not_ready_since = None
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "False" and cond.get("lastTransitionTime"):
            not_ready_since = dt.datetime.fromisoformat(cond["lastTransitionTime"].replace("Z", "+00:00"))
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            unschedulable = cond.get("message") or "Unschedulable"
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            ready = not pod["metadata"].get("deletionTimestamp")  # a terminating pod serves no more
    waiting = None
    restarts = 0
    last_reason = None
    for cs in st.get("containerStatuses") or []:
        restarts += cs.get("restartCount") or 0
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason:
            waiting = reason
        last = ((cs.get("lastState") or {}).get("terminated") or {}).get("reason")
        if last:
            last_reason = last
    memory = None
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == serving.CONTAINER:
            memory = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return PodObservation(
        memory_limit=memory,
        not_ready_since=not_ready_since,
        name=pod["metadata"]["name"],
        revision=_revision(pod["metadata"]),
        phase=st.get("phase") or "Pending",
        ready=ready,
        unschedulable=unschedulable,
        waiting_reason=waiting,
        restarts=restarts,
        last_termination_reason=last_reason,
    )


def wakes_owner(previous: Record | None, current: Record | None) -> bool:
    """Whether a change of a child is worth a reconcile of its model now.

    Jobs and Deployments: any change of their record. Pods: a converter's end (its report; the
    Job's Complete may be seen first), and a serving pod's readiness and trouble (unschedulable,
    waiting, restarts, last termination), both when it starts and when it clears. Readiness is
    followed on the pods, not only through the Deployment: its readyReplicas follows a pod's
    Ready after the ReplicaSet and Deployment controllers' status writes (20 s p50 at N=1000 on
    a saturated control plane). A serving pod that appears or vanishes wakes its model only
    when it is ready or in trouble; its replica counts are the Deployment's.
    """
    if previous == current:
        return False
    record = current if current is not None else previous
    if not isinstance(record, PodRecord):
        return True
    if isinstance(previous, PodRecord) and isinstance(current, PodRecord):
        if record.component != serving.COMPONENT:
            return previous.end != current.end
        return _watched(previous.observation) != _watched(current.observation)
    return record.end is not None or _watched(record.observation) != _watched(None)


def _watched(pod: PodObservation | None) -> tuple[Any, ...]:
    """What of a serving pod wakes its model when it changes."""
    if pod is None:
        return (False, None, None, 0, None)
    return (pod.ready, pod.unschedulable, pod.waiting_reason, pod.restarts, pod.last_termination_reason)


# --- one model's children -----------------------------------------------------------------------


@dataclass
class Children:
    """All the indexed children of one model (what LISTs by its labels would return)."""

    jobs: list[JobRecord] = field(default_factory=list)
    deployments: list[DeploymentRecord] = field(default_factory=list)
    pods: list[PodRecord] = field(default_factory=list)

    def add(self, record: Record) -> None:
        if isinstance(record, JobRecord):
            self.jobs.append(record)
        elif isinstance(record, DeploymentRecord):
            self.deployments.append(record)
        else:
            self.pods.append(record)


@dataclass(frozen=True)
class ChildView:
    """Observations planning reads, assembled from one model's children."""

    jobs: dict[str, JobObservation]
    """Conversion Jobs by revision."""
    polls: list[JobObservation]
    deployments: dict[str, DeploymentObservation]
    """Deployments by revision, those being deleted left out."""
    pods: list[PodObservation]
    """Serving pods."""
    pod_ips: dict[str, str]
    """Serving pod name -> IP, for pods that have one."""
    job_names: set[str]
    deployment_names: set[str]
    """Names present (deleting ones included): what the apply memory may keep."""


def reports_missing(model: PretrainedModel, children: Children) -> bool:
    """Whether a finished conversion Job that planning will read has no pod end in `children`.

    A Job's Complete can be seen before its pod's final status (separate watch streams), and
    planning would call a missing report a failure; the caller then reads the pods instead.
    """
    converting = {r.revision for r in model.status.revisions if r.state in IN_CONVERSION}
    known = {r.revision for r in model.status.revisions}
    ended = {p.job_name for p in children.pods if p.end is not None}
    return any(
        (j.job.succeeded or j.job.failed)
        and j.job.name not in ended
        and (
            j.component == jobs.POLL_COMPONENT or j.job.revision in converting or j.job.revision not in known
        )
        for j in children.jobs
    )


def view(children: Children) -> ChildView:
    """Conversion and poll Jobs with their pods' ends, Deployments and serving pods."""
    ends: dict[str, ContainerEnd] = {}
    for pod in children.pods:
        end = pod.end
        if end is None or not pod.job_name:
            continue
        # The latest end of a Job's pods (retries leave earlier pods behind).
        last = ends.get(pod.job_name)
        if last is None or end.finished > last.finished:
            ends[pod.job_name] = end
    conversion: dict[str, JobObservation] = {}
    polls: list[JobObservation] = []
    for rec in children.jobs:
        job = rec.job
        end = ends.get(job.name)
        if end is not None:
            job = JobObservation(
                name=job.name,
                revision=job.revision,
                created=job.created,
                active=job.active,
                succeeded=job.succeeded,
                failed=job.failed,
                failure_reason=job.failure_reason,
                failure_message=job.failure_message,
                exit_code=end.exit_code,
                termination_message=end.message,
            )
        if rec.component == jobs.POLL_COMPONENT:
            polls.append(job)
        elif rec.component == jobs.COMPONENT and job.revision:
            conversion[job.revision] = job
    deployments = {
        d.deployment.revision: d.deployment
        for d in children.deployments
        if d.deployment.revision and not d.deleting
    }
    serving_pods = [p for p in children.pods if p.component == serving.COMPONENT and p.observation]
    return ChildView(
        jobs=conversion,
        polls=polls,
        deployments=deployments,
        pods=[p.observation for p in serving_pods if p.observation is not None],
        pod_ips={p.name: p.ip for p in serving_pods if p.ip},
        job_names={j.job.name for j in children.jobs if j.component == jobs.COMPONENT},
        deployment_names={d.deployment.name for d in children.deployments},
    )


# --- the index ----------------------------------------------------------------------------------


class ChildIndex:
    """Compact records of the operator's children by owning model, safe across threads.

    Watch handlers (the event loop) write; reconciles (worker threads) read snapshots. Keys
    are (namespace, model label): the label is `dns_name(model name)`, the same value the
    children's label selectors use.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[tuple[str, str], dict[tuple[str, str], Record]] = {}

    def upsert(self, kind: str, body: dict[str, Any]) -> tuple[tuple[str, str] | None, Record | None, Record]:
        """Index a child's current state: (owner key, previous record, current record)."""
        owner = owner_of(body)
        record = record_of(kind, body)
        if owner is None:
            return None, None, record
        key = (kind, body["metadata"]["name"])
        with self._lock:
            records = self._by_model.setdefault(owner, {})
            previous = records.get(key)
            records[key] = record
        return owner, previous, record

    def remove(self, kind: str, body: dict[str, Any]) -> tuple[tuple[str, str] | None, Record | None]:
        """Forget a deleted child: (owner key, the record it had)."""
        owner = owner_of(body)
        if owner is None:
            return None, None
        with self._lock:
            records = self._by_model.get(owner)
            if records is None:
                return owner, None
            previous = records.pop((kind, body["metadata"]["name"]), None)
            if not records:
                del self._by_model[owner]
        return owner, previous

    def children(self, namespace: str, model_name: str) -> Children:
        """A snapshot of one model's children (by its name; the label is derived)."""
        out = Children()
        with self._lock:
            records = list((self._by_model.get((namespace, dns_name(model_name))) or {}).values())
        for record in records:
            out.add(record)
        return out

    def __len__(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._by_model.values())


# --- models -------------------------------------------------------------------------------------


def urgent_model_event(event_type: str | None, body: dict[str, Any]) -> bool:
    """Whether a model's event queues it ahead of health ticks: a watch event (a change) does,
    a listing's (type None: at start-up, or kopf listing again after a 410 Gone) only for a
    model never reconciled (no status): a new model's first reconcile is waited on by a user
    however it was seen."""
    return event_type is not None or not body.get("status")


def model_key(body: dict[str, Any]) -> tuple[str, str]:
    """(namespace, name) of a model body."""
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name"))


def _rv(body: dict[str, Any]) -> int | None:
    value = (body.get("metadata") or {}).get("resourceVersion")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


#: Annotations kopf keeps on the model that planning never reads (the diff-base repeats the
#: spec; no longer written, but models last handled by an earlier operator still carry it).
_KOPF_ANNOTATIONS = ("kopf.zalando.org/", "ptm.dev/last-handled-configuration")


def compact_model(body: dict[str, Any]) -> dict[str, Any]:
    """A model body without what planning never reads (managedFields, kopf's annotations)."""
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if not k.startswith(_KOPF_ANNOTATIONS)}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": meta,
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }


def same_for_planning(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two bodies of a model plan alike: equal spec, status, generation, labels,
    annotations (kopf's left out) and deletion mark; resourceVersion, finalizers and
    managedFields may differ."""
    ca, cb = compact_model(a), compact_model(b)
    if (ca["spec"], ca["status"]) != (cb["spec"], cb["status"]):
        return False
    ma, mb = ca["metadata"], cb["metadata"]
    return all(
        ma.get(k) == mb.get(k) for k in ("uid", "generation", "labels", "annotations", "deletionTimestamp")
    )


class ModelCache:
    """The newest body seen of each PretrainedModel: from watch events and the operator's own writes.

    A watch event can arrive after the operator wrote a newer status (the write's response is
    offered here at once); bodies with an older resourceVersion than the cached one are
    ignored, so a reconcile never plans from a status older than one it wrote itself. Status
    writes carry the resourceVersion as a precondition too (kube.py), which catches any other
    staleness with a 409 and a fresh read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bodies: dict[tuple[str, str], dict[str, Any]] = {}
        self._gone: dict[tuple[str, str], int] = {}
        """resourceVersion at deletion: a late body of a deleted model must not bring it back."""
        self._names: dict[tuple[str, str], str] = {}
        """(namespace, model label) -> model name (children carry the label, not the name)."""

    def offer(self, body: dict[str, Any]) -> bool:
        """Keep `body` unless a newer version is cached; True when it is newer than the cached."""
        return self._offer(body)[0]

    def offer_changed(self, body: dict[str, Any]) -> bool:
        """offer(), True only when `body` is newer and plans differently from the cached one (or
        none was cached): the echo of the operator's own status write, or of a patch of kopf's
        finalizer, is not a change."""
        newer, previous = self._offer(body)
        return newer and (previous is None or not same_for_planning(previous, body))

    def _offer(self, body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        """(newer than the cached, the body cached before)."""
        key = model_key(body)
        new = _rv(body)
        with self._lock:
            cached = self._bodies.get(key)
            old = _rv(cached) if cached is not None else self._gone.get(key)
            if new is not None and old is not None and new <= old:
                if cached is not None and new == old:
                    # The same version from the watch: keep the event's copy, which kopf holds
                    # too (timers keep the latest body), and let the write response's go.
                    self._bodies[key] = compact_model(body)
                return False, cached
            self._bodies[key] = compact_model(body)
            self._gone.pop(key, None)
            self._names[(key[0], dns_name(key[1]))] = key[1]
        return True, cached

    def name_for(self, namespace: str, label: str) -> str:
        """The name of the model whose children carry `label` (the label itself when unknown)."""
        with self._lock:
            return self._names.get((namespace, label), label)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._bodies.get((namespace, name))

    def forget(self, body: dict[str, Any]) -> None:
        """A model was deleted (`body`: its last state)."""
        key = model_key(body)
        rv = _rv(body)
        with self._lock:
            self._bodies.pop(key, None)
            self._names.pop((key[0], dns_name(key[1])), None)
            if rv is not None:
                self._gone[key] = max(rv, self._gone.get(key, 0))

    def __len__(self) -> int:
        with self._lock:
            return len(self._bodies)
