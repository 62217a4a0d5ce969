"""The operator against the real API server with kwok GPU nodes.

The operator runs as a real subprocess (`ptm operator`) watching the test's namespace, so it can
be SIGKILLed and restarted. kwok runs the Job's and the Deployment's pods; the test plays the
converter by patching the Job pod's status with a report in its termination message, exactly
what the kubelet would write.
"""

from __future__ import annotations

import json
from typing import Any

from ptm_runtime.report import EXIT_VALIDATION_FAILED
from tests.conftest import Cluster, wait_for
from tests.integration.helpers import (
    POOL_GPUS,
    Operator,
    apply_model,
    condition,
    event_reasons,
    example,
    failure_for,
    finish_job_pod,
    get,
    job_for,
    model_status,
    report_for,
    report_server_restart,
    serve_to_ready,
)

# --- tests ------------------------------------------------------------------------------------------


def test_conversion_then_gpu_serving_then_ready(cluster: Cluster, namespace: str, operator: Operator) -> None:
    apply_model(cluster, namespace, example(namespace))
    job = job_for(cluster, namespace)
    revision = job["metadata"]["labels"]["ptm.dev/revision"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ptm/convert:test"
    assert container["args"][0] == "convert" and revision in container["args"]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "PretrainedModel"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and EXIT_VALIDATION_FAILED in rules[0]["onExitCodes"]["values"]
    st = model_status(cluster, namespace, "resnet50")
    assert condition({"status": st}, "Converted")["reason"] == "Converting"  # type: ignore[index]

    finish_job_pod(cluster, namespace, job, 0, report_for(revision).compact())

    deployment = wait_for(
        lambda: get(cluster, namespace, "deployment", f"resnet50-{revision}"), 60, "the serving Deployment"
    )
    pod_spec = deployment["spec"]["template"]["spec"]
    server = pod_spec["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/models/resnet50/ready"

    ready = wait_for(
        lambda: (
            (c := condition(get(cluster, namespace, "pretrainedmodels", "resnet50"), "Ready"))
            and c["status"] == "True"
            and c
        ),
        90,
        "Ready=True",
    )
    assert ready["reason"] == "Serving"
    st = model_status(cluster, namespace, "resnet50")
    assert st["stableRevision"] == revision
    assert st["endpoint"]["rest"] == f"http://resnet50.{namespace}.svc:8080"
    assert st["readyReplicas"] >= 1
    rev = next(r for r in st["revisions"] if r["revision"] == revision)
    assert rev["precision"] == "fp16" and rev["artifact"]["sha256"] == "ab" * 32
    pods = get(
        cluster,
        namespace,
        "pods",
        selector=f"ptm.dev/revision={revision},app.kubernetes.io/component=serving",
    )
    nodes = {p["spec"]["nodeName"] for p in pods["items"]}
    assert nodes == {f"pool-{namespace}"[:63]}  # the test's kwok GPU node
    for kind in ("service/resnet50", "pdb/resnet50", "hpa/resnet50"):
        assert cluster.kubectl("get", kind, "-n", namespace, check=False).returncode == 0, kind
    # The operator's own queue reconciles: no kopf change handlers, so no diff-base or progress
    # annotations are written on the model (kopf's finalizer, for the health timer, stays).
    meta = get(cluster, namespace, "pretrainedmodels", "resnet50")["metadata"]
    assert not [k for k in meta.get("annotations", {}) if k.startswith("ptm.dev/")], meta["annotations"]
    assert meta.get("finalizers")
    fields = get(cluster, namespace, "pretrainedmodels", "resnet50", managed_fields=True)["metadata"][
        "managedFields"
    ]
    assert {f["manager"] for f in fields if f.get("subresource") == "status"} == {"ptm-operator"}, fields


def test_failed_validation_keeps_previous_revision_and_serving_change_does_not_reconvert(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    body = example(namespace)
    apply_model(cluster, namespace, body)
    first = serve_to_ready(cluster, namespace)

    # A serving-only change: new replicas/batching, same artifact -> no new Job.
    body["spec"]["serving"]["batching"]["maxBatchSize"] = 16
    apply_model(cluster, namespace, body)
    wait_for(
        lambda: (
            "16" in json.dumps(get(cluster, namespace, "deployment", f"resnet50-{first}")["spec"]["template"])
        ),
        30,
        "the Deployment to carry the new batching options",
    )
    jobs = get(cluster, namespace, "jobs", selector="app.kubernetes.io/component=converter")["items"]
    assert [j["metadata"]["labels"]["ptm.dev/revision"] for j in jobs] == [first]

    # An artifact change whose validation fails: the first revision keeps serving.
    body["spec"]["optimization"]["precision"] = ["int8-dynamic", "fp32"]
    apply_model(cluster, namespace, body)
    jobs = wait_for(
        lambda: [
            j
            for j in get(cluster, namespace, "jobs", selector="app.kubernetes.io/component=converter")[
                "items"
            ]
            if j["metadata"]["labels"]["ptm.dev/revision"] != first
        ],
        60,
        "a Job for the new revision",
    )
    second = jobs[0]["metadata"]["labels"]["ptm.dev/revision"]
    finish_job_pod(cluster, namespace, jobs[0], EXIT_VALIDATION_FAILED, failure_for(second).compact())
    validated = wait_for(
        lambda: (
            (c := condition(get(cluster, namespace, "pretrainedmodels", "resnet50"), "Validated"))
            and c["status"] == "False"
            and c
        ),
        60,
        "Validated=False",
    )
    assert validated["reason"] == "ValidationFailed"
    assert "top-1 agreement 0.82 < 0.99" in validated["message"]
    st = model_status(cluster, namespace, "resnet50")
    assert st["stableRevision"] == first
    assert next(r for r in st["revisions"] if r["revision"] == second)["state"] == "Failed"
    assert get(cluster, namespace, "deployment", f"resnet50-{first}") is not None
    assert get(cluster, namespace, "deployment", f"resnet50-{second}") is None
    degraded = condition({"status": st}, "Degraded")
    assert degraded is not None and degraded["status"] == "True" and first in degraded["message"]


def test_operator_killed_at_each_stage_converges_without_duplicates(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    apply_model(cluster, namespace, example(namespace))
    job = job_for(cluster, namespace)
    operator.kill()  # after the Job was created, before it finished
    revision = job["metadata"]["labels"]["ptm.dev/revision"]
    finish_job_pod(cluster, namespace, job, 0, report_for(revision).compact())
    operator.start()
    wait_for(
        lambda: get(cluster, namespace, "deployment", f"resnet50-{revision}"),
        60,
        "the Deployment after restart",
    )
    operator.kill()  # after the Deployment, before Ready
    operator.start()
    wait_for(
        lambda: (
            (c := condition(get(cluster, namespace, "pretrainedmodels", "resnet50"), "Ready"))
            and c["status"] == "True"
        ),
        90,
        "Ready=True after restarts",
    )
    operator.kill()
    operator.start()
    # Count children only once the restarted process has reconciled the model itself.
    wait_for(operator.reconciles, 30, "the restarted operator to reconcile")
    assert model_status(cluster, namespace, "resnet50").get("observedGeneration") == 1
    jobs = get(cluster, namespace, "jobs")["items"]
    deployments = get(cluster, namespace, "deployments")["items"]
    assert len(jobs) == 1
    assert [d["metadata"]["name"] for d in deployments] == [f"resnet50-{revision}"]

    # Deleting the resource garbage-collects its children.
    cluster.kubectl("delete", "pretrainedmodel", "resnet50", "-n", namespace)
    wait_for(
        lambda: (
            not get(cluster, namespace, "deployments")["items"]
            and not get(cluster, namespace, "jobs")["items"]
        ),
        60,
        "children to be garbage-collected",
    )


def test_children_deleted_behind_the_operators_back_come_back(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    """The watch-fed cache forgets deleted children: the next reconcile sees them missing and
    applies them again (an unchanged manifest is otherwise not re-applied for minutes)."""
    apply_model(cluster, namespace, example(namespace))
    job = job_for(cluster, namespace)
    revision = job["metadata"]["labels"]["ptm.dev/revision"]
    finish_job_pod(cluster, namespace, job, 0, report_for(revision).compact())
    name = f"resnet50-{revision}"
    first = wait_for(lambda: get(cluster, namespace, "deployment", name), 60, "the serving Deployment")
    cluster.kubectl("delete", "deployment", name, "-n", namespace, "--wait=false")
    again = wait_for(
        lambda: (
            (d := get(cluster, namespace, "deployment", name))
            and d["metadata"]["uid"] != first["metadata"]["uid"]
            and d
        ),
        30,
        "the Deployment applied again",
    )
    assert again["metadata"]["labels"]["ptm.dev/revision"] == revision
    wait_for(
        lambda: (
            (c := condition(get(cluster, namespace, "pretrainedmodels", "resnet50"), "Ready"))
            and c["status"] == "True"
        ),
        90,
        "Ready=True with the new Deployment",
    )
    assert len(get(cluster, namespace, "jobs")["items"]) == 1  # the finished Job was not re-run


def test_more_gpu_replicas_than_nodes_hold_is_reported(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    body = example(namespace, "big")  # pinned to the test's pool of POOL_GPUS GPUs
    body["spec"]["serving"].pop("autoscaling", None)
    body["spec"]["serving"]["replicas"] = POOL_GPUS + 2
    apply_model(cluster, namespace, body)
    job = job_for(cluster, namespace)
    finish_job_pod(
        cluster, namespace, job, 0, report_for(job["metadata"]["labels"]["ptm.dev/revision"]).compact()
    )

    def waiting() -> dict[str, Any] | None:
        # The scheduler gives up on the two extra pods one after the other, and a pod's trouble
        # wakes the operator at once: "1 pod(s) wait" may come first, "2" must follow.
        c = condition(get(cluster, namespace, "pretrainedmodels", "big"), "Available")
        return c if c and c["reason"] == "Unschedulable" and "2 pod(s) wait" in c["message"] else None

    available = wait_for(waiting, 90, "Available to report both unschedulable pods")
    assert available["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in available["message"]
    ready = condition(get(cluster, namespace, "pretrainedmodels", "big"), "Ready")
    assert ready is not None and ready["status"] == "False"


def oom_kill(cluster: Cluster, namespace: str, revision: str) -> str:
    """Make one serving pod report an OOMKilled restart, as the kubelet would."""
    return report_server_restart(
        cluster,
        namespace,
        revision,
        ready=True,
        restarts=1,
        state={"running": {"startedAt": "2026-12-04T00:00:00Z"}},
        last_state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
    )


def test_oom_killed_pods_get_more_memory_up_to_the_ceiling(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    body = example(namespace)
    body["spec"]["remediation"] = {"memoryBumpOnOOM": {"factor": 1.5, "ceiling": "10Gi"}}
    apply_model(cluster, namespace, body)
    revision = serve_to_ready(cluster, namespace)
    oom_kill(cluster, namespace, revision)

    def bumped() -> str | None:
        dep = get(cluster, namespace, "deployment", f"resnet50-{revision}")
        limit: str = dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        return limit if limit != "8Gi" else None

    assert wait_for(bumped, 30, "a bigger memory limit") == "10Gi"  # 8Gi x 1.5 = 12Gi, capped at 10Gi
    st = model_status(cluster, namespace, "resnet50")
    assert st["memoryLimit"] == "10Gi"
    assert (
        st["remediations"][-1]["action"] == "MemoryBump"
        and "8Gi -> 10Gi" in st["remediations"][-1]["message"]
    )


def test_oom_without_permission_is_only_reported(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    body = example(namespace)
    body["spec"]["remediation"] = {"memoryBumpOnOOM": {"enabled": False}}
    apply_model(cluster, namespace, body)
    revision = serve_to_ready(cluster, namespace)
    oom_kill(cluster, namespace, revision)

    def reported() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "pretrainedmodels", "resnet50"), "Degraded")
        return c if c and c["reason"] == "OOMKilled" else None

    degraded = wait_for(reported, 30, "Degraded=OOMKilled")
    assert "disabled" in degraded["message"]
    dep = get(cluster, namespace, "deployment", f"resnet50-{revision}")
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "8Gi"
    assert not model_status(cluster, namespace, "resnet50").get("remediations")
    wait_for(lambda: event_reasons(cluster, namespace) & {"OOMKilled"}, 10, "a OOMKilled Event")
