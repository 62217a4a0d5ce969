"""Shared pieces of the operator's integration tests: the operator subprocess and kube helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ptm_operator.devcluster import exited_pod_status
from ptm_operator.devcluster.runner import LocalOperator
from ptm_runtime.options import Precision, TensorSpec
from ptm_runtime.report import EXIT_VALIDATION_FAILED, Candidate, Failure, Metrics, Report
from tests.conftest import REPO, Cluster, wait_for

EXAMPLE = REPO / "examples" / "vision-resnet.yaml"


class Operator(LocalOperator):
    """`ptm operator` as a subprocess watching one namespace (kwok nodes: images never pulled)."""

    def __init__(self, cluster: Cluster, namespace: str, log: Path) -> None:
        super().__init__(
            cluster.kubeconfig,
            namespace,
            log,
            {
                "PTM_STORE_URI": "file:///var/lib/ptm-test-store",
                "PTM_REQUEUE_SECONDS": "1",
                "PTM_HEALTH_INTERVAL_SECONDS": "1",
                "PTM_CONVERTER_IMAGE": "ptm/convert:test",
                "PTM_SERVE_IMAGE": "ptm/serve:test",
            },
        )
        self.cluster = cluster

    def reconciles(self) -> float:
        """Reconciles this operator process has finished (from its /metrics)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return 0.0
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("ptm_operator_reconciles_total{")
        )


# --- helpers ------------------------------------------------------------------------------------


def get(
    cluster: Cluster,
    namespace: str,
    kind: str,
    name: str | None = None,
    selector: str | None = None,
    managed_fields: bool = False,
) -> Any:
    args = ["get", kind, "-n", namespace, "-o", "json"]
    if name:
        args.insert(2, name)
    if selector:
        args += ["-l", selector]
    if managed_fields:
        args.append("--show-managed-fields")
    proc = cluster.kubectl(*args, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)


def event_reasons(cluster: Cluster, namespace: str) -> set[str]:
    """Reasons of the namespace's Events (the operator posts them in the background)."""
    items = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return {str(e.get("reason")) for e in items}


def condition(obj: Any, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return None


def apply_model(cluster: Cluster, namespace: str, body: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


POOL_LABEL = "ptm.dev/test-pool"
POOL_GPUS = 4


def pool_node(namespace: str) -> dict[str, Any]:
    """A kwok GPU node of the test's own (POOL_GPUS GPUs), so tests never compete for GPUs."""
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(POOL_GPUS)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": f"pool-{namespace}"[:63],
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "type": "kwok",
                POOL_LABEL: namespace,
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.memory": "81559",
            },
        },
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def example(namespace: str, name: str = "resnet50") -> dict[str, Any]:
    """The vision example, asking for the GPU model the kwok nodes advertise, on the test's pool."""
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["name"] = name
    body["spec"]["serving"]["gpuSelector"]["products"] = ["NVIDIA-H100-80GB-HBM3"]
    body["spec"]["serving"]["nodeSelector"] = {POOL_LABEL: namespace}
    return body


def report_for(revision: str) -> Report:
    """What `ptm convert` writes when fp16 passes the gate."""
    return Report(
        artifact_uri=f"file:///var/lib/ptm-test-store/ns/model/{revision}/model.onnx",
        sha256="ab" * 32,
        size_bytes=46_000_000,
        opset=18,
        precision=Precision.FP16,
        inputs=[TensorSpec(name="input", shape=[-1, 3, 224, 224])],
        outputs=[TensorSpec(name="logits", shape=[-1, 1000])],
        exporter="dynamo",
        optimizations=["ort-extended", "fp16"],
        validation_passed=True,
        metrics=Metrics(cosine_similarity=0.9995, top1_agreement=1.0),
        candidates=[
            Candidate(precision=Precision.FP16, passed=True),
            Candidate(precision=Precision.FP32, passed=True),
        ],
    )


def failure_for(revision: str) -> Failure:
    """What `ptm convert` writes when no candidate passes the gate."""
    return Failure(
        revision=revision,
        reason="ValidationFailed",
        message="no candidate passed the validation gate",
        exit_code=EXIT_VALIDATION_FAILED,
        permanent=True,
        candidates=[
            Candidate(precision=Precision.INT8_DYNAMIC, passed=False, reason="top-1 agreement 0.82 < 0.99"),
            Candidate(precision=Precision.FP32, passed=False, reason="cosine 0.97 < 0.999"),
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
    status = exited_pod_status(pod, "convert", exit_code, message)
    cluster.patch_status("pod", pod["metadata"]["name"], namespace, status)


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


def report_server_restart(
    cluster: Cluster,
    namespace: str,
    revision: str,
    *,
    ready: bool,
    restarts: int,
    state: dict[str, Any],
    last_state: dict[str, Any],
) -> str:
    """Write, as the kubelet would, a restart history on a running serving pod of `revision`
    (a crash loop, an OOMKilled restart); returns the pod's name."""

    def running() -> dict[str, Any] | None:
        pods = get(
            cluster,
            namespace,
            "pods",
            selector=f"ptm.dev/revision={revision},app.kubernetes.io/component=serving",
        )
        items = [p for p in pods["items"] if p["status"].get("phase") == "Running"]
        return items[0] if items else None

    pod = wait_for(running, 60, f"a running serving pod of revision {revision}")
    status = {
        "status": {
            "containerStatuses": [
                {
                    "name": "server",
                    "image": pod["spec"]["containers"][0]["image"],
                    "imageID": "",
                    "ready": ready,
                    "restartCount": restarts,
                    "state": state,
                    "lastState": last_state,
                }
            ]
        }
    }
    name: str = pod["metadata"]["name"]
    cluster.patch_status("pod", name, namespace, status)
    return name
