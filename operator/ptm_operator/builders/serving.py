"""Serving objects: a Deployment per revision, one Service, a PDB, an HPA or KEDA ScaledObject,
and an optional NetworkPolicy."""

from __future__ import annotations

import json
import math
from typing import Any

from ptm_operator.api import AutoscalingMetric, PretrainedModel, ServingSpec
from ptm_operator.builders.common import (
    container_security_context,
    metadata,
    pod_security_context,
    resources,
    tolerations,
)
from ptm_operator.builders.names import dns1035_name, dns_name, labels, selector
from ptm_operator.builders.store import Store
from ptm_operator.settings import Settings

COMPONENT = "serving"
CONTAINER = "server"
METRICS_PORT = 9090
PRE_STOP_SLEEP_SECONDS = 5
"""Seconds a stopping serving pod keeps answering before SIGTERM (endpoint propagation)."""
#: Runtime metric names the autoscaler reads (ptm_runtime.serve.metrics).
POD_METRICS = {
    AutoscalingMetric.INFLIGHT_REQUESTS: "ptm_requests_in_flight",
    AutoscalingMetric.QUEUE_DEPTH: "ptm_queue_depth",
}


def deployment_name(model: PretrainedModel, revision: str) -> str:
    return dns_name(model.metadata.name, revision, max_len=47)  # pod names add 16 characters


def service_name(model: PretrainedModel) -> str:
    return dns1035_name(model.metadata.name)


def startup_failure_threshold(size_bytes: int | None, period_seconds: int = 5) -> int:
    """Allow 60 s plus 30 s per GiB of artifact for load, sha256 check and warm-up.

    Large models on cold nodes were killed by a fixed startup budget in other servers; scaling
    it with the artifact size keeps small models quick to report a real failure.
    """
    gib = (size_bytes or 0) / (1 << 30)
    return max(12, math.ceil((60 + 30 * gib) / period_seconds))


def _affinity(serving: ServingSpec) -> dict[str, Any] | None:
    affinity: dict[str, Any] = json.loads(json.dumps(serving.affinity)) if serving.affinity else {}
    gpu = serving.gpu_selector
    if gpu is None or (not gpu.products and gpu.min_memory_mib is None):
        return affinity or None
    exprs: list[dict[str, Any]] = []
    if gpu.products:
        exprs.append({"key": "nvidia.com/gpu.product", "operator": "In", "values": list(gpu.products)})
    if gpu.min_memory_mib is not None:
        exprs.append(
            {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": [str(gpu.min_memory_mib - 1)]}
        )
    node = affinity.setdefault("nodeAffinity", {})
    required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": []})
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({"matchExpressions": []})
    for term in terms:  # terms are ORed: every one must demand the GPU
        term.setdefault("matchExpressions", []).extend(exprs)
    return affinity


def serving_deployment(
    model: PretrainedModel,
    revision: str,
    artifact_dir: str,
    replicas: int | None,
    settings: Settings,
    store: Store,
    size_bytes: int | None = None,
    memory_limit: str | None = None,
) -> dict[str, Any]:
    """The Deployment that serves one revision with `ptm serve`.

    `replicas` None leaves the count to an autoscaler: a server-side apply that kept setting it
    would fight the HPA on every reconcile.
    """
    spec = model.spec.serving
    gpus = spec.resources.gpus()
    name = model.metadata.name
    lab = labels(name, COMPONENT, revision)
    runtime = spec.runtime_options().wire()
    probe_http = {"port": "http", "scheme": "HTTP"}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.serve_image_for(gpus),
        "imagePullPolicy": spec.image_pull_policy.value
        if spec.image_pull_policy
        else settings.image_pull_policy,
        "command": ["ptm"],  # whatever the image's entrypoint, run the ptm CLI
        "args": [
            "serve",
            artifact_dir,
            "--model-name",
            name,
            "--host",
            "0.0.0.0",
            "--http-port",
            str(spec.port),
            "--grpc-port",
            str(spec.grpc_port),
            "--metrics-port",
            str(METRICS_PORT),
            "--options-json",
            json.dumps(runtime, sort_keys=True, separators=(",", ":")),
        ],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "ports": [
            {"name": "http", "containerPort": spec.port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": resources(spec.resources, memory_limit=memory_limit),
        "securityContext": container_security_context(),
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", **probe_http},
            "periodSeconds": 5,
            "failureThreshold": startup_failure_threshold(size_bytes),
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", **probe_http},
            "periodSeconds": 10,
            "failureThreshold": 3,
            "timeoutSeconds": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": f"/v2/models/{name}/ready", **probe_http},
            "periodSeconds": 5,
            "failureThreshold": 2,
            "timeoutSeconds": 3,
        },
        "volumeMounts": [store.mount(read_only=True), {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # Endpoints and kube-proxy learn of a terminating pod a moment after it is told to stop:
        # keep serving through that moment (kubelet's own sleep; no binary needed in the image),
        # then SIGTERM starts the server's drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_SECONDS}}},
    }
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [store.volume, {"name": "tmp", "emptyDir": {}}],
        "tolerations": tolerations(spec.tolerations, gpus),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 45,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    affinity = _affinity(spec)
    if affinity:
        pod_spec["affinity"] = affinity
    if spec.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.runtime_class_name
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = [
            {**c, "labelSelector": {"matchLabels": selector(name, COMPONENT, revision)}}
            for c in spec.topology_spread_constraints
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(model, deployment_name(model, revision), lab),
        "spec": {
            **({"replicas": replicas} if replicas is not None else {}),
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": selector(name, COMPONENT, revision)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": dict(lab),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def service(model: PretrainedModel) -> dict[str, Any]:
    """One Service over the serving pods of every revision (replicaRatio routing relies on it)."""
    spec = model.spec.serving
    name = model.metadata.name
    ports: list[dict[str, Any]] = []
    if "rest" in spec.protocols:
        ports.append(
            {
                "name": "http",
                "port": spec.port,
                "targetPort": "http",
                "protocol": "TCP",
                "appProtocol": "http",
            }
        )
    if "grpc" in spec.protocols:
        ports.append(
            {
                "name": "grpc",
                "port": spec.grpc_port,
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "grpc",
            }
        )
    ports.append({"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(model, service_name(model), labels(name, COMPONENT)),
        "spec": {"type": "ClusterIP", "selector": selector(name, COMPONENT), "ports": ports},
    }


def revision_service_name(model: PretrainedModel, revision: str) -> str:
    return dns1035_name(model.metadata.name, revision)


def revision_service(model: PretrainedModel, revision: str) -> dict[str, Any]:
    """A Service over one revision's pods: what an HTTPRoute's weighted backendRefs point at."""
    svc = service(model)
    name = model.metadata.name
    svc["metadata"] = metadata(
        model, revision_service_name(model, revision), labels(name, COMPONENT, revision)
    )
    svc["spec"]["selector"] = selector(name, COMPONENT, revision)
    return svc


def route_backends(model: PretrainedModel, weights: dict[str, int]) -> list[dict[str, Any]]:
    """HTTPRoute backendRefs: one per revision Service with its percent of the traffic."""
    port = model.spec.serving.port
    return [
        {"group": "", "kind": "Service", "name": revision_service_name(model, rev), "port": port, "weight": w}
        for rev, w in sorted(weights.items())
    ]


def pod_disruption_budget(model: PretrainedModel) -> dict[str, Any]:
    """At most one serving pod disrupted at a time (drains proceed, never all at once)."""
    name = model.metadata.name
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(model, dns_name(name), labels(name, COMPONENT)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name, COMPONENT)}},
    }


def horizontal_pod_autoscaler(
    model: PretrainedModel, revision: str, ignore_keda: bool = False
) -> dict[str, Any] | None:
    """autoscaling/v2 HPA on the stable Deployment: CPU utilization, or a runtime metric per pod.

    None when KEDA scales instead, unless `ignore_keda` (KEDA asked for but not installed).
    """
    auto = model.spec.serving.autoscaling
    if auto is None or (auto.keda is not None and not ignore_keda):
        return None
    name = model.metadata.name
    metric: dict[str, Any]
    if auto.metric is AutoscalingMetric.CPU:
        metric = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": int(auto.effective_target())},
            },
        }
    else:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": POD_METRICS[auto.metric]},
                "target": {"type": "AverageValue", "averageValue": _quantity(auto.effective_target())},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(model, dns_name(name), labels(name, COMPONENT, revision)),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment_name(model, revision),
            },
            "minReplicas": max(auto.min_replicas, 1),
            "maxReplicas": auto.max_replicas,
            "metrics": [metric],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": auto.scale_down_stabilization_seconds}},
        },
    }


def keda_scaled_object(model: PretrainedModel, revision: str) -> dict[str, Any] | None:
    """KEDA ScaledObject with a Prometheus trigger (allows scale to zero)."""
    auto = model.spec.serving.autoscaling
    if auto is None or auto.keda is None:
        return None
    name = model.metadata.name
    namespace = model.metadata.namespace or "default"
    if auto.metric is AutoscalingMetric.CPU:
        trigger: dict[str, Any] = {
            "type": "cpu",
            "metricType": "Utilization",
            "metadata": {"value": str(int(auto.effective_target()))},
        }
    else:
        query = f'sum({POD_METRICS[auto.metric]}{{namespace="{namespace}",model="{name}"}})'
        trigger = {
            "type": "prometheus",
            "metadata": {
                "serverAddress": auto.keda.prometheus_address,
                "query": query,
                "threshold": _quantity(auto.effective_target()),
            },
        }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata(model, dns_name(name), labels(name, COMPONENT, revision)),
        "spec": {
            "scaleTargetRef": {"name": deployment_name(model, revision)},
            "minReplicaCount": auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "pollingInterval": auto.keda.polling_interval_seconds,
            "cooldownPeriod": auto.keda.cooldown_period_seconds,
            "triggers": [trigger],
        },
    }


def network_policy(model: PretrainedModel) -> dict[str, Any] | None:
    """Who may call the model: allowFrom on the REST/gRPC ports, allowMetricsFrom on metrics."""
    spec = model.spec.serving
    if not spec.network_policy.enabled:
        return None
    name = model.metadata.name
    same_namespace: list[dict[str, Any]] = [{"podSelector": {}}]

    def peers(items: list[Any]) -> list[dict[str, Any]]:
        out = [item.wire() for item in items]
        return out or same_namespace

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(model, dns_name(name), labels(name, COMPONENT)),
        "spec": {
            "podSelector": {"matchLabels": selector(name, COMPONENT)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": peers(spec.network_policy.allow_from),
                    "ports": [
                        {"port": spec.port, "protocol": "TCP"},
                        {"port": spec.grpc_port, "protocol": "TCP"},
                    ],
                },
                {
                    "from": peers(spec.network_policy.allow_metrics_from),
                    "ports": [{"port": METRICS_PORT, "protocol": "TCP"}],
                },
            ],
        },
    }


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"
