"""The operator against the real API server with kwok GPU nodes.

The operator runs as a real subprocess (`ptm operator`) watching the test's namespace, so it can
be SIGKILLed and restarted. kwok runs the Job's and the Deployment's pods; the test plays the
converter by patching the Job pod's status with a report in its termination message, exactly
what the kubelet would write.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ptm_runtime.options import Precision, TensorSpec
from ptm_runtime.report import EXIT_VALIDATION_FAILED, Candidate, Metrics, Report
from tests.conftest import REPO, Cluster, wait_for

EXAMPLE = REPO / "examples" / "vision-resnet.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Operator:
    """`ptm operator` as a subprocess watching one namespace."""

    def __init__(self, cluster: Cluster, namespace: str, log: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "PTM_STORE_URI": "file:///var/lib/ptm-test-store",
            "PTM_REQUEUE_SECONDS": "1",
            "PTM_HEALTH_INTERVAL_SECONDS": "1",
            "PTM_METRICS_PORT": str(free_port()),
            "PTM_LIVENESS_PORT": "0",
            "PTM_CONVERTER_IMAGE": "ptm/convert:test",
            "PTM_SERVE_IMAGE": "ptm/serve:test",
        }
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ptm_operator.cli", "operator", "--standalone", "-n", self.namespace],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture
def operator(cluster: Cluster, crd_installed: str, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    runtime_class = {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": "nvidia"},
        "handler": "nvidia",
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(runtime_class))
    op = Operator(cluster, namespace, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()


# --- helpers ------------------------------------------------------------------------------------


def get(
    cluster: Cluster, namespace: str, kind: str, name: str | None = None, selector: str | None = None
) -> Any:
    args = ["get", kind, "-n", namespace, "-o", "json"]
    if name:
        args.insert(2, name)
    if selector:
        args += ["-l", selector]
    proc = cluster.kubectl(*args, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)


def condition(obj: Any, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return None


def apply_model(cluster: Cluster, namespace: str, body: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


def example(name: str = "resnet50") -> dict[str, Any]:
    """The vision example, asking for the GPU model the kwok nodes advertise."""
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["name"] = name
    body["spec"]["serving"]["gpuSelector"]["products"] = ["NVIDIA-H100-80GB-HBM3"]
    return body


def report_for(revision: str, *, passed: bool = True) -> Report:
    return Report(
        artifact_uri=f"file:///var/lib/ptm-test-store/ns/model/{revision}/model.onnx",
        sha256="ab" * 32,
        size_bytes=46_000_000,
        opset=18,
        precision=Precision.FP16 if passed else Precision.FP32,
        inputs=[TensorSpec(name="input", shape=[-1, 3, 224, 224])],
        outputs=[TensorSpec(name="logits", shape=[-1, 1000])],
        exporter="dynamo",
        optimizations=["ort-extended", "fp16"],
        validation_passed=passed,
        metrics=Metrics(cosine_similarity=0.9995, top1_agreement=1.0),
        candidates=[
            Candidate(
                precision=Precision.FP16,
                passed=passed,
                reason="" if passed else "top-1 agreement 0.82 < 0.99",
            ),
            Candidate(
                precision=Precision.FP32, passed=passed, reason="" if passed else "cosine 0.97 < 0.999"
            ),
        ],
    )


def job_for(cluster: Cluster, namespace: str, revision: str | None = None) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        jobs = get(cluster, namespace, "jobs", selector="app.kubernetes.io/component=converter")
        items = [
            j
            for j in (jobs or {}).get("items", [])
            if revision is None or j["metadata"]["labels"]["ptm.dev/revision"] == revision
        ]
        return items[0] if items else None

    return wait_for(find, 60, f"a conversion Job{' for ' + revision if revision else ''}")


def finish_job_pod(
    cluster: Cluster, namespace: str, job: dict[str, Any], exit_code: int, message: str
) -> None:
    """Write what a kubelet writes when the converter container exits."""
    job_name = job["metadata"]["name"]

    def running_pod() -> dict[str, Any] | None:
        pods = get(cluster, namespace, "pods", selector=f"batch.kubernetes.io/job-name={job_name}")
        items = [
            p for p in (pods or {}).get("items", []) if (p.get("status") or {}).get("phase") == "Running"
        ]
        return items[0] if items else None

    pod = wait_for(running_pod, 60, f"the pod of Job {job_name} to run on a kwok node")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    phase = "Succeeded" if exit_code == 0 else "Failed"
    status = {
        "status": {
            "phase": phase,
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
            ],
            "containerStatuses": [
                {
                    "name": "convert",
                    "image": pod["spec"]["containers"][0]["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Completed" if exit_code == 0 else "Error",
                            "message": message,
                            "startedAt": now,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
    }
    cluster.kubectl(
        "patch",
        "pod",
        pod["metadata"]["name"],
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def model_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = get(cluster, namespace, "pretrainedmodels", name)
    return dict((obj or {}).get("status") or {})


def serve_to_ready(cluster: Cluster, namespace: str, name: str = "resnet50") -> str:
    """Drive a freshly applied model through conversion to Ready; returns its revision."""
    job = job_for(cluster, namespace)
    revision = job["metadata"]["labels"]["ptm.dev/revision"]
    finish_job_pod(cluster, namespace, job, 0, report_for(revision).compact())
    wait_for(
        lambda: (
            (c := condition(get(cluster, namespace, "pretrainedmodels", name), "Ready"))
            and c["status"] == "True"
            and c
        ),
        90,
        f"{name} Ready=True",
    )
    return str(revision)


# --- tests ------------------------------------------------------------------------------------------


def test_conversion_then_gpu_serving_then_ready(cluster: Cluster, namespace: str, operator: Operator) -> None:
    apply_model(cluster, namespace, example())
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
    assert nodes and all(n.startswith("kwok-gpu-") for n in nodes)
    for kind in ("service/resnet50", "pdb/resnet50", "hpa/resnet50"):
        assert cluster.kubectl("get", kind, "-n", namespace, check=False).returncode == 0, kind


def test_failed_validation_keeps_previous_revision_and_serving_change_does_not_reconvert(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    body = example()
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
    finish_job_pod(
        cluster, namespace, jobs[0], EXIT_VALIDATION_FAILED, report_for(second, passed=False).compact()
    )
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
    apply_model(cluster, namespace, example())
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
    # Give the restarted operator a few reconciles, then count children.
    wait_for(
        lambda: model_status(cluster, namespace, "resnet50").get("observedGeneration") == 1,
        30,
        "the restarted operator to report",
    )
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


def test_more_gpu_replicas_than_nodes_hold_is_reported(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    gpus = sum(int(n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")) for n in nodes)
    body = example("big")
    body["spec"]["serving"].pop("autoscaling", None)
    body["spec"]["serving"]["replicas"] = gpus + 2
    apply_model(cluster, namespace, body)
    job = job_for(cluster, namespace)
    finish_job_pod(
        cluster, namespace, job, 0, report_for(job["metadata"]["labels"]["ptm.dev/revision"]).compact()
    )

    def waiting() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "pretrainedmodels", "big"), "Available")
        return c if c and c["reason"] == "Unschedulable" else None

    available = wait_for(waiting, 90, "Available to report unschedulable pods")
    assert available["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in available["message"]
    assert "2 pod(s) wait" in available["message"]
    ready = condition(get(cluster, namespace, "pretrainedmodels", "big"), "Ready")
    assert ready is not None and ready["status"] == "False"
