"""`ptm doctor` against the real API server: a model whose serving pod no GPU node can take."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import yaml

from tests.conftest import Cluster, wait_for


def doctor(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ptm_operator.cli", "doctor", *args],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_doctor_names_the_pods_waiting_for_gpus(cluster: Cluster, crd_installed: str, namespace: str) -> None:
    model = {
        "apiVersion": "ptm.dev/v1alpha1",
        "kind": "PretrainedModel",
        "metadata": {"name": "resnet", "namespace": namespace},
        "spec": {"source": {"uri": "hf://org/resnet", "format": "huggingface"}},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(model))
    status = {
        "status": {
            "stableRevision": "r1",
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": m,
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
                for t, s, r, m in [
                    ("Converted", "True", "Converted", "revision r1: onnx opset 17"),
                    ("Validated", "True", "Validated", "revision r1: fp16 passed"),
                    ("Available", "False", "Starting", "0/1 serving pods of revision r1 ready"),
                    ("Ready", "False", "Starting", "Available: 0/1 serving pods of revision r1 ready"),
                ]
            ],
        }
    }
    cluster.patch_status("ptm", "resnet", namespace, status)
    labels = {
        "app.kubernetes.io/name": "ptm",
        "app.kubernetes.io/instance": "resnet",
        "app.kubernetes.io/component": "serving",
        "app.kubernetes.io/managed-by": "ptm-operator",
        "app.kubernetes.io/version": "r1",
        "ptm.dev/model": "resnet",
        "ptm.dev/revision": "r1",
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "resnet-r1-abc", "namespace": namespace, "labels": labels},
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": "ptm/serve:test",
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))

    def scheduler_message() -> str | None:
        out = cluster.kubectl("get", "pod", "resnet-r1-abc", "-n", namespace, "-o", "json").stdout
        conds: list[dict[str, Any]] = json.loads(out).get("status", {}).get("conditions") or []
        for c in conds:
            if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable":
                return str(c["message"])
        return None

    message = wait_for(scheduler_message, 60, "the scheduler to give up on the pod")
    assert "Insufficient nvidia.com/gpu" in message

    proc = doctor(cluster, "resnet", "-n", namespace)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{namespace}/resnet: Ready=False (Starting)"
    assert lines[1] == f"1. [blocking] 1 serving pod waits for nvidia.com/gpu: {message}"
    assert lines[2] == "   objects: pod/resnet-r1-abc"

    as_json = json.loads(doctor(cluster, "resnet", "-n", namespace, "--json").stdout)
    assert as_json["findings"][0]["severity"] == "blocking"
    assert as_json["findings"][0]["objects"] == ["pod/resnet-r1-abc"]

    missing = doctor(cluster, "nope", "-n", namespace)
    assert missing.returncode == 2 and "no PretrainedModel" in missing.stdout
