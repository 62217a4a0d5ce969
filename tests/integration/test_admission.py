"""The PretrainedModel CRD on the real API server: what it admits, rejects, defaults and prints.

The CRD comes from crds/ (the committed, generated file), so these tests also prove that what we
ship is accepted by kube-apiserver: structural, CEL rules within the cost budget, defaults that
pass their own rules.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ptm_operator import GROUP, KIND, PLURAL, VERSION
from ptm_operator.api import API_VERSION, PretrainedModel, PretrainedModelSpec
from ptm_operator.crdgen import CRD_FILE, CRD_NAME
from tests.conftest import REPO, Cluster, wait_for

CASES_FILE = Path(__file__).with_name("test_admission_cases.yaml")
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


# --- the case table (also read by tests/unit/test_api.py) ----------------------------------------


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def load_cases() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(base spec, cases) from test_admission_cases.yaml."""
    data = yaml.safe_load(CASES_FILE.read_text())
    return data["base"], data["cases"]


def case_spec(base: dict[str, Any], case: dict[str, Any]) -> dict[str, Any] | None:
    """The spec a case describes (None: the manifest has no spec)."""
    spec: dict[str, Any] | None = (
        copy.deepcopy(case["spec"]) if "spec" in case else _merge(base, case["patch"])
    )
    return spec


def manifest(name: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}}
    if spec is not None:
        body["spec"] = spec
    return body


BASE, CASES = load_cases()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> str:
    """The committed CRD, server-side applied and Established."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=ptm-tests", "-f", str(REPO / CRD_FILE)
    )
    cluster.wait_crd_established(CRD_NAME)
    return CRD_NAME


@pytest.fixture(scope="module")
def shared_namespace(cluster: Cluster, crd: str) -> Iterator[str]:
    """One namespace for the dry-run table (dry runs leave nothing behind)."""
    name = f"t-admission-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def custom_objects(k8s_api: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(k8s_api)


def _not_kept(written: Any, stored: Any, path: str) -> list[str]:
    """Paths of what was written but is not in the stored object (defaults may be added)."""
    if isinstance(written, dict) and isinstance(stored, dict):
        return [p for k, v in written.items() for p in _not_kept(v, stored.get(k), f"{path}.{k}")]
    if isinstance(written, list) and isinstance(stored, list) and len(written) == len(stored):
        return [
            p
            for i, (w, s) in enumerate(zip(written, stored, strict=True))
            for p in _not_kept(w, s, f"{path}[{i}]")
        ]
    return [] if written == stored else [path]


def kubectl_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


# --- tests ---------------------------------------------------------------------------------------


def test_case_table_is_big_enough_and_unique() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted(cluster: Cluster, crd: str, namespace: str, example: Path) -> None:
    out = cluster.kubectl("apply", "-n", namespace, "-f", str(example))
    assert "created" in out.stdout
    source = yaml.safe_load(example.read_text())
    stored = kubectl_json(cluster, "get", "ptm", source["metadata"]["name"], "-n", namespace)
    # What the user wrote survives as written (nothing pruned, only defaults added) ...
    missing = _not_kept(source["spec"], stored["spec"], "spec")
    assert not missing, f"the API server dropped or changed: {missing}"
    # ... and the operator can parse what the server stored.
    model = PretrainedModel.from_body(stored)
    assert model.metadata.name == source["metadata"]["name"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_malformed_manifest_is_rejected(
    custom_objects: Any, shared_namespace: str, case: dict[str, Any]
) -> None:
    from kubernetes.client.exceptions import ApiException

    body = manifest(f"bad-{case['id']}"[:63], case_spec(BASE, case))
    with pytest.raises(ApiException) as raised:
        custom_objects.create_namespaced_custom_object(
            GROUP, VERSION, shared_namespace, PLURAL, body, dry_run="All", field_validation="Strict"
        )
    error = raised.value
    assert error.status in (400, 422), f"expected a validation error, got {error.status}: {error.body}"
    status = json.loads(str(error.body))
    message: str = status["message"]
    # The error is reported at the field (the path followed by ":" or a deeper path).
    assert re.search(rf"(^|[\s\[\"]){re.escape(case['field'])}[:.\[\"]", message), (
        f"error does not name {case['field']}: {message}"
    )
    if "message" in case:
        assert case["message"] in message, message
    if error.status == 422:  # validation errors also carry the field in machine-readable form
        fields = [cause.get("field", "") for cause in status["details"]["causes"]]
        assert any(case["field"] in f or f in case["field"] for f in fields if f), fields


def test_valid_base_manifest_is_accepted(custom_objects: Any, shared_namespace: str) -> None:
    """The base every malformed case starts from is itself valid, so each rejection is the case's."""
    created = custom_objects.create_namespaced_custom_object(
        GROUP,
        VERSION,
        shared_namespace,
        PLURAL,
        manifest("base", BASE),
        dry_run="All",
        field_validation="Strict",
    )
    assert created["spec"]["source"] == {**BASE["source"], **created["spec"]["source"]}


def test_minimal_manifest_reads_back_with_defaults(cluster: Cluster, crd: str, namespace: str) -> None:
    minimal = yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())
    assert set(minimal["spec"]) == {"source"}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(minimal))
    stored = kubectl_json(cluster, "get", "ptm", minimal["metadata"]["name"], "-n", namespace)

    # The API server fills in exactly the defaults the pydantic models document.
    expected = PretrainedModelSpec.model_validate(minimal["spec"]).wire()
    assert stored["spec"] == expected
    # Spot checks, readable on failure.
    spec = stored["spec"]
    assert spec["serving"]["replicas"] == 1
    assert spec["serving"]["port"] == 8080
    assert spec["serving"]["batching"]["maxBatchSize"] == 8
    assert spec["optimization"]["precision"] == ["fp32"]
    assert spec["validation"]["failurePolicy"] == "Block"
    assert spec["rollout"]["strategy"] == "Canary"
    assert [s.get("setWeight") for s in spec["rollout"]["steps"] if "setWeight" in s] == [10, 50]
    assert spec["remediation"]["memoryBumpOnOOM"]["ceiling"] == "16Gi"
    assert spec["source"]["updatePolicy"] == {"type": "Manual", "interval": "1h"}
    assert "revision" not in spec


def test_kubectl_explain_describes_rollout(cluster: Cluster, crd: str) -> None:
    def explained() -> str | None:
        proc = cluster.kubectl("explain", "ptm.spec.rollout", check=False)
        return proc.stdout if proc.returncode == 0 and "strategy" in proc.stdout else None

    text = wait_for(explained, 60, "kubectl explain ptm.spec.rollout")
    assert "How a new revision replaces the serving one" in text
    for field, described in [
        ("strategy", "rolled back on failure"),
        ("steps", "setWeight values must increase"),
        ("trafficRouting", "How weights are applied to traffic"),
        ("analysis", "Health criteria checked while the canary takes traffic"),
        ("revisionHistoryLimit", "Old revisions kept"),
        ("progressDeadlineSeconds", "makes no progress"),
    ]:
        assert field in text, f"{field} missing from:\n{text}"
        assert described in " ".join(text.split()), f"description of {field} missing from:\n{text}"

    steps = cluster.kubectl("explain", "ptm.spec.rollout.steps.pause").stdout
    assert "until the user promotes" in " ".join(steps.split())


def test_kubectl_get_shows_printer_columns(cluster: Cluster, crd: str, namespace: str) -> None:
    minimal = yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())
    name = minimal["metadata"]["name"]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(minimal))
    # What the operator will write, through the status subresource (which also proves the status
    # schema admits it).
    status = {
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Serving",
                    "message": "2/2 replicas ready",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                    "observedGeneration": 1,
                },
                {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "CanaryStep",
                    "message": "step 2 of 6",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                },
            ],
            "revisions": [
                {"revision": "a1b2c3d4e5", "state": "Stable", "precision": "fp16"},
                {"revision": "f6e7d8c9b0", "state": "Canary", "precision": "int8-dynamic"},
            ],
            "stableRevision": "a1b2c3d4e5",
            "canaryRevision": "f6e7d8c9b0",
            "currentStep": 2,
            "canaryWeight": 10,
            "endpoint": {
                "rest": f"http://{name}.{namespace}.svc:8080",
                "grpc": f"{name}.{namespace}.svc:8081",
            },
            "replicas": 3,
            "readyReplicas": 2,
        }
    }
    cluster.patch_status("ptm", name, namespace, status)

    table = cluster.kubectl("get", "ptm", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "REVISION", "PRECISION", "CANARY", "ENDPOINT", "AGE"]
    row = table[1].split()
    assert row[:6] == [name, "True", "a1b2c3d4e5", "fp16", "10", f"http://{name}.{namespace}.svc:8080"]

    wide = cluster.kubectl("get", "pretrainedmodels", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-4:] == ["REASON", "CANARY-REVISION", "STEP", "READY-REPLICAS"]
    assert wide[1].split()[-4:] == ["Serving", "f6e7d8c9b0", "2", "2"]

    # The operator's own model reads the status back.
    model = PretrainedModel.from_body(kubectl_json(cluster, "get", "ptm", name, "-n", namespace))
    assert model.status.stable_revision == "a1b2c3d4e5"
    assert [c.type for c in model.status.conditions] == ["Ready", "Progressing"]


def test_status_is_a_subresource(cluster: Cluster, crd: str, namespace: str) -> None:
    """A user's spec write cannot set status (only the operator, through /status, can)."""
    minimal = yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())
    minimal["status"] = {"stableRevision": "forged"}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(minimal))
    stored = kubectl_json(cluster, "get", "ptm", minimal["metadata"]["name"], "-n", namespace)
    assert stored.get("status", {}).get("stableRevision") is None


def test_short_name_and_category(cluster: Cluster, crd: str) -> None:
    resources = cluster.kubectl("api-resources", f"--api-group={GROUP}", "-o", "wide").stdout
    line = next(ln for ln in resources.splitlines() if ln.startswith(PLURAL))
    assert " ptm " in f" {line} "
    assert "ml" in line.split()[-1]
    assert "PretrainedModel" in line
