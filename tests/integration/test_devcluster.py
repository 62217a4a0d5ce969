"""The local cluster schedules GPU pods for real: kube-scheduler binds, kwok runs them."""

from __future__ import annotations

import json
import time
from typing import Any

import yaml

from tests.conftest import Cluster


def gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/ptm/serve:dev",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def get_pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout
    pod: dict[str, Any] = json.loads(out)
    return pod


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def test_gpu_pod_binds_to_kwok_gpu_node_and_runs(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(gpu_pod("one-gpu", 1)))

    def running() -> dict[str, Any] | None:
        pod = get_pod(cluster, namespace, "one-gpu")
        return pod if pod.get("status", {}).get("phase") == "Running" else None

    pod = wait_for(running, 60, "the 1-GPU pod to run")
    node_name = pod["spec"]["nodeName"]
    node = json.loads(cluster.kubectl("get", "node", node_name, "-o", "json").stdout)
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_pod_asking_for_more_gpus_than_any_node_has_stays_pending(cluster: Cluster, namespace: str) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    most = max(int(n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")) for n in nodes)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(gpu_pod("too-many", most + 1)))

    def unschedulable() -> dict[str, Any] | None:
        pod = get_pod(cluster, namespace, "too-many")
        for cond in pod.get("status", {}).get("conditions", []):
            if (
                cond["type"] == "PodScheduled"
                and cond["status"] == "False"
                and cond["reason"] == "Unschedulable"
            ):
                return cond
        return None

    cond = wait_for(unschedulable, 60, "the scheduler to mark the pod Unschedulable")
    assert "nvidia.com/gpu" in cond["message"]
    pod = get_pod(cluster, namespace, "too-many")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_pod_without_gpu_toleration_avoids_gpu_nodes(cluster: Cluster, namespace: str) -> None:
    plain = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "cpu-only"},
        "spec": {"containers": [{"name": "main", "image": "registry.invalid/ptm/serve:dev"}]},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(plain))
    pod = wait_for(
        lambda: (p := get_pod(cluster, namespace, "cpu-only"))["spec"].get("nodeName") and p,
        60,
        "the CPU pod to be bound",
    )
    node = json.loads(cluster.kubectl("get", "node", pod["spec"]["nodeName"], "-o", "json").stdout)
    assert "nvidia.com/gpu.present" not in node["metadata"]["labels"]
