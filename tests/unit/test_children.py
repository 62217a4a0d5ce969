"""children.py: compact records of Jobs, Deployments and pods, the index by model, the model cache."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ptm_operator.api import PretrainedModel, RevisionState
from ptm_operator.builders import jobs, serving
from ptm_operator.builders.names import labels
from ptm_operator.children import (
    DEPLOYMENT,
    JOB,
    POD,
    ChildIndex,
    Children,
    ContainerEnd,
    ModelCache,
    PodRecord,
    compact_model,
    pod_observation,
    pod_record,
    record_of,
    reports_missing,
    same_for_planning,
    urgent_model_event,
    view,
    wakes_owner,
)
from ptm_operator.observed import PodObservation

NS = "vision"
MODEL = "resnet50"
REV = "0123456789"


def job(
    name: str = f"{MODEL}-convert-{REV}",
    component: str = jobs.COMPONENT,
    revision: str | None = REV,
    complete: bool = False,
    failed: bool = False,
    active: int = 1,
) -> dict[str, Any]:
    conditions = []
    if complete:
        conditions.append({"type": "Complete", "status": "True"})
    if failed:
        conditions.append(
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "x"}
        )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": labels(MODEL, component, revision),
            "creationTimestamp": "2025-03-01T12:00:00Z",
            "resourceVersion": "7",
            "managedFields": [{"manager": "ptm-operator"}],
        },
        "spec": {"template": {"spec": {"containers": [{"name": jobs.CONTAINER, "image": "x"}]}}},
        "status": {"active": 0 if (complete or failed) else active, "conditions": conditions},
    }


def job_pod(
    job_name: str = f"{MODEL}-convert-{REV}",
    name: str = "p1",
    exit_code: int | None = None,
    message: str | None = None,
    finished: str = "2025-03-01T12:01:00Z",
    component: str = jobs.COMPONENT,
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "message": message, "finishedAt": finished}}
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {**labels(MODEL, component, REV), "batch.kubernetes.io/job-name": job_name},
        },
        "status": {"containerStatuses": [{"name": jobs.CONTAINER, "state": state}]},
    }


def serving_pod(
    name: str = "s1",
    ready: bool = False,
    waiting: str | None = None,
    restarts: int = 0,
    unschedulable: bool = False,
    ip: str = "10.0.0.5",
) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes"}
        )
    cs: dict[str, Any] = {"name": serving.CONTAINER, "restartCount": restarts, "state": {"running": {}}}
    if waiting:
        cs["state"] = {"waiting": {"reason": waiting}}
    return {
        "metadata": {"name": name, "namespace": NS, "labels": labels(MODEL, serving.COMPONENT, REV)},
        "spec": {"containers": [{"name": serving.CONTAINER, "resources": {"limits": {"memory": "8Gi"}}}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": conditions, "containerStatuses": [cs]},
    }


def deployment(ready: int = 0, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"{MODEL}-{REV}",
        "namespace": NS,
        "labels": labels(MODEL, serving.COMPONENT, REV),
    }
    if deleting:
        meta["deletionTimestamp"] = "2025-03-01T12:05:00Z"
    return {
        "metadata": meta,
        "spec": {"replicas": 2},
        "status": {"readyReplicas": ready, "availableReplicas": ready, "updatedReplicas": 2},
    }


def model(states: dict[str, RevisionState] | None = None, rv: str = "10") -> dict[str, Any]:
    return {
        "apiVersion": "ptm.dev/v1alpha1",
        "kind": "PretrainedModel",
        "metadata": {
            "name": MODEL,
            "namespace": NS,
            "resourceVersion": rv,
            "managedFields": [{"manager": "kubectl"}],
            "annotations": {
                "ptm.dev/last-handled-configuration": '{"spec": {}}',
                "kopf.zalando.org/touch": "x",
                "ptm.dev/promote": "true",
            },
        },
        "spec": {
            "source": {
                "uri": "s3://models/resnet50.pt",
                "format": "pytorch-state-dict",
                "architecture": "torchvision.models:resnet50",
                "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 3, 224, 224]}],
            }
        },
        "status": {
            "revisions": [
                {"revision": rev, "state": state.value, "created": "2025-03-01T12:00:00Z"}
                for rev, state in (states or {}).items()
            ]
        },
    }


# --- records ------------------------------------------------------------------------------------


def test_job_record_keeps_state_not_body() -> None:
    rec = record_of(JOB, job(failed=True))
    assert rec.job.failed and not rec.job.succeeded and rec.job.active == 0  # type: ignore[union-attr]
    assert rec.job.failure_reason == "BackoffLimitExceeded"  # type: ignore[union-attr]
    assert rec.job.revision == REV and rec.component == jobs.COMPONENT  # type: ignore[union-attr]
    assert not hasattr(rec, "__dict__")  # slots: a few hundred bytes per child


def test_converter_pod_record_has_the_container_end() -> None:
    rec = pod_record(job_pod(exit_code=0, message='{"v": 1}'))
    assert rec.job_name == f"{MODEL}-convert-{REV}"
    assert rec.end == ContainerEnd(exit_code=0, message='{"v": 1}', finished="2025-03-01T12:01:00Z")
    assert rec.observation is None
    assert pod_record(job_pod()).end is None  # still running


def test_serving_pod_record_has_the_observation_and_ip() -> None:
    rec = pod_record(serving_pod(waiting="CrashLoopBackOff", restarts=4, unschedulable=True))
    assert rec.observation is not None
    assert rec.observation.waiting_reason == "CrashLoopBackOff"
    assert rec.observation.restarts == 4
    assert rec.observation.unschedulable == "0/2 nodes"
    assert rec.observation.memory_limit == "8Gi"
    assert rec.ip == "10.0.0.5" and rec.end is None


# --- assembling Observed ------------------------------------------------------------------------


def children(*bodies: tuple[str, dict[str, Any]]) -> Children:
    out = Children()
    for kind, body in bodies:
        out.add(record_of(kind, body))
    return out


def test_view_joins_jobs_with_their_latest_pod_end() -> None:
    got = view(
        children(
            (JOB, job(complete=True)),
            (POD, job_pod(name="p1", exit_code=1, message="first", finished="2025-03-01T12:01:00Z")),
            (POD, job_pod(name="p2", exit_code=0, message="second", finished="2025-03-01T12:02:00Z")),
        )
    )
    assert set(got.jobs) == {REV}
    assert got.jobs[REV].succeeded
    assert (got.jobs[REV].exit_code, got.jobs[REV].termination_message) == (0, "second")
    assert got.job_names == {f"{MODEL}-convert-{REV}"}


def test_view_splits_poll_jobs_and_leaves_out_deleting_deployments() -> None:
    poll_name = f"{MODEL}-poll-abc"
    got = view(
        children(
            (JOB, job(name=poll_name, component=jobs.POLL_COMPONENT, revision=None, complete=True)),
            (POD, job_pod(job_name=poll_name, name="pp", exit_code=0, component=jobs.POLL_COMPONENT)),
            (DEPLOYMENT, deployment(deleting=True)),
        )
    )
    assert got.jobs == {}
    assert [p.name for p in got.polls] == [poll_name] and got.polls[0].exit_code == 0
    assert got.deployments == {}
    assert got.deployment_names == {f"{MODEL}-{REV}"}  # still there: the apply memory keeps it


def test_view_serving_pods_and_ips() -> None:
    got = view(children((DEPLOYMENT, deployment(ready=2)), (POD, serving_pod(ready=True))))
    assert got.deployments[REV].ready_replicas == 2
    assert [p.name for p in got.pods] == ["s1"] and got.pods[0].ready
    assert got.pod_ips == {"s1": "10.0.0.5"}


@pytest.mark.parametrize(
    ("states", "job_body", "pods", "missing"),
    [
        ({REV: RevisionState.CONVERTING}, job(complete=True), [], True),
        ({REV: RevisionState.CONVERTING}, job(failed=True), [], True),
        ({REV: RevisionState.CONVERTING}, job(complete=True), [job_pod(exit_code=0)], False),
        ({REV: RevisionState.CONVERTING}, job(), [], False),  # still running: nothing to read yet
        ({REV: RevisionState.STABLE}, job(complete=True), [], False),  # its report is in status
        ({}, job(complete=True), [], True),  # a revision status does not know yet
    ],
)
def test_reports_missing(
    states: dict[str, RevisionState], job_body: dict[str, Any], pods: list[dict[str, Any]], missing: bool
) -> None:
    m = PretrainedModel.from_body(model(states))
    assert reports_missing(m, children((JOB, job_body), *((POD, p) for p in pods))) is missing


# --- waking the owner ---------------------------------------------------------------------------


def test_jobs_and_deployments_wake_on_any_change_of_their_record() -> None:
    running, done = record_of(JOB, job()), record_of(JOB, job(complete=True))
    assert wakes_owner(None, running)
    assert wakes_owner(running, done)
    assert not wakes_owner(done, record_of(JOB, {**job(complete=True), "spec": {"parallelism": 2}}))
    assert wakes_owner(done, None)
    assert wakes_owner(record_of(DEPLOYMENT, deployment(0)), record_of(DEPLOYMENT, deployment(1)))


def test_converter_pods_wake_only_when_they_end() -> None:
    running, ended = pod_record(job_pod()), pod_record(job_pod(exit_code=0))
    assert not wakes_owner(None, running)
    assert wakes_owner(running, ended)
    assert wakes_owner(None, ended)  # first seen already ended (a restarted operator)
    assert not wakes_owner(ended, ended)


def test_serving_pods_wake_on_readiness_and_trouble() -> None:
    pending = pod_record(serving_pod())
    ready = pod_record(serving_pod(ready=True))
    looping = pod_record(serving_pod(waiting="CrashLoopBackOff", restarts=3))
    assert not wakes_owner(None, pending)  # its Deployment's replica counts say it
    assert wakes_owner(pending, ready)  # before the Deployment's readyReplicas says it
    assert wakes_owner(ready, pending)
    assert not wakes_owner(ready, pod_record(serving_pod(ready=True, ip="10.0.0.6")))
    assert wakes_owner(ready, looping)
    assert wakes_owner(looping, ready)  # trouble cleared
    assert wakes_owner(None, pod_record(serving_pod(unschedulable=True)))
    assert wakes_owner(ready, None)
    assert not wakes_owner(
        PodRecord(name="x", component=serving.COMPONENT, observation=PodObservation("x", REV)), None
    )


def test_a_terminating_pod_is_not_ready() -> None:
    body = serving_pod(ready=True)
    assert pod_observation(body).ready
    body["metadata"]["deletionTimestamp"] = "2025-03-01T12:05:00Z"
    assert not pod_observation(body).ready


def test_index_groups_by_model_and_forgets_deleted_children() -> None:
    index = ChildIndex()
    owner, previous, current = index.upsert(JOB, job())
    assert owner == (NS, MODEL) and previous is None
    owner, previous, current = index.upsert(JOB, job(complete=True))
    assert previous is not None and previous != current
    index.upsert(POD, job_pod(exit_code=0))
    index.upsert(DEPLOYMENT, deployment())
    other = job()
    other["metadata"]["labels"] = labels("other", jobs.COMPONENT, REV)
    index.upsert(JOB, other)
    assert len(index) == 4
    mine = index.children(NS, MODEL)
    assert (len(mine.jobs), len(mine.pods), len(mine.deployments)) == (1, 1, 1)
    assert mine.jobs[0].job.succeeded
    assert index.children("elsewhere", MODEL) == Children()
    owner, gone = index.remove(JOB, job())
    assert owner == (NS, MODEL) and gone is not None
    assert index.children(NS, MODEL).jobs == []
    assert index.remove(JOB, job()) == ((NS, MODEL), None)  # twice is fine


def test_index_ignores_what_the_operator_does_not_manage() -> None:
    index = ChildIndex()
    foreign = job()
    foreign["metadata"]["labels"] = {"app": "x"}
    assert index.upsert(JOB, foreign)[0] is None
    assert len(index) == 0


def test_index_keys_by_the_model_label_of_long_names() -> None:
    name = "A.Very.Long.Model.Name-" + "x" * 60
    index = ChildIndex()
    body = job()
    body["metadata"]["labels"] = labels(name, jobs.COMPONENT, REV)
    index.upsert(JOB, body)
    assert len(index.children(NS, name).jobs) == 1


# --- the model cache ----------------------------------------------------------------------------


def test_model_cache_keeps_the_newest_body() -> None:
    cache = ModelCache()
    assert cache.offer(model(rv="10"))
    assert cache.offer(model({REV: RevisionState.CONVERTING}, rv="12"))  # our own status write
    assert not cache.offer(model(rv="11"))  # a watch event from before it
    got = cache.get(NS, MODEL)
    assert got is not None and got["metadata"]["resourceVersion"] == "12"
    assert got["status"]["revisions"][0]["state"] == "Converting"
    event = model({REV: RevisionState.CONVERTING}, rv="12")  # the write's own watch event
    assert not cache.offer(event)  # not newer ...
    kept = cache.get(NS, MODEL)
    assert kept is not None and kept["spec"] is event["spec"]  # ... but its copy is the one kept


def test_model_cache_tells_a_change_where_planning_looks_from_an_echo() -> None:
    cache = ModelCache()
    assert cache.offer_changed(model(rv="10"))  # new
    finalized = model(rv="11")
    finalized["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    assert not cache.offer_changed(finalized)  # kopf's finalizer patch
    assert cache.offer(model({REV: RevisionState.CONVERTING}, rv="12"))  # our own status write
    assert not cache.offer_changed(model({REV: RevisionState.CONVERTING}, rv="12"))  # its echo
    edited = model({REV: RevisionState.CONVERTING}, rv="13")
    edited["spec"]["serving"] = {"replicas": 3}
    assert cache.offer_changed(edited)  # a spec edit
    assert not cache.offer_changed(model(rv="9"))  # an older body


def test_model_cache_drops_managed_fields_and_kopf_annotations() -> None:
    body = model()
    before = copy.deepcopy(body)
    compact = compact_model(body)
    assert "managedFields" not in compact["metadata"]
    assert compact["metadata"]["annotations"] == {"ptm.dev/promote": "true"}
    assert body == before  # the event's body is not changed
    PretrainedModel.from_body(compact)


def test_model_cache_does_not_bring_back_a_deleted_model() -> None:
    cache = ModelCache()
    cache.offer(model(rv="10"))
    cache.forget(model(rv="13"))
    assert cache.get(NS, MODEL) is None
    assert not cache.offer(model(rv="12"))  # a handler's late body
    assert cache.offer(model(rv="20"))  # created again
    assert cache.name_for(NS, MODEL) == MODEL


def test_model_cache_maps_child_labels_to_names() -> None:
    cache = ModelCache()
    body = model()
    body["metadata"]["name"] = "resnet.v2"
    cache.offer(body)
    assert cache.name_for(NS, "resnet-v2") == "resnet.v2"
    assert cache.name_for(NS, "unknown") == "unknown"


def test_same_for_planning_ignores_what_kopf_writes() -> None:
    body = model({REV: RevisionState.CONVERTING}, rv="10")
    kopf_wrote = copy.deepcopy(body)
    kopf_wrote["metadata"]["resourceVersion"] = "11"
    kopf_wrote["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    kopf_wrote["metadata"]["annotations"]["ptm.dev/last-handled-configuration"] = '{"spec": {"x": 1}}'
    assert same_for_planning(body, kopf_wrote)
    promoted = copy.deepcopy(kopf_wrote)
    promoted["metadata"]["annotations"]["ptm.dev/abort"] = "true"
    assert not same_for_planning(body, promoted)
    other_status = model({REV: RevisionState.FAILED}, rv="11")
    assert not same_for_planning(body, other_status)
    edited = copy.deepcopy(body)
    edited["metadata"]["generation"] = 2
    edited["spec"]["source"]["uri"] = "s3://models/resnet50-v2.pt"
    assert not same_for_planning(body, edited)


def test_a_listed_model_is_urgent_only_before_its_first_reconcile() -> None:
    new = {"metadata": {"name": MODEL, "namespace": NS}, "spec": {}}
    reconciled = {**new, "status": {"observedGeneration": 1}}
    assert urgent_model_event("ADDED", new) and urgent_model_event("MODIFIED", reconciled)
    assert urgent_model_event(None, new)  # listed (start-up, or after a 410 Gone), never reconciled
    assert not urgent_model_event(None, reconciled)  # the start-up listing: behind children's changes
