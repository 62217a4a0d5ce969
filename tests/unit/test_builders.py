"""Builders: (model, settings, store) -> plain dict manifests, checked field by field."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from ptm_operator.api import PretrainedModel
from ptm_operator.builders import jobs, serving
from ptm_operator.builders.common import (
    GPU_RESOURCE,
    GPU_TOLERATION,
    RUN_AS_USER,
    owner_reference,
    resources,
    tolerations,
)
from ptm_operator.builders.names import (
    COMPONENT_LABEL,
    INSTANCE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_LABEL,
    NAME_LABEL,
    REVISION_LABEL,
    VERSION_LABEL,
    dns_name,
    labels,
    selector,
)
from ptm_operator.builders.store import STORE_VOLUME, Store, store_from_settings
from ptm_operator.revision import artifact_inputs
from ptm_operator.settings import Settings
from ptm_runtime.report import PERMANENT_EXIT_CODES
from tests.unit.specs import resnet_s3_source

SETTINGS = Settings()
STORE = store_from_settings(Settings(store_uri="file:///var/lib/ptm"))
REV = "3f9a2c71be"
UID = "6a1d2e3f-0000-4000-8000-00000000beef"

#: DNS-1123 label (Job, Deployment, PDB, HPA, NetworkPolicy names; label values).
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: DNS-1035 label: what a Service name must be (starts with a letter).
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: A label value (metav1 validation).
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

RESNET: dict[str, Any] = {
    "apiVersion": "ptm.dev/v1alpha1",
    "kind": "PretrainedModel",
    "metadata": {"name": "resnet50", "namespace": "vision", "uid": UID, "generation": 3},
    "spec": {
        "source": resnet_s3_source(),
        "optimization": {"precision": ["fp16", "fp32"]},
        "serving": {
            "executionProviders": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
            "batching": {"maxBatchSize": 32, "maxQueueDelayMs": 2},
            "resources": {
                "requests": {"cpu": "2", "memory": "4Gi"},
                "limits": {"memory": "8Gi", "nvidia.com/gpu": 1},
            },
            "runtimeClassName": "nvidia",
        },
    },
}


def model(name: str = "resnet50", **spec: Any) -> PretrainedModel:
    """The vision example with spec sections replaced (serving={...} is merged one level deep)."""
    body = copy.deepcopy(RESNET)
    body["metadata"]["name"] = name
    for key, value in spec.items():
        if key == "serving":
            body["spec"][key] = {**body["spec"][key], **value}
        else:
            body["spec"][key] = value
    return PretrainedModel.from_body(body)


def cpu_model(**serving_spec: Any) -> PretrainedModel:
    return model(
        serving={"resources": {"requests": {"cpu": "1"}, "limits": {"memory": "2Gi"}}, **serving_spec}
    )


def deployment(m: PretrainedModel, replicas: int | None = 2, size_bytes: int | None = None) -> dict[str, Any]:
    return serving.serving_deployment(
        m,
        REV,
        STORE.artifact_dir("vision", m.metadata.name, REV),
        replicas,
        SETTINGS,
        STORE,
        size_bytes=size_bytes,
    )


def job(m: PretrainedModel, settings: Settings = SETTINGS, store: Store = STORE) -> dict[str, Any]:
    return jobs.conversion_job(m, REV, settings, store)


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(manifest)["containers"]
    assert len(containers) == 1
    return containers[0]


def every_manifest(m: PretrainedModel) -> list[dict[str, Any]]:
    """One of each kind the builders make (autoscaling and network policy switched on)."""
    auto = model(
        m.metadata.name,
        serving={"autoscaling": {"minReplicas": 1, "maxReplicas": 4}, "networkPolicy": {"enabled": True}},
    )
    keda = model(m.metadata.name, serving={"autoscaling": {"minReplicas": 0, "maxReplicas": 4, "keda": {}}})
    out = [
        job(m),
        deployment(m),
        serving.service(m),
        serving.pod_disruption_budget(m),
        serving.horizontal_pod_autoscaler(auto, REV),
        serving.keda_scaled_object(keda, REV),
        serving.network_policy(auto),
    ]
    return [x for x in out if x is not None]


# --- names and labels -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("resnet50",), "resnet50"),
        (("resnet50", "convert", REV), f"resnet50-convert-{REV}"),
        (("ResNet_50.v2",), "resnet-50-v2"),
        (("resnet50", "", REV), f"resnet50-{REV}"),
        (("--a..b--",), "a-b"),
        (("___",), "x"),
    ],
)
def test_dns_name_joins_and_normalizes(parts: tuple[str, ...], expected: str) -> None:
    assert dns_name(*parts) == expected


@pytest.mark.parametrize("max_len", [63, 52, 47, 20])
@pytest.mark.parametrize(
    "raw",
    ["a" * 100, "model-" * 20, "x" * 54 + "-" * 20 + "y", "Big.Model_Name." * 12, ("a" * 62) + "-b"],
)
def test_long_names_are_truncated_with_a_stable_hash_suffix(raw: str, max_len: int) -> None:
    name = dns_name(raw, "convert", REV, max_len=max_len)
    assert len(name) <= max_len
    assert DNS1123_LABEL.match(name), name
    assert re.search(r"-[0-9a-f]{8}$", name), name
    assert dns_name(raw, "convert", REV, max_len=max_len) == name
    assert dns_name(raw, "convert", "0000000000", max_len=max_len) != name


def test_names_that_fit_get_no_hash() -> None:
    assert dns_name("m" * 63) == "m" * 63
    assert dns_name("m" * 64) != "m" * 64
    assert len(dns_name("m" * 64)) == 63


#: The longest legal object name (DNS-1123 subdomain, 253 characters, dots allowed).
LONGEST = ".".join(["segment-of-a-very-long-name"] * 9)[:253].rstrip(".-")


@pytest.mark.parametrize("name", ["resnet50", "a", LONGEST, "bert.base.uncased"])
def test_child_names_fit_their_limits(name: str) -> None:
    m = model(name)
    assert len(jobs.job_name(m, REV)) <= 52  # pod names append 6 characters, labels cap at 63
    assert len(serving.deployment_name(m, REV)) <= 47  # pod names append 16 characters
    for manifest in every_manifest(m):
        obj = manifest["metadata"]["name"]
        assert len(obj) <= 63 and DNS1123_LABEL.match(obj), (manifest["kind"], obj)
        for value in manifest["metadata"]["labels"].values():
            assert len(value) <= 63 and LABEL_VALUE.match(value), (manifest["kind"], value)


def test_children_of_different_revisions_do_not_collide() -> None:
    m = model(LONGEST)
    assert jobs.job_name(m, REV) != jobs.job_name(m, "0123456789")
    assert serving.deployment_name(m, REV) != serving.deployment_name(m, "0123456789")


def test_labels_and_selector() -> None:
    with_rev = labels("resnet50", "serving", REV)
    assert with_rev == {
        NAME_LABEL: "ptm",
        INSTANCE_LABEL: "resnet50",
        COMPONENT_LABEL: "serving",
        MANAGED_BY_LABEL: MANAGED_BY,
        MODEL_LABEL: "resnet50",
        REVISION_LABEL: REV,
        VERSION_LABEL: REV,
    }
    assert REVISION_LABEL not in labels("resnet50", "serving")
    assert VERSION_LABEL not in labels("resnet50", "serving")
    sel = selector("resnet50", "serving", REV)
    assert VERSION_LABEL not in sel
    assert sel.items() <= with_rev.items()
    assert REVISION_LABEL not in selector("resnet50", "serving")


@pytest.mark.parametrize("name", ["resnet50", LONGEST])
def test_every_child_is_owned_namespaced_and_labelled(name: str) -> None:
    m = model(name)
    for manifest in every_manifest(m):
        meta = manifest["metadata"]
        assert meta["namespace"] == "vision"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "ptm.dev/v1alpha1",
                "kind": "PretrainedModel",
                "name": name,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][MANAGED_BY_LABEL] == MANAGED_BY
        assert meta["labels"][NAME_LABEL] == "ptm"
        assert meta["labels"][INSTANCE_LABEL] == dns_name(name)
    assert owner_reference(m)["uid"] == UID


def test_pod_templates_match_their_selectors() -> None:
    m = model()
    dep = deployment(m)
    assert (
        dep["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )
    svc = serving.service(m)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    pdb = serving.pod_disruption_budget(m)
    assert pdb["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1
    j = job(m)
    assert j["spec"]["template"]["metadata"]["labels"][COMPONENT_LABEL] == jobs.COMPONENT
    assert j["spec"]["template"]["metadata"]["labels"][REVISION_LABEL] == REV


# --- security context, resources, scheduling ----------------------------------------------------------


@pytest.mark.parametrize("build", [job, deployment], ids=["job", "deployment"])
def test_pods_meet_the_restricted_pod_security_standard(build: Any) -> None:
    manifest = build(model())
    pod = pod_spec(manifest)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    sc = container(manifest)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    # a read-only root needs a writable /tmp (HOME points there)
    assert {"name": "tmp", "mountPath": "/tmp"} in container(manifest)["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert {"name": "HOME", "value": "/tmp"} in container(manifest)["env"]


@pytest.mark.parametrize(
    ("requests", "limits", "expected"),
    [
        (
            {"cpu": "500m", "memory": "1Gi"},
            {"memory": "2Gi"},
            {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        ),
        (
            {"cpu": "2", "nvidia.com/gpu": 1},
            {"memory": "8Gi"},
            {"requests": {"cpu": "2"}, "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"}},
        ),
        (
            {"nvidia.com/gpu": 2},
            {"nvidia.com/gpu": 2},
            {"requests": {}, "limits": {"nvidia.com/gpu": "2"}},
        ),
        (
            {"cpu": 1, "amd.com/gpu": "1"},
            {},
            {"requests": {"cpu": "1"}, "limits": {"amd.com/gpu": "1"}},
        ),
    ],
)
def test_gpus_go_to_limits(
    requests: dict[str, Any], limits: dict[str, Any], expected: dict[str, Any]
) -> None:
    m = cpu_model(resources={"requests": requests, "limits": limits})
    assert resources(m.spec.serving.resources) == expected
    assert container(deployment(m))["resources"] == expected


GPU_TOL = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("user", "gpus", "added"),
    [
        pytest.param([], 0, False, id="no GPUs, nothing"),
        pytest.param(
            [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            0,
            False,
            id="no GPUs, user only",
        ),
        pytest.param([], 1, True, id="GPU added"),
        pytest.param(
            [{"key": "dedicated", "operator": "Equal", "value": "ml"}], 2, True, id="GPU added after user's"
        ),
        pytest.param([GPU_TOL], 1, False, id="GPU already tolerated"),
        pytest.param([{"key": GPU_RESOURCE, "operator": "Exists"}], 1, False, id="any effect covers"),
        pytest.param([{"operator": "Exists"}], 1, False, id="tolerate-everything covers"),
        pytest.param(
            [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "PreferNoSchedule"}],
            1,
            True,
            id="other effect does not cover",
        ),
        pytest.param(
            [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoExecute"}],
            1,
            True,
            id="NoExecute does not cover",
        ),
        pytest.param(
            [{"key": "other", "operator": "Exists", "effect": "NoSchedule"}],
            1,
            True,
            id="other key does not cover",
        ),
    ],
)
def test_gpu_toleration_only_when_gpus_are_requested_and_not_tolerated(
    user: list[dict[str, Any]], gpus: int, added: bool
) -> None:
    limits: dict[str, Any] = {"memory": "2Gi"} | ({"nvidia.com/gpu": gpus} if gpus else {})
    m = model(serving={"tolerations": user, "resources": {"requests": {"cpu": "1"}, "limits": limits}})
    wired = [t.wire() for t in m.spec.serving.tolerations]
    assert tolerations(m.spec.serving.tolerations, gpus) == wired + ([GPU_TOLERATION] if added else [])
    assert pod_spec(deployment(m))["tolerations"] == wired + ([GPU_TOLERATION] if added else [])


def test_gpu_toleration_is_a_copy() -> None:
    out = tolerations([], 1)
    out[0]["effect"] = "NoExecute"
    assert GPU_TOLERATION["effect"] == "NoSchedule"


def test_conversion_job_tolerates_gpus_only_when_it_asks_for_them() -> None:
    assert pod_spec(job(model()))["tolerations"] == []
    gpu_job = job(
        model(
            conversion={
                "resources": {"requests": {"cpu": "4"}, "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
            }
        )
    )
    assert pod_spec(gpu_job)["tolerations"] == [GPU_TOLERATION]
    assert container(gpu_job)["resources"]["limits"]["nvidia.com/gpu"] == "1"


PRODUCT_EXPR = {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A10G", "NVIDIA-L4"]}
MEMORY_EXPR = {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["15999"]}
ZONE_EXPR = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}


def _required(affinity: dict[str, Any] | None) -> Any:
    assert affinity is not None
    return affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]


@pytest.mark.parametrize(
    ("gpu_selector", "user_affinity", "terms"),
    [
        ({"products": ["NVIDIA-A10G", "NVIDIA-L4"]}, None, [{"matchExpressions": [PRODUCT_EXPR]}]),
        ({"minMemoryMiB": 16000}, None, [{"matchExpressions": [MEMORY_EXPR]}]),
        (
            {"products": ["NVIDIA-A10G", "NVIDIA-L4"], "minMemoryMiB": 16000},
            None,
            [{"matchExpressions": [PRODUCT_EXPR, MEMORY_EXPR]}],
        ),
        (
            {"minMemoryMiB": 16000},
            {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [ZONE_EXPR]},
                            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                        ]
                    }
                }
            },
            [  # terms are ORed: each must demand the GPU
                {"matchExpressions": [ZONE_EXPR, MEMORY_EXPR]},
                {
                    "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}],
                    "matchExpressions": [MEMORY_EXPR],
                },
            ],
        ),
    ],
)
def test_gpu_selector_becomes_required_node_affinity(
    gpu_selector: dict[str, Any], user_affinity: dict[str, Any] | None, terms: list[dict[str, Any]]
) -> None:
    before = copy.deepcopy(user_affinity)
    m = model(serving={"gpuSelector": gpu_selector, "affinity": user_affinity})
    assert _required(pod_spec(deployment(m)).get("affinity")) == terms
    assert m.spec.serving.affinity == before  # the spec is not modified by building twice
    assert _required(pod_spec(deployment(m)).get("affinity")) == terms


def test_user_affinity_is_kept_and_no_affinity_is_none() -> None:
    anti: dict[str, Any] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    assert pod_spec(deployment(model(serving={"affinity": anti})))["affinity"] == anti
    assert "affinity" not in pod_spec(deployment(model()))
    assert "affinity" not in pod_spec(deployment(model(serving={"gpuSelector": {}})))


def test_topology_spread_selects_the_revisions_own_pods() -> None:
    spread = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
    m = model(
        serving={
            "topologySpreadConstraints": [
                spread,
                {**spread, "topologyKey": "zone", "labelSelector": {"matchLabels": {"x": "y"}}},
            ]
        }
    )
    constraints = pod_spec(deployment(m))["topologySpreadConstraints"]
    expected_selector = {"matchLabels": selector("resnet50", serving.COMPONENT, REV)}
    assert constraints == [
        {**spread, "labelSelector": expected_selector},
        {**spread, "topologyKey": "zone", "labelSelector": expected_selector},
    ]
    assert (
        expected_selector["matchLabels"].items()
        <= deployment(m)["spec"]["template"]["metadata"]["labels"].items()
    )
    assert "topologySpreadConstraints" not in pod_spec(deployment(model()))


def test_optional_pod_fields() -> None:
    m = model(
        serving={
            "nodeSelector": {"pool": "gpu"},
            "priorityClassName": "inference",
            "serviceAccountName": "reader",
        }
    )
    pod = pod_spec(deployment(m))
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["priorityClassName"] == "inference"
    assert pod["serviceAccountName"] == "reader"
    assert pod["runtimeClassName"] == "nvidia"
    bare = pod_spec(deployment(cpu_model()))
    assert {"nodeSelector", "priorityClassName", "serviceAccountName"}.isdisjoint(bare)


# --- the serving Deployment ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size_bytes", "threshold"),
    [
        (None, 12),
        (0, 12),
        (46_000_000, 13),  # 60 s + 1.3 s -> 13 periods of 5 s
        (1 << 29, 15),  # 0.5 GiB: 75 s
        (1 << 30, 18),  # 1 GiB: 90 s
        (10 << 30, 72),  # 10 GiB: 360 s
        (40 << 30, 252),
    ],
)
def test_startup_budget_grows_with_the_artifact(size_bytes: int | None, threshold: int) -> None:
    assert serving.startup_failure_threshold(size_bytes) == threshold
    probe = container(deployment(model(), size_bytes=size_bytes))["startupProbe"]
    assert probe["failureThreshold"] == threshold
    assert probe["periodSeconds"] == 5
    assert probe["httpGet"]["path"] == "/v2/health/live"


def test_startup_threshold_never_below_a_minute() -> None:
    assert serving.startup_failure_threshold(None, period_seconds=10) == 12
    assert serving.startup_failure_threshold(1 << 30, period_seconds=10) == 12
    assert serving.startup_failure_threshold(4 << 30, period_seconds=10) == 18


def test_deployment_serves_the_revisions_artifact_with_its_runtime_options() -> None:
    m = model()
    dep = deployment(m, replicas=3)
    c = container(dep)
    assert dep["metadata"]["name"] == f"resnet50-{REV}"
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert c["args"][:2] == ["serve", f"/var/lib/ptm/store/vision/resnet50/{REV}"]
    args = dict(zip(c["args"][2::2], c["args"][3::2], strict=True))
    assert args["--model-name"] == "resnet50"
    assert args["--http-port"] == "8080" and args["--grpc-port"] == "8081"
    assert args["--metrics-port"] == str(serving.METRICS_PORT)
    options = json.loads(args["--options-json"])
    assert options["batching"]["maxBatchSize"] == 32
    assert options["executionProviders"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert "replicas" not in options and "resources" not in options  # operator-only fields stay out
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8080,
        "grpc": 8081,
        "metrics": serving.METRICS_PORT,
    }
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/resnet50/ready"
    assert {"name": STORE_VOLUME, "mountPath": "/var/lib/ptm/store", "readOnly": True} in c["volumeMounts"]
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(serving.METRICS_PORT)


@pytest.mark.parametrize(("replicas", "present"), [(None, False), (0, True), (4, True)])
def test_replicas_are_left_to_the_autoscaler_when_none(replicas: int | None, present: bool) -> None:
    spec = deployment(model(), replicas=replicas)["spec"]
    assert ("replicas" in spec) is present
    if present:
        assert spec["replicas"] == replicas


@pytest.mark.parametrize(
    ("gpus", "gpu_image", "override", "image"),
    [
        (0, None, None, "ghcr.io/ptm-dev/ptm-serve:0.1.0"),
        (1, None, None, "ghcr.io/ptm-dev/ptm-serve:0.1.0"),
        (0, "serve-gpu:1", None, "ghcr.io/ptm-dev/ptm-serve:0.1.0"),
        (1, "serve-gpu:1", None, "serve-gpu:1"),
        (1, "serve-gpu:1", "mine:2", "mine:2"),
    ],
)
def test_serving_image(gpus: int, gpu_image: str | None, override: str | None, image: str) -> None:
    settings = Settings(serve_image="ghcr.io/ptm-dev/ptm-serve:0.1.0", serve_gpu_image=gpu_image)
    limits: dict[str, Any] = {"memory": "2Gi"} | ({"nvidia.com/gpu": gpus} if gpus else {})
    m = model(serving={"image": override, "resources": {"limits": limits}})
    dep = serving.serving_deployment(m, REV, "/a", 1, settings, STORE)
    assert container(dep)["image"] == image


@pytest.mark.parametrize(("policy", "expected"), [(None, "IfNotPresent"), ("Always", "Always")])
def test_pull_policy(policy: str | None, expected: str) -> None:
    settings = Settings(image_pull_policy="IfNotPresent")
    dep = serving.serving_deployment(
        model(serving={"imagePullPolicy": policy}), REV, "/a", 1, settings, STORE
    )
    assert container(dep)["imagePullPolicy"] == expected


# --- Service, HPA, KEDA, NetworkPolicy --------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocols", "ports"),
    [
        (["rest", "grpc"], [("http", 8080, "http"), ("grpc", 8081, "grpc"), ("metrics", 9090, None)]),
        (["rest"], [("http", 8080, "http"), ("metrics", 9090, None)]),
        (["grpc"], [("grpc", 8081, "grpc"), ("metrics", 9090, None)]),
    ],
)
def test_service_ports_follow_protocols(
    protocols: list[str], ports: list[tuple[str, int, str | None]]
) -> None:
    svc = serving.service(model(serving={"protocols": protocols}))
    assert svc["metadata"]["name"] == "resnet50"
    assert svc["spec"]["type"] == "ClusterIP"
    assert REVISION_LABEL not in svc["spec"]["selector"]  # one Service over every revision
    assert [(p["name"], p["port"], p.get("appProtocol")) for p in svc["spec"]["ports"]] == ports
    assert all(p["targetPort"] == p["name"] for p in svc["spec"]["ports"])


def test_service_ports_follow_custom_ports() -> None:
    svc = serving.service(model(serving={"port": 9000, "grpcPort": 9001}))
    assert [p["port"] for p in svc["spec"]["ports"]] == [9000, 9001, serving.METRICS_PORT]


@pytest.mark.parametrize(
    ("autoscaling", "metric"),
    [
        (
            {"metric": "cpu"},
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
            },
        ),
        (
            {"metric": "cpu", "target": 55},
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 55}},
            },
        ),
        (
            {},
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "ptm_requests_in_flight"},
                    "target": {"type": "AverageValue", "averageValue": "8"},
                },
            },
        ),
        (
            {"metric": "inflightRequests", "target": 16},
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "ptm_requests_in_flight"},
                    "target": {"type": "AverageValue", "averageValue": "16"},
                },
            },
        ),
        (
            {"metric": "queueDepth"},
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "ptm_queue_depth"},
                    "target": {"type": "AverageValue", "averageValue": "16"},
                },
            },
        ),
        (
            {"metric": "queueDepth", "target": 2.5},
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "ptm_queue_depth"},
                    "target": {"type": "AverageValue", "averageValue": "2500m"},
                },
            },
        ),
    ],
)
def test_hpa_metric_per_autoscaling_metric(autoscaling: dict[str, Any], metric: dict[str, Any]) -> None:
    m = model(serving={"autoscaling": {"minReplicas": 2, "maxReplicas": 6, **autoscaling}})
    hpa = serving.horizontal_pod_autoscaler(m, REV)
    assert hpa is not None
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"] == [metric]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": serving.deployment_name(m, REV),
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert serving.keda_scaled_object(m, REV) is None


def test_hpa_metric_names_exist_in_the_runtime() -> None:
    from prometheus_client import CollectorRegistry

    from ptm_runtime.serve.metrics import ServeMetrics

    registry = CollectorRegistry()
    ServeMetrics(registry, "m")
    names = {metric.name for metric in registry.collect()}
    assert set(serving.POD_METRICS.values()) <= names


def test_no_autoscaler_without_autoscaling() -> None:
    assert serving.horizontal_pod_autoscaler(model(), REV) is None
    assert serving.keda_scaled_object(model(), REV) is None


@pytest.mark.parametrize(
    ("autoscaling", "trigger"),
    [
        (
            {"metric": "inflightRequests", "target": 4},
            {
                "type": "prometheus",
                "metadata": {
                    "serverAddress": "http://prometheus-operated.monitoring.svc:9090",
                    "query": 'sum(ptm_requests_in_flight{namespace="vision",model="resnet50"})',
                    "threshold": "4",
                },
            },
        ),
        (
            {"metric": "queueDepth", "keda": {"prometheusAddress": "http://prom.obs:9090"}},
            {
                "type": "prometheus",
                "metadata": {
                    "serverAddress": "http://prom.obs:9090",
                    "query": 'sum(ptm_queue_depth{namespace="vision",model="resnet50"})',
                    "threshold": "16",
                },
            },
        ),
        (
            {"metric": "cpu", "minReplicas": 1},
            {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}},
        ),
    ],
)
def test_keda_scaled_object(autoscaling: dict[str, Any], trigger: dict[str, Any]) -> None:
    auto = {"minReplicas": 0, "maxReplicas": 5, "keda": {"pollingIntervalSeconds": 10}} | autoscaling
    m = model(serving={"autoscaling": auto})
    scaled = serving.keda_scaled_object(m, REV)
    assert scaled is not None
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["triggers"] == [trigger]
    assert scaled["spec"]["scaleTargetRef"] == {"name": serving.deployment_name(m, REV)}
    assert scaled["spec"]["minReplicaCount"] == auto["minReplicas"]
    assert scaled["spec"]["maxReplicaCount"] == 5
    assert scaled["spec"]["cooldownPeriod"] == 300
    assert serving.horizontal_pod_autoscaler(m, REV) is None


SAME_NAMESPACE: list[dict[str, Any]] = [{"podSelector": {}}]


def test_network_policy_is_off_by_default() -> None:
    assert serving.network_policy(model()) is None


def test_network_policy_defaults_to_the_same_namespace() -> None:
    policy = serving.network_policy(model(serving={"networkPolicy": {"enabled": True}}))
    assert policy is not None
    assert policy["spec"]["podSelector"] == {"matchLabels": selector("resnet50", serving.COMPONENT)}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    serve_rule, metrics_rule = policy["spec"]["ingress"]
    assert serve_rule["from"] == SAME_NAMESPACE
    assert serve_rule["ports"] == [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}]
    assert metrics_rule["from"] == SAME_NAMESPACE
    assert metrics_rule["ports"] == [{"port": serving.METRICS_PORT, "protocol": "TCP"}]


def test_network_policy_peers() -> None:
    frontend = {"podSelector": {"matchLabels": {"app": "frontend"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    m = model(
        serving={
            "networkPolicy": {"enabled": True, "allowFrom": [frontend], "allowMetricsFrom": [monitoring]},
        }
    )
    policy = serving.network_policy(m)
    assert policy is not None
    serve_rule, metrics_rule = policy["spec"]["ingress"]
    assert len(serve_rule["from"]) == 1
    assert serve_rule["from"][0]["podSelector"]["matchLabels"] == {"app": "frontend"}
    assert "namespaceSelector" not in serve_rule["from"][0]  # absent: the model's own namespace
    assert len(metrics_rule["from"]) == 1
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert "podSelector" not in metrics_rule["from"][0]


# --- the conversion Job ----------------------------------------------------------------------------


def test_job_fails_at_once_on_permanent_exit_codes() -> None:
    spec = job(model())["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1
    on_exit = fail[0]["onExitCodes"]
    assert on_exit["operator"] == "In"
    assert on_exit["containerName"] == jobs.CONTAINER == container(job(model()))["name"]
    # the API server wants the values sorted and unique
    assert on_exit["values"] == sorted(PERMANENT_EXIT_CODES)
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it


@pytest.mark.parametrize(
    ("conversion", "settings", "backoff", "deadline"),
    [
        ({}, {}, 2, 1800),
        ({"backoffLimit": 0, "timeout": "10m"}, {}, 0, 600),
        ({"backoffLimit": 9, "timeout": "2h"}, {}, 2, 3600),
        (
            {"backoffLimit": 9, "timeout": "2h"},
            {"job_backoff_limit": 5, "job_active_deadline_seconds": 9000},
            5,
            7200,
        ),
        ({"timeout": "1h30m"}, {"job_active_deadline_seconds": 600}, 2, 600),
    ],
)
def test_job_limits_take_the_smaller_of_spec_and_settings(
    conversion: dict[str, Any], settings: dict[str, Any], backoff: int, deadline: int
) -> None:
    spec = job(model(conversion=conversion), settings=Settings(**settings))["spec"]
    assert spec["backoffLimit"] == backoff
    assert spec["activeDeadlineSeconds"] == deadline


@pytest.mark.parametrize(("ttl", "present"), [(None, False), (600, True)])
def test_job_ttl_only_when_configured(ttl: int | None, present: bool) -> None:
    spec = job(model(), settings=Settings(job_ttl_seconds_after_finished=ttl))["spec"]
    assert ("ttlSecondsAfterFinished" in spec) is present
    if present:
        assert spec["ttlSecondsAfterFinished"] == ttl


def test_job_runs_convert_for_its_revision_and_reports_through_the_termination_message() -> None:
    m = model()
    j = job(m)
    c = container(j)
    assert j["metadata"]["name"] == f"resnet50-convert-{REV}"
    assert c["image"] == SETTINGS.converter_image
    assert c["args"][0] == "convert"
    args = dict(zip(c["args"][1::2], c["args"][2::2], strict=True))
    assert json.loads(args["--spec-json"]) == {"spec": artifact_inputs(m.spec)}
    assert args["--store"] == "/var/lib/ptm/store"
    assert (args["--namespace"], args["--name"], args["--revision"]) == ("vision", "resnet50", REV)
    assert args["--termination-log"] == c["terminationMessagePath"] == jobs.TERMINATION_LOG
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": STORE_VOLUME, "mountPath": "/var/lib/ptm/store", "readOnly": False} in c["volumeMounts"]
    assert {
        "name": STORE_VOLUME,
        "hostPath": {"path": "/var/lib/ptm", "type": "DirectoryOrCreate"},
    } in pod_spec(j)["volumes"]


def test_job_gets_s3_credentials_as_env_from_the_secret() -> None:
    c = container(job(model()))
    assert c["envFrom"] == [{"secretRef": {"name": "s3-models"}}]
    assert "s3-models" not in json.dumps(c["args"])  # secrets never reach the spec or the revision


@pytest.mark.parametrize(
    ("uri", "variable"),
    [
        ("hf://sentence-transformers/all-MiniLM-L6-v2@main", "HF_TOKEN"),
        ("https://models.example.com/resnet18.onnx", "PTM_HTTP_BEARER_TOKEN"),
    ],
)
def test_job_gets_the_token_for_its_source_kind(uri: str, variable: str) -> None:
    source = {"uri": uri, "format": "onnx", "tokenSecretRef": {"name": "hub", "key": "token"}}
    c = container(job(model(source=source)))
    assert "envFrom" not in c
    tokens = [e for e in c["env"] if "valueFrom" in e]
    assert tokens == [{"name": variable, "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}]


def test_job_with_a_pvc_store_and_prefix() -> None:
    store = store_from_settings(Settings(store_uri="pvc://ptm-artifacts/team-a", store_mount_path="/store/"))
    j = job(model(), store=store)
    args = container(j)["args"]
    assert args[args.index("--store") + 1] == "/store/team-a"
    assert {"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": "ptm-artifacts"}} in pod_spec(j)[
        "volumes"
    ]


@pytest.mark.parametrize(
    ("uri", "volume", "root"),
    [
        (
            "pvc://ptm-artifacts",
            {"persistentVolumeClaim": {"claimName": "ptm-artifacts"}},
            "/var/lib/ptm/store",
        ),
        ("pvc://claim/a/b/", {"persistentVolumeClaim": {"claimName": "claim"}}, "/var/lib/ptm/store/a/b"),
        (
            "file:///srv/ptm",
            {"hostPath": {"path": "/srv/ptm", "type": "DirectoryOrCreate"}},
            "/var/lib/ptm/store",
        ),
    ],
)
def test_store_from_settings(uri: str, volume: dict[str, Any], root: str) -> None:
    store = store_from_settings(Settings(store_uri=uri))
    assert store.volume == {"name": STORE_VOLUME, **volume}
    assert store.root() == root
    assert store.artifact_dir("ns", "m", REV) == f"{root}/ns/m/{REV}"


@pytest.mark.parametrize("uri", ["s3://bucket/prefix", "/var/lib/ptm", "ptm-artifacts"])
def test_store_refuses_other_schemes(uri: str) -> None:
    with pytest.raises(ValueError, match="PTM_STORE_URI"):
        store_from_settings(Settings(store_uri=uri))


# --- bugs found while writing these tests (see the report) ---------------------------------------


def test_service_name_is_a_dns_1035_label() -> None:
    """Service names must start with a letter (DNS-1035); PretrainedModel names may start with a digit."""
    for name in ("resnet50", "3d-unet", "1bit-llm"):
        svc = serving.service_name(model(name))
        assert DNS1035_LABEL.match(svc), f"model {name!r} -> Service name {svc!r} is not a DNS-1035 label"


def test_pvc_sources_are_mounted_read_only_where_the_converter_looks() -> None:
    body = {
        "apiVersion": "ptm.dev/v1alpha1",
        "kind": "PretrainedModel",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {
            "source": {"uri": "pvc://models/minilm", "format": "huggingface", "task": "feature-extraction"},
            "optimization": {
                "precision": ["int8-static"],
                "quantization": {"mode": "static", "calibration": {"uri": "pvc://calib/set.npz"}},
            },
        },
    }
    model = PretrainedModel.model_validate(body)
    settings = Settings(store_uri="pvc://ptm-artifacts")
    job = jobs.conversion_job(model, "abc", settings, store_from_settings(settings))
    pod = job["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    for claim in ("models", "calib"):
        mount = mounts[f"/mnt/pvc/{claim}"]
        assert mount["readOnly"] is True
        assert claims[mount["name"]] == {"claimName": claim, "readOnly": True}
    assert claims["ptm-store"] == {"claimName": "ptm-artifacts"}  # the store stays writable


def test_serving_pods_keep_answering_while_endpoints_forget_them() -> None:
    dep = deployment(cpu_model())
    sleep = container(dep)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < sleep < dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
