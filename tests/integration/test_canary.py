"""Canary updates on the real API server with kwok GPU nodes: steps, promotion, rollback, restart."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, wait_for
from tests.integration.helpers import (
    POOL_GPUS,
    Operator,
    apply_model,
    condition,
    event_reasons,
    example,
    finish_job_pod,
    get,
    model_status,
    report_for,
    report_server_restart,
    serve_to_ready,
)


def canary_model(
    namespace: str, steps: list[dict[str, Any]], replicas: int = 2, **rollout: Any
) -> dict[str, Any]:
    body = example(namespace)
    body["spec"]["serving"].pop("autoscaling", None)
    body["spec"]["serving"]["replicas"] = replicas
    body["spec"]["rollout"] = {
        "steps": steps,
        "analysis": {"interval": "1s", "failureLimit": 1, "minRequests": 1},
        "scaleDownDelaySeconds": 2,
        **rollout,
    }
    return body


def start_update(cluster: Cluster, namespace: str, body: dict[str, Any], first: str) -> str:
    """Change the artifact (precision list), let the new conversion succeed; returns the new revision."""
    body["spec"]["optimization"]["precision"] = ["fp32"]
    apply_model(cluster, namespace, body)
    job = job_for_other(cluster, namespace, first)
    second = str(job["metadata"]["labels"]["ptm.dev/revision"])
    finish_job_pod(cluster, namespace, job, 0, report_for(second).compact())
    return second


def job_for_other(cluster: Cluster, namespace: str, not_revision: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        items = get(cluster, namespace, "jobs", selector="app.kubernetes.io/component=converter")["items"]
        others = [j for j in items if j["metadata"]["labels"]["ptm.dev/revision"] != not_revision]
        return others[0] if others else None

    return wait_for(find, 60, "a conversion Job for the new revision")


def at_step(cluster: Cluster, namespace: str, step: int) -> dict[str, Any] | None:
    st = model_status(cluster, namespace, "resnet50")
    return st if st.get("canaryRevision") and st.get("currentStep") == step else None


def test_healthy_update_walks_the_steps_and_promotes(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    steps = [
        {"setWeight": 10},
        {"pause": {"duration": "2s"}},
        {"analysis": {"duration": "2s"}},
        {"setWeight": 50},
        {"pause": {"duration": "2s"}},
    ]
    body = canary_model(namespace, steps)
    apply_model(cluster, namespace, body)
    first = serve_to_ready(cluster, namespace)
    second = start_update(cluster, namespace, body, first)

    seen: list[tuple[int, int]] = []

    def promoted() -> dict[str, Any] | None:
        st = model_status(cluster, namespace, "resnet50")
        if st.get("canaryRevision") == second:
            seen.append((st["currentStep"], st["canaryWeight"]))
        return st if st.get("stableRevision") == second and not st.get("canaryRevision") else None

    st = wait_for(promoted, 90, "the canary to be promoted", interval=0.1)
    steps_seen = {s for s, _ in seen}
    assert {1, 4} <= steps_seen or len(steps_seen) >= 2, seen
    assert any(w > 0 for _, w in seen), seen
    revisions = {r["revision"]: r for r in st["revisions"]}
    assert revisions[second]["state"] == "Stable"
    assert revisions[first]["state"] == "Superseded"
    # The old revision scales down after scaleDownDelaySeconds.
    wait_for(
        lambda: get(cluster, namespace, "deployment", f"resnet50-{first}") is None,
        30,
        "the old Deployment to go",
    )
    dep = get(cluster, namespace, "deployment", f"resnet50-{second}")
    assert dep["spec"]["replicas"] == 2
    ready = condition(get(cluster, namespace, "pretrainedmodels", "resnet50"), "Ready")
    assert ready is not None


def test_crash_looping_canary_is_rolled_back_without_analysis(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    body = canary_model(namespace, [{"setWeight": 50}, {"pause": {}}])
    apply_model(cluster, namespace, body)
    first = serve_to_ready(cluster, namespace)
    second = start_update(cluster, namespace, body, first)
    wait_for(lambda: at_step(cluster, namespace, 1), 60, "the canary to reach the indefinite pause")

    report_server_restart(
        cluster,
        namespace,
        second,
        ready=False,
        restarts=4,
        state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}},
        last_state={"terminated": {"exitCode": 1, "reason": "Error"}},
    )

    def rolled_back() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "pretrainedmodels", "resnet50"), "Degraded")
        return c if c and c["reason"] == "RolledBack" else None

    degraded = wait_for(rolled_back, 30, "the canary to be rolled back")
    assert "CrashLoopBackOff" in degraded["message"]
    st = model_status(cluster, namespace, "resnet50")
    assert st["stableRevision"] == first and not st.get("canaryRevision")
    assert {r["revision"]: r["state"] for r in st["revisions"]}[second] == "RolledBack"
    assert st["remediations"][-1]["action"] == "Rollback" and st["remediations"][-1]["revision"] == second
    wait_for(
        lambda: get(cluster, namespace, "deployment", f"resnet50-{second}") is None,
        30,
        "the canary Deployment to go",
    )
    assert get(cluster, namespace, "deployment", f"resnet50-{first}")["spec"]["replicas"] == 2
    wait_for(lambda: event_reasons(cluster, namespace) & {"RolledBack"}, 10, "a RolledBack Event")


def test_promote_annotation_and_operator_restart_mid_canary(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    body = canary_model(namespace, [{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}])
    apply_model(cluster, namespace, body)
    first = serve_to_ready(cluster, namespace)
    second = start_update(cluster, namespace, body, first)
    before = wait_for(lambda: at_step(cluster, namespace, 1), 60, "the canary to reach step 1")

    operator.kill()
    operator.start()
    wait_for(lambda: operator.reconciles() >= 3, 30, "the restarted operator to reconcile a few times")
    after = model_status(cluster, namespace, "resnet50")
    assert after["canaryRevision"] == second
    assert after["currentStep"] == before["currentStep"] == 1
    assert after["stepStartedAt"] == before["stepStartedAt"]
    assert after["canaryWeight"] == before["canaryWeight"]

    cluster.kubectl("annotate", "ptm", "resnet50", "-n", namespace, "ptm.dev/promote=true")
    st = wait_for(
        lambda: (s := model_status(cluster, namespace, "resnet50")).get("stableRevision") == second and s,
        30,
        "promotion by annotation",
    )
    assert not st.get("canaryRevision")
    annotations = get(cluster, namespace, "pretrainedmodels", "resnet50")["metadata"].get("annotations", {})
    assert "ptm.dev/promote" not in annotations  # consumed

    # spec.revision pins the older revision: the same machinery rolls back to it.
    body["spec"]["revision"] = first
    body["spec"]["rollout"]["steps"] = [{"setWeight": 50}]
    apply_model(cluster, namespace, body)
    wait_for(
        lambda: model_status(cluster, namespace, "resnet50").get("stableRevision") == first,
        60,
        "the pinned revision to serve again",
    )


def test_canary_without_gpus_aborts_at_progress_deadline(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    # The stable revision takes every GPU of the test's pool: the canary cannot be scheduled.
    body = canary_model(
        namespace, [{"setWeight": 50}, {"pause": {}}], replicas=POOL_GPUS, progressDeadlineSeconds=30
    )
    apply_model(cluster, namespace, body)
    first = serve_to_ready(cluster, namespace)
    second = start_update(cluster, namespace, body, first)

    def rolled_back() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "pretrainedmodels", "resnet50"), "Degraded")
        return c if c and c["reason"] == "RolledBack" else None

    degraded = wait_for(rolled_back, 75, "the rollout to abort at the progress deadline")
    assert "progressDeadlineSeconds 30" in degraded["message"]
    assert "Insufficient nvidia.com/gpu" in degraded["message"]
    st = model_status(cluster, namespace, "resnet50")
    assert st["stableRevision"] == first
    assert {r["revision"]: r["state"] for r in st["revisions"]}[second] == "RolledBack"


def poll_job(cluster: Cluster, namespace: str, exclude: set[str]) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        items = get(cluster, namespace, "jobs", selector="app.kubernetes.io/component=source-poll")["items"]
        fresh = [
            j
            for j in items
            if j["metadata"]["name"] not in exclude and not j.get("status", {}).get("succeeded")
        ]
        return fresh[0] if fresh else None

    return wait_for(find, 30, "a source-poll Job")


def answer_poll(cluster: Cluster, namespace: str, seen: set[str], digest: str) -> None:
    job = poll_job(cluster, namespace, seen)
    seen.add(job["metadata"]["name"])
    assert "--digest-only" in job["spec"]["template"]["spec"]["containers"][0]["args"]
    finish_job_pod(cluster, namespace, job, 0, json.dumps({"sourceDigest": digest}))


def test_poll_policy_rolls_out_a_changed_source_by_itself(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    body = canary_model(namespace, [{"setWeight": 50}])
    body["spec"]["source"]["updatePolicy"] = {"type": "Poll", "interval": "2s"}
    apply_model(cluster, namespace, body)
    seen: set[str] = set()
    # No conversion before the source's digest is known.
    answer_poll(cluster, namespace, seen, "a" * 64)
    first = serve_to_ready(cluster, namespace)
    rev = {r["revision"]: r for r in model_status(cluster, namespace, "resnet50")["revisions"]}[first]
    assert rev["sourceDigest"] == "a" * 64
    # The same digest again: nothing new.
    answer_poll(cluster, namespace, seen, "a" * 64)
    answer_poll(cluster, namespace, seen, "b" * 64)  # the checkpoint was replaced
    second = str(job_for_other(cluster, namespace, first)["metadata"]["labels"]["ptm.dev/revision"])
    assert second != first
    jobs = get(cluster, namespace, "jobs", selector="app.kubernetes.io/component=converter")["items"]
    assert len(jobs) == 2  # the unchanged poll made no conversion
    finish_job_pod(
        cluster, namespace, job_for_other(cluster, namespace, first), 0, report_for(second).compact()
    )
    st = wait_for(
        lambda: (s := model_status(cluster, namespace, "resnet50")).get("stableRevision") == second and s,
        60,
        "the new source's revision to roll out",
    )
    assert st["sourceDigest"] == "b" * 64
    wait_for(lambda: event_reasons(cluster, namespace) & {"SourceChanged"}, 10, "a SourceChanged Event")


GATEWAY_API = "sigs.k8s.io/gateway-api@v1.4.0"


@pytest.fixture(scope="session")
def httproute_crd(cluster: Cluster) -> None:
    """The Gateway API HTTPRoute CRD, from its official Go module (fetched from the module proxy)."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", GATEWAY_API], capture_output=True, text=True, check=True
    )
    crd = (
        Path(json.loads(out.stdout)["Dir"])
        / "config"
        / "crd"
        / "standard"
        / "gateway.networking.k8s.io_httproutes.yaml"
    )
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.wait_crd_established("httproutes.gateway.networking.k8s.io")


def backends(cluster: Cluster, namespace: str) -> list[tuple[str, int]]:
    route = get(cluster, namespace, "httproutes.gateway.networking.k8s.io", "models")
    return [(b["name"], b.get("weight", 1)) for b in route["spec"]["rules"][0]["backendRefs"]]


def test_gateway_api_routing_sets_exact_weights(
    cluster: Cluster, namespace: str, operator: Operator, httproute_crd: None
) -> None:
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "models"},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "hostnames": ["models.example.com"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v2/models/resnet50"}}],
                    "backendRefs": [{"name": "resnet50", "port": 8080}],
                }
            ],
        },
    }
    apply_model(cluster, namespace, route)
    body = canary_model(namespace, [{"setWeight": 30}, {"pause": {}}], replicas=2)
    body["spec"]["rollout"]["trafficRouting"] = {"type": "gatewayAPI", "httpRoute": {"name": "models"}}
    apply_model(cluster, namespace, body)
    first = serve_to_ready(cluster, namespace)
    wait_for(
        lambda: backends(cluster, namespace) == [(f"resnet50-{first}", 100)],
        30,
        "the route to send all traffic to the first revision",
    )
    assert (
        get(cluster, namespace, "service", f"resnet50-{first}")["spec"]["selector"]["ptm.dev/revision"]
        == first
    )

    second = start_update(cluster, namespace, body, first)
    expected = sorted([(f"resnet50-{first}", 70), (f"resnet50-{second}", 30)])
    wait_for(lambda: sorted(backends(cluster, namespace)) == expected, 60, "weights 70/30 on the route")
    st = model_status(cluster, namespace, "resnet50")
    assert st["canaryWeight"] == 30
    # Exact weights need only the canary's share of pods: ceil(2 x 30%) = 1.
    assert get(cluster, namespace, "deployment", f"resnet50-{second}")["spec"]["replicas"] == 1
    route_after = get(cluster, namespace, "httproutes.gateway.networking.k8s.io", "models")
    assert route_after["spec"]["hostnames"] == ["models.example.com"]  # the user's parts stay

    cluster.kubectl("annotate", "ptm", "resnet50", "-n", namespace, "ptm.dev/promote=true")
    wait_for(
        lambda: backends(cluster, namespace) == [(f"resnet50-{second}", 100)],
        60,
        "all traffic on the new revision",
    )
