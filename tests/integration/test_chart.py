"""The Helm chart: lint, rendered objects, server-side dry-run, and a real install/upgrade/uninstall.

helm is built from its Go module by dev/helm/build.sh (cached in ~/.cache/ptm) on first use. The
install test runs the operator as the chart's ServiceAccount (a token from the TokenRequest API),
so the RBAC is proven by the operator doing its work, not only by reading the Role.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, Cluster, wait_for

CHART = REPO / "charts" / "ptm-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CRD_NAME = "pretrainedmodels.ptm.dev"

#: Exactly what the operator may do, per (apiGroup, resource): the operator's own list.
CHILD_VERBS = ["get", "list", "watch", "create", "patch", "delete"]
EXPECTED_NAMESPACED_RULES: dict[tuple[str, str], list[str]] = {
    ("ptm.dev", "pretrainedmodels"): ["get", "list", "watch", "patch"],
    ("ptm.dev", "pretrainedmodels/status"): ["get", "patch", "update"],
    ("batch", "jobs"): CHILD_VERBS,
    ("", "pods"): ["get", "list", "watch", "delete"],
    ("apps", "deployments"): CHILD_VERBS,
    ("", "services"): CHILD_VERBS,
    ("policy", "poddisruptionbudgets"): CHILD_VERBS,
    ("autoscaling", "horizontalpodautoscalers"): CHILD_VERBS,
    ("networking.k8s.io", "networkpolicies"): CHILD_VERBS,
    ("keda.sh", "scaledobjects"): CHILD_VERBS,
    ("gateway.networking.k8s.io", "httproutes"): CHILD_VERBS,
    ("", "events"): ["create", "patch"],
    ("events.k8s.io", "events"): ["create", "patch"],
}
CRD_PROBE = ("apiextensions.k8s.io", "customresourcedefinitions")


@dataclass
class Helm:
    binary: Path
    home: Path
    kubeconfig: Path

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        proc = subprocess.run(
            [str(self.binary), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def template(self, *args: str, namespace: str = "ptm-system") -> list[dict[str, Any]]:
        out = self.run("template", "rel", str(CHART), "-n", namespace, *args).stdout
        return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="session")
def helm(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm from dev/helm/build.sh (built once, then cached), with homes of its own."""
    proc = subprocess.run(
        [str(REPO / "dev" / "helm" / "build.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, f"dev/helm/build.sh failed:\n{proc.stderr[-4000:]}"
    binary = Path(proc.stdout.strip().splitlines()[-1])
    return Helm(binary, tmp_path_factory.mktemp("helm"), cluster.kubeconfig)


@pytest.fixture(scope="session")
def monitoringcheck() -> Path:
    """dev/helm/monitoringcheck: prometheus-operator's Go types decode our monitoring objects strictly."""
    script = REPO / "dev" / "helm" / "monitoringcheck" / "build.sh"
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rules_table(rules: list[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """(apiGroup, resource) -> verbs; a resource listed twice would be a mistake, so it fails."""
    table: dict[tuple[str, str], list[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource)
                assert key not in table, f"{key} granted twice"
                table[key] = list(rule["verbs"])
    return table


def assert_least_privilege(docs: list[dict[str, Any]]) -> None:
    for role in by_kind(docs, "Role") + by_kind(docs, "ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{role['kind']} {role['metadata']['name']}: {rule}"
            assert not {"secrets", "configmaps"} & set(rule["resources"]), rule
            assert "nonResourceURLs" not in rule


# --- lint and rendered objects --------------------------------------------------------------------


def test_lint_default_and_ci_values(helm: Helm) -> None:
    helm.run("lint", "--strict", str(CHART))
    assert CI_VALUES, "charts/ptm-operator/ci/*-values.yaml"
    for values in CI_VALUES:
        helm.run("lint", "--strict", str(CHART), "-f", str(values))


def test_schema_rejects_bad_values(helm: Helm) -> None:
    for bad in (
        ["--set", "replicas=0"],
        ["--set", "operator.storeUri=s3://bucket"],
        ["--set", "watchNamespaces={Not_A_Namespace}"],
        ["--set", "unknownKey=1"],
    ):
        proc = helm.run("template", "rel", str(CHART), *bad, check=False)
        assert proc.returncode != 0, f"{bad} was accepted"
    proc = helm.run(
        "template", "rel", str(CHART), "--set", "replicas=2", "--set", "peering.enabled=false", check=False
    )
    assert proc.returncode != 0 and "peering" in proc.stderr


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(helm: Helm) -> None:
    docs = helm.template()
    assert_least_privilege(docs)
    assert not by_kind(docs, "Role")
    role = one(docs, "ClusterRole")
    table = rules_table(role["rules"])
    assert table.pop(CRD_PROBE) == ["get"]
    probe = next(r for r in role["rules"] if "customresourcedefinitions" in r["resources"])
    assert probe["resourceNames"] == ["scaledobjects.keda.sh"]
    assert table.pop(("kopf.dev", "clusterkopfpeerings")) == ["get", "list", "watch", "patch"]
    assert table == EXPECTED_NAMESPACED_RULES
    binding = one(docs, "ClusterRoleBinding")
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ptm-system"}
    ]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "ptm-operator"

    without_extras = helm.template("--set", "rbac.keda=false", "--set", "rbac.gatewayAPI=false")
    table = rules_table(one(without_extras, "ClusterRole")["rules"])
    assert ("keda.sh", "scaledobjects") not in table
    assert ("gateway.networking.k8s.io", "httproutes") not in table


def test_namespaced_rbac_has_a_role_per_namespace_and_nothing_cluster_wide(helm: Helm) -> None:
    docs = helm.template("--set", "watchNamespaces={ml-a,ml-b}")
    assert_least_privilege(docs)
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-a", "ml-b"]
    for role in roles:
        table = rules_table(role["rules"])
        assert table.pop(("kopf.dev", "kopfpeerings")) == ["get", "list", "watch", "patch"]
        assert table == EXPECTED_NAMESPACED_RULES
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-a", "ml-b"]
    assert all(b["subjects"][0]["namespace"] == "ptm-system" for b in bindings)
    cluster_rules = rules_table(one(docs, "ClusterRole")["rules"])
    assert cluster_rules == {CRD_PROBE: ["get"], ("", "namespaces"): ["list", "watch"]}
    peerings = by_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["ml-a", "ml-b"]
    assert not by_kind(docs, "ClusterKopfPeering")
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert json.loads(env["PTM_NAMESPACES"]) == ["ml-a", "ml-b"]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    found: dict[str, Any] = pod["containers"][0]
    return found


def test_deployment_runs_two_peered_restricted_replicas(helm: Helm) -> None:
    from ptm_operator.settings import Settings

    docs = helm.template(
        "--set",
        "operator.serveGpuImage=reg/serve-gpu:1",
        "--set",
        "operator.prometheusUrl=http://prom:9090",
        "--set",
        "operator.storeUri=pvc://store/prefix",
        "--set",
        "image.tag=9.9.9",
    )
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(docs)
    assert dep["spec"]["replicas"] == 2
    assert c["image"] == "ghcr.io/ptm-dev/ptm-operator:9.9.9"
    assert c["command"] == ["ptm", "operator"] and "args" not in c
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    values = {k: v.get("value") for k, v in env.items() if k.startswith("PTM_")}
    assert values == {
        "PTM_CONVERTER_IMAGE": "ghcr.io/ptm-dev/ptm-convert:0.1.0",
        "PTM_SERVE_IMAGE": "ghcr.io/ptm-dev/ptm-serve:0.1.0",
        "PTM_SERVE_GPU_IMAGE": "reg/serve-gpu:1",
        "PTM_IMAGE_PULL_POLICY": "IfNotPresent",
        "PTM_STORE_URI": "pvc://store/prefix",
        "PTM_PROMETHEUS_URL": "http://prom:9090",
        "PTM_METRICS_PORT": "8080",
        "PTM_LIVENESS_PORT": "8081",
        "PTM_PEERING": "ptm-operator",
    }
    # every PTM_ variable is one the operator's settings read
    settings = Settings.model_validate({k[4:].lower(): v for k, v in values.items()})
    assert settings.peering == "ptm-operator" and settings.metrics_port == 8080

    # restricted Pod Security Standard
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any("hostPath" in v for v in pod.get("volumes", []))
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]

    # probes on kopf's liveness endpoint, on the port the operator listens on
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "healthz": 8081}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1

    standalone = helm.template("-f", str(CHART / "ci" / "standalone-values.yaml"))
    c1 = container(standalone)
    assert c1["args"] == ["--standalone"]
    assert "PTM_PEERING" not in {e["name"] for e in c1["env"]}
    assert c1["image"].endswith("@sha256:" + "0" * 64)
    assert not by_kind(standalone, "PodDisruptionBudget") and not by_kind(standalone, "ClusterKopfPeering")


def test_crd_template_is_the_generated_crd_kept_on_uninstall(helm: Helm) -> None:
    generated = yaml.safe_load((CHART / "crds" / "ptm.dev_pretrainedmodels.yaml").read_text())
    top_level = yaml.safe_load((REPO / "crds" / "ptm.dev_pretrainedmodels.yaml").read_text())
    assert generated == top_level
    rendered = one(helm.template(), "CustomResourceDefinition")
    assert rendered["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert rendered == generated
    unkept = one(helm.template("--set", "crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in unkept["metadata"]
    assert not by_kind(helm.template("--set", "crds.manage=false"), "CustomResourceDefinition")


# --- observability objects ------------------------------------------------------------------------

#: kube-state-metrics' own series the alerts read (not ptm's).
KSM_CORE = {"kube_pod_status_unschedulable", "kube_pod_container_resource_requests"}
_PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "on",
    "bool",
    "rate",
    "time",
    "histogram_quantile",
    "group_left",
    "le",
    "and",
    "or",
    "unless",
}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (identifiers that are not functions, keywords or labels)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - _PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"[0-9e]+", n)}


def exposed_metrics() -> set[str]:
    """Series names in the exposition text of the runtime's and the operator's real collectors."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ptm_operator.metrics import OperatorMetrics
    from ptm_runtime.serve.metrics import ServeMetrics

    serve_registry = CollectorRegistry()
    serve = ServeMetrics(serve_registry, "m")
    serve.observe_request("rest", 200, 0.01)
    serve.observe_batch(4, 2, 0.005)
    serve.observe_queue(0.001)
    serve.set_queue_depth(1)
    serve.add_in_flight(1)
    serve.model_loaded("CPUExecutionProvider", 0.1, 0.1, 8, 1)
    serve.set_ready(True)
    operator = OperatorMetrics()
    operator.reconcile_done("settled", 0.01)
    text = generate_latest(serve_registry).decode() + generate_latest(operator.registry).decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def ksm_custom_metrics(config: dict[str, Any]) -> set[str]:
    names = set()
    for resource in config["spec"]["resources"]:
        prefix = resource["metricNamePrefix"]
        names |= {f"{prefix}_{m['name']}" for m in resource["metrics"]}
    return names


def test_monitoring_objects_decode_strictly_as_prometheus_operator_types(
    helm: Helm, monitoringcheck: Path
) -> None:
    for args in (
        ["-f", str(CHART / "ci" / "monitoring-values.yaml")],
        ["-f", str(CHART / "ci" / "monitoring-values.yaml"), "--set", "watchNamespaces={a,b}"],
    ):
        rendered = helm.run("template", "rel", str(CHART), *args).stdout
        proc = subprocess.run(
            [str(monitoringcheck)], input=rendered, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sorted(line.split()[1] for line in proc.stdout.splitlines()) == [
            "PodMonitor",
            "PrometheusRule",
            "ServiceMonitor",
        ]
    # and it does reject a misspelt field
    broken = rendered.replace("podMetricsEndpoints", "podMetricEndpoints")
    proc = subprocess.run([str(monitoringcheck)], input=broken, capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and 'unknown field "podMetricEndpoints"' in proc.stdout


def test_monitoring_objects_match_the_pods_and_metrics_they_watch(helm: Helm) -> None:
    from ptm_operator.api import PretrainedModel
    from ptm_operator.builders.serving import serving_deployment
    from ptm_operator.builders.store import store_from_settings
    from ptm_operator.settings import Settings

    docs = helm.template("-f", str(CHART / "ci" / "monitoring-values.yaml"))

    # PodMonitor: selects the serving pods the operator builds, on their `metrics` port
    settings = Settings()
    model = PretrainedModel.model_validate(
        {
            "apiVersion": "ptm.dev/v1alpha1",
            "kind": "PretrainedModel",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
            "spec": {"source": {"uri": "hf://org/model", "format": "huggingface"}},
        }
    )
    store = store_from_settings(settings)
    serving = serving_deployment(model, "rev1", "/store/ns/m/rev1", 1, settings, store)
    pod_labels = serving["spec"]["template"]["metadata"]["labels"]
    pod_ports = {p["name"] for p in serving["spec"]["template"]["spec"]["containers"][0]["ports"]}
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= pod_ports
    assert [r["sourceLabels"] for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]] == [
        ["__meta_kubernetes_pod_label_ptm_dev_revision"]
    ]
    assert "ptm.dev/revision" in pod_labels

    # ServiceMonitor -> metrics Service -> operator pods
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    dep = one(docs, "Deployment")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"

    # every series the alerts and the dashboard read exists
    configmaps = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
    ksm = yaml.safe_load(
        configmaps["rel-ptm-operator-ksm-custom-resource-state"]["data"]["custom-resource-state.yaml"]
    )
    assert ksm["kind"] == "CustomResourceStateMetrics"
    assert ksm["spec"]["resources"][0]["groupVersionKind"] == {
        "group": "ptm.dev",
        "version": "v1alpha1",
        "kind": "PretrainedModel",
    }
    exposed = exposed_metrics()
    for name in (
        "ptm_requests_total",
        "ptm_request_duration_seconds_bucket",
        "ptm_batch_size_bucket",
        "ptm_queue_depth",
        "ptm_requests_in_flight",
        "ptm_operator_reconciles_total",
    ):
        assert name in exposed, name
    known = exposed | ksm_custom_metrics(ksm) | KSM_CORE

    rule = one(docs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "PtmModelNotReady",
        "PtmCanaryRolledBack",
        "PtmConversionFailing",
        "PtmGPUPodsUnschedulable",
    } <= alerts.keys()
    assert 'reason="RolledBack"' in alerts["PtmCanaryRolledBack"]["expr"]
    for alert in alerts.values():
        names = metric_names(alert["expr"])
        assert names and names <= known, f"{alert['alert']}: {names - known}"
        assert alert["labels"]["severity"] and alert["annotations"]["summary"]

    dashboard = json.loads(configmaps["rel-ptm-operator-dashboard"]["data"]["ptm.json"])
    assert configmaps["rel-ptm-operator-dashboard"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    check_dashboard(dashboard, known)


def check_dashboard(dashboard: dict[str, Any], known: set[str]) -> None:
    """The shape Grafana needs to load a dashboard, and every query's series exist."""
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = 0
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            names = metric_names(target["expr"].replace("$__rate_interval", "5m"))
            assert names and names <= known, f"{panel['title']}: {names - known}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            queries += 1
    assert queries >= 10
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "latency", "batch", "queue", "in flight", "canary", "remediation", "reconcile"):
        assert topic in titles, topic


# --- against the API server -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def peering_crds(cluster: Cluster) -> None:
    """kopf's peering CRDs from the chart's crds/ (what `helm install` creates; kept by design)."""
    cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds" / "kopf.dev_peerings.yaml"))
    for name in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        cluster.wait_crd_established(name)


def test_rendered_objects_pass_server_side_dry_run(
    helm: Helm, cluster: Cluster, crd_installed: str, peering_crds: None, namespace: str
) -> None:
    not_served = {"monitoring.coreos.com"}  # prometheus-operator's kinds: not installed here
    for values in [None, *CI_VALUES]:
        args = ["-f", str(values)] if values else []
        if values and "watchNamespaces" in yaml.safe_load(values.read_text()):
            args += ["--set", f"watchNamespaces={{{namespace}}}"]
        docs = helm.template(*args, namespace=namespace)
        checked = [d for d in docs if d["apiVersion"].split("/")[0] not in not_served]
        assert len(checked) >= 5
        out = cluster.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(checked), timeout=60
        ).stdout
        assert out.count("(server dry run)") == len(checked), out


def sa_kubeconfig(cluster: Cluster, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a short-lived TokenRequest token)."""
    token = cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration=15m").stdout
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    entry = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "ptm", "cluster": entry["cluster"]}],
                "users": [{"name": service_account, "user": {"token": token.strip()}}],
                "contexts": [
                    {
                        "name": "sa",
                        "context": {"cluster": "ptm", "user": service_account, "namespace": namespace},
                    }
                ],
                "current-context": "sa",
            }
        )
    )
    return path


@pytest.fixture
def release(helm: Helm, cluster: Cluster, crd_installed: str, namespace: str) -> Iterator[str]:
    """A release name for the test; uninstalled afterwards, and the session's CRD restored if lost."""
    name = f"ptm-{uuid.uuid4().hex[:6]}"
    yield name
    helm.run("uninstall", name, "-n", namespace, "--ignore-not-found", check=False)
    # models keep kopf's finalizer once their operator is gone: drop it so the namespace can go
    for model in cluster.kubectl("get", "ptm", "-n", namespace, "-o", "name", check=False).stdout.split():
        patch = '{"metadata":{"finalizers":null}}'
        cluster.kubectl("patch", model, "-n", namespace, "--type=merge", "-p", patch, check=False)
    if cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))


def test_install_run_upgrade_uninstall(
    helm: Helm, cluster: Cluster, namespace: str, release: str, peering_crds: None, tmp_path: Path
) -> None:
    """Namespaced mode in a namespace that enforces the restricted Pod Security Standard."""
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    crd_uid = cluster.kubectl("get", "crd", CRD_NAME, "-o", "jsonpath={.metadata.uid}").stdout
    helm.run(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--set",
        f"watchNamespaces={{{namespace}}}",
        "--take-ownership",  # the CRD exists (the session's); the release takes it over, keeps it
        "--wait",
        "--timeout",
        "90s",
    )
    fullname = f"{release}-ptm-operator"

    def get(kind: str, name: str, ns: str | None = namespace) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
        proc = cluster.kubectl(*args, check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    dep = get("deployment", fullname)
    assert dep is not None and dep["spec"]["replicas"] == 2
    # --wait returned: both pods exist, so the restricted namespace admitted them
    assert dep["status"].get("readyReplicas") == 2
    for kind in ("serviceaccount", "role", "rolebinding", "kopfpeering"):
        assert get(kind, fullname if kind != "kopfpeering" else "ptm-operator") is not None, kind
    assert get("clusterrole", fullname, None) is not None
    crd = get("crd", CRD_NAME, None)
    assert crd is not None and crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    # The operator with exactly the chart's permissions: peering, a model, a conversion Job.
    kubeconfig = sa_kubeconfig(cluster, namespace, fullname, tmp_path / "sa.kubeconfig")
    can = subprocess.run(
        [
            str(cluster.bin_dir / "kubectl"),
            "--kubeconfig",
            str(kubeconfig),
            "auth",
            "can-i",
            "get",
            "secrets",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert can.stdout.strip() == "no", can.stdout + can.stderr
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PTM_NAMESPACES": json.dumps([namespace]),
        "PTM_STORE_URI": "pvc://ptm-artifacts",  # restricted namespaces refuse hostPath (file://) stores
        "PTM_METRICS_PORT": "0",
        "PTM_LIVENESS_PORT": "0",
        "PTM_REQUEUE_SECONDS": "1",
        "PTM_CONVERTER_IMAGE": "ptm/convert:test",
    }
    log = (tmp_path / "operator.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptm_operator.cli", "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "minimal.yaml"))

        def converting() -> dict[str, Any] | None:
            assert proc.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
            jobs = cluster.kubectl(
                "get", "jobs", "-n", namespace, "-l", "ptm.dev/model=resnet18", "-o", "json"
            ).stdout
            items = json.loads(jobs)["items"]
            model = get("ptm", "resnet18")
            conds = {c["type"]: c for c in ((model or {}).get("status") or {}).get("conditions", [])}
            if items and conds.get("Converted", {}).get("reason") == "Converting":
                return dict(items[0])
            return None

        try:
            job = wait_for(converting, 60, "the SA-run operator to create the conversion Job")
        except AssertionError as exc:
            log_tail = (tmp_path / "operator.log").read_text(errors="replace")[-4000:]
            raise AssertionError(f"{exc}\noperator log:\n{log_tail}") from None
        assert job["metadata"]["ownerReferences"][0]["name"] == "resnet18"
        peering = get("kopfpeering", "ptm-operator")
        assert peering is not None and peering.get("status"), "the operator never joined the peering"
        # the Job's pod was admitted by the restricted namespace too
        wait_for(
            lambda: json.loads(
                cluster.kubectl(
                    "get", "pods", "-n", namespace, "-l", "ptm.dev/model=resnet18", "-o", "json"
                ).stdout
            )["items"],
            30,
            "the conversion pod",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()

    helm.run("upgrade", release, str(CHART), "-n", namespace, "--reuse-values", "--set", "replicas=3")
    wait_for(
        lambda: (get("deployment", fullname) or {}).get("spec", {}).get("replicas") == 3, 30, "3 replicas"
    )

    helm.run("uninstall", release, "-n", namespace, "--wait", "--timeout", "60s")
    for kind in ("deployment", "serviceaccount", "role", "rolebinding"):
        assert get(kind, fullname) is None, f"{kind} left after uninstall"
    assert get("clusterrole", fullname, None) is None
    kept = get("crd", CRD_NAME, None)
    assert kept is not None and kept["metadata"]["uid"] == crd_uid, "uninstall must keep the CRD"
    kept_model = get("ptm", "resnet18")
    assert kept_model is not None, "uninstall must keep the models"
    # kopf's finalizer stays on a model whose operator is gone (docs/install.md says so); drop it
    # as an administrator would, so the test namespace can be deleted
    assert kept_model["metadata"].get("finalizers"), "the operator never put its finalizer"
    cluster.kubectl(
        "patch", "ptm", "resnet18", "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
    )
