"""Operator scale: N PretrainedModels on a kwok cluster of 50 GPU nodes, until all are Ready.

For each size N (default 100, 500, 1000) the benchmark starts a fresh, private control plane
(`ptm_operator.devcluster` on free loopback ports in a temporary directory: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, kwok with 50 GPU nodes), runs
`ptm operator --standalone -n <namespace>` as a subprocess under a ServiceAccount of its own,
creates N copies of examples/vision-resnet.yaml (one GPU and one CPU per replica, one replica, no HPA) and
polls until every one has condition Ready=True. Conversion reports are injected by a kwok
Stage (bench/kwok-converter-stage.yaml): a running converter pod exits 0 with a valid compact
report in its termination message, as `ptm convert` would.

Measured per N:
  * seconds from the first create until all N are Ready (and until 50% / 90%);
  * the operator's peak RSS (VmHWM of its process) and CPU seconds;
  * API requests per resource made by the operator: a FlowSchema matching only the operator's
    ServiceAccount makes kube-apiserver count exactly its requests
    (apiserver_flowcontrol_dispatched_requests_total{flow_schema="ptm-bench-operator"}),
    beside the whole cluster's requests (apiserver_request_total, every client, the
    benchmark's own creates and polls subtracted);
  * ptm_operator_reconciles_total from the operator's /metrics;
  * CPU seconds of each control-plane process (they share the machine's cores).

Every process started here is stopped at the end (the operator by its PID, the cluster by
DevCluster.down(), which stops exactly the PIDs it started); each N has a hard timeout. The
session's shared cluster (default ports and directory) is never touched.

    .venv/bin/python bench/operator_scale.py --sizes 100,500,1000 \
        --markdown /tmp/scale.md --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ptm_operator.devcluster import CONTROL_PLANE, ClusterConfig, DevCluster
from ptm_operator.devcluster.runner import LocalOperator

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CRD_FILE = REPO / "crds" / "ptm.dev_pretrainedmodels.yaml"
EXAMPLE = REPO / "examples" / "vision-resnet.yaml"
CONVERTER_STAGE = BENCH / "kwok-converter-stage.yaml"

NAMESPACE = "bench"
OPERATOR_NAMESPACE = "ptm-system"
OPERATOR_SA = "ptm-operator"
FLOW_SCHEMA = "ptm-bench-operator"
MODELS_PATH = f"/apis/ptm.dev/v1alpha1/namespaces/{NAMESPACE}/pretrainedmodels"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the cluster's API over HTTPS with the admin certificate ------------------------------------


class Api:
    """Minimal client: one keep-alive HTTPS connection per thread, counts its own requests."""

    def __init__(self, dev: DevCluster) -> None:
        self.port = dev.config.apiserver_port
        ctx = ssl.create_default_context(cafile=str(dev.pki / "ca.crt"))
        ctx.load_cert_chain(str(dev.pki / "admin.crt"), str(dev.pki / "admin.key"))
        self.ctx = ctx
        self.local = threading.local()
        self.requests = 0
        self._count = threading.Lock()

    def _conn(self) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=60)
            self.local.conn = conn
        return conn

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        accept: str = "application/json",
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept, "Content-Type": content_type}
        for attempt in range(3):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.5)
                continue
            if path != "/metrics":
                with self._count:
                    self.requests += 1
            return resp.status, payload
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None, accept: str = "application/json") -> Any:
        status, payload = self.request(method, path, body, accept)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {payload[:500]!r}")
        return json.loads(payload)


# --- Prometheus text ----------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, names: set[str]) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m is None or m.group(1) not in names:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(3))))
        except ValueError:
            continue
    return out


@dataclass
class ApiCounts:
    """Request counters read from kube-apiserver's /metrics."""

    operator: float = 0.0
    operator_by_priority: dict[str, float] = field(default_factory=dict)
    operator_apf_wait_s: float = 0.0
    total: float = 0.0
    by_verb_resource: dict[str, float] = field(default_factory=dict)
    seconds_by_verb_resource: dict[str, float] = field(default_factory=dict)

    def minus(self, before: ApiCounts) -> ApiCounts:
        def sub(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            return {k: d for k in set(a) | set(b) if (d := a.get(k, 0.0) - b.get(k, 0.0)) > 0}

        return ApiCounts(
            operator=self.operator - before.operator,
            operator_by_priority=sub(self.operator_by_priority, before.operator_by_priority),
            operator_apf_wait_s=self.operator_apf_wait_s - before.operator_apf_wait_s,
            total=self.total - before.total,
            by_verb_resource=sub(self.by_verb_resource, before.by_verb_resource),
            seconds_by_verb_resource=sub(self.seconds_by_verb_resource, before.seconds_by_verb_resource),
        )


def _verb_resource(labels: dict[str, str]) -> str:
    key = f"{labels.get('verb', '')} {labels.get('resource', '') or '-'}"
    return key + ("/" + labels["subresource"] if labels.get("subresource") else "")


def api_counts(api: Api) -> ApiCounts:
    status, payload = api.request("GET", "/metrics", accept="text/plain")
    if status != 200:
        raise RuntimeError(f"kube-apiserver /metrics: HTTP {status}")
    counts = ApiCounts()
    names = {
        "apiserver_flowcontrol_dispatched_requests_total",
        "apiserver_flowcontrol_request_wait_duration_seconds_sum",
        "apiserver_request_total",
        "apiserver_request_duration_seconds_sum",
    }
    for name, labels, value in parse_prometheus(payload.decode(errors="replace"), names):
        if name == "apiserver_request_total":
            counts.total += value
            key = _verb_resource(labels)
            counts.by_verb_resource[key] = counts.by_verb_resource.get(key, 0.0) + value
        elif name == "apiserver_request_duration_seconds_sum":
            key = _verb_resource(labels)
            counts.seconds_by_verb_resource[key] = counts.seconds_by_verb_resource.get(key, 0.0) + value
        elif labels.get("flow_schema") != FLOW_SCHEMA:
            continue
        elif name == "apiserver_flowcontrol_request_wait_duration_seconds_sum":
            counts.operator_apf_wait_s += value
        else:
            counts.operator += value
            pl = labels.get("priority_level", "")
            counts.operator_by_priority[pl] = counts.operator_by_priority.get(pl, 0.0) + value
    return counts


def operator_metrics(port: int) -> dict[str, float]:
    """ptm_operator_* counters from the operator's /metrics, summed over label sets."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode(errors="replace")
    finally:
        conn.close()
    out: dict[str, float] = {}
    wanted = {
        "ptm_operator_reconciles_total",
        "ptm_operator_objects_applied_total",
        "ptm_operator_reconcile_duration_seconds_sum",
        "ptm_operator_reconcile_duration_seconds_count",
        "ptm_operator_api_requests_total",
        "ptm_operator_api_request_seconds_total",
        "ptm_operator_work_queue_adds_total",
        "ptm_operator_work_queue_depth",
    }
    for name, labels, value in parse_prometheus(text, wanted):
        out[name] = out.get(name, 0.0) + value
        if labels:
            key = name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
            out[key] = out.get(key, 0.0) + value
    return out


# --- /proc --------------------------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --- setup --------------------------------------------------------------------------------------


def setup_manifests() -> list[dict[str, Any]]:
    """Namespaces, the operator's identity (cluster-admin), its FlowSchema, the RuntimeClass."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": OPERATOR_SA, "namespace": OPERATOR_NAMESPACE},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "ptm-bench-operator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": OPERATOR_NAMESPACE}],
        },
        {
            # Matches only the operator, so kube-apiserver counts exactly its requests. Its
            # priority level is the one an in-cluster operator's ServiceAccount gets by default
            # (the `service-accounts` FlowSchema): workload-low.
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": FLOW_SCHEMA},
            "spec": {
                "matchingPrecedence": 500,
                "priorityLevelConfiguration": {"name": "workload-low"},
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [
                    {
                        "subjects": [
                            {
                                "kind": "ServiceAccount",
                                "serviceAccount": {"name": OPERATOR_SA, "namespace": OPERATOR_NAMESPACE},
                            }
                        ],
                        "resourceRules": [
                            {
                                "verbs": ["*"],
                                "apiGroups": ["*"],
                                "resources": ["*"],
                                "namespaces": ["*"],
                                "clusterScope": True,
                            }
                        ],
                        "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    }
                ],
            },
        },
        {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": "nvidia"},
            "handler": "nvidia",
        },
    ]


def model_manifest() -> dict[str, Any]:
    """examples/vision-resnet.yaml for the kwok GPU product, one replica, no HPA."""
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"] = {"namespace": NAMESPACE, "labels": body["metadata"].get("labels", {})}
    serving = body["spec"]["serving"]
    serving["gpuSelector"]["products"] = ["NVIDIA-H100-80GB-HBM3"]
    serving.pop("autoscaling", None)
    serving["replicas"] = 1
    # One CPU per replica, not the example's two: a kwok GPU node has 32 CPUs for its 24 GPUs,
    # so at two CPUs only 800 of 1000 replicas fit (50 nodes x 16) and N=1000 could never be
    # all Ready (the runs before this change stopped at 782 and 800).
    serving["resources"]["requests"]["cpu"] = "1"
    return body


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def prepare(dev: DevCluster, api: Api, workdir: Path) -> Path:
    """Install the CRD and the operator's identity; returns the operator's kubeconfig."""
    dev.kubectl("apply", "--server-side", "-f", str(CRD_FILE))

    def established() -> bool:
        status, payload = api.request(
            "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pretrainedmodels.ptm.dev"
        )
        conditions = (
            (json.loads(payload).get("status") or {}).get("conditions") or [] if status == 200 else []
        )
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    wait(established, 60, "the PretrainedModel CRD to be established")
    dev.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(setup_manifests()))
    token = dev.kubectl(
        "create", "token", OPERATOR_SA, "-n", OPERATOR_NAMESPACE, "--duration=4h"
    ).stdout.strip()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "bench",
                "cluster": {"server": dev.server, "certificate-authority": str(dev.pki / "ca.crt")},
            }
        ],
        "users": [{"name": OPERATOR_SA, "user": {"token": token}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": OPERATOR_SA}}],
        "current-context": "bench",
    }
    path = workdir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    path.chmod(0o600)

    def default_sa() -> bool:
        status, _ = api.request("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default")
        return status == 200

    wait(default_sa, 60, f"the default ServiceAccount in {NAMESPACE}")
    return path


# --- the operator -------------------------------------------------------------------------------


class OperatorProcess(LocalOperator):
    """`ptm operator --standalone -n bench` as a subprocess of this benchmark."""

    def __init__(self, kubeconfig: Path, log: Path, env: dict[str, str]) -> None:
        defaults = {
            "PTM_STORE_URI": "file:///var/lib/ptm-bench",
            "PTM_CONVERTER_IMAGE": "ptm/convert:bench",
            "PTM_SERVE_IMAGE": "ptm/serve:bench",
        }
        super().__init__(kubeconfig, NAMESPACE, log, {**defaults, **env})

    def start(self) -> subprocess.Popen[bytes]:
        """Start, and return once its /metrics answers."""
        proc = super().start()

        def serving() -> bool:
            if not self.alive():
                raise RuntimeError(f"the operator exited ({self.returncode()}); see {self.log}")
            try:
                operator_metrics(self.metrics_port)
            except OSError:
                return False
            return True

        wait(serving, 90, "the operator's /metrics", 0.25)
        return proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 20) -> None:
        super().stop(timeout)


# --- one size -----------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    ready: int
    reasons: dict[str, int]
    operator_rss_mib: float
    operator_cpu_s: float
    queue_depth: float | None = None
    """Models waiting for a reconcile in the operator's work queue (its /metrics)."""


@dataclass
class Steady:
    """What the operator costs once everything is Ready and nothing changes."""

    seconds: float
    requests_per_s: float
    reconciles_per_s: float
    cpu_percent: float
    rss_mib: float


def steady_state(api: Api, operator: OperatorProcess, seconds: float) -> Steady:
    before = api_counts(api)
    reconciles = operator_metrics(operator.metrics_port).get("ptm_operator_reconciles_total", 0.0)
    cpu = cpu_seconds(operator.pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    delta = api_counts(api).minus(before)
    return Steady(
        seconds=round(elapsed, 1),
        requests_per_s=round(delta.operator / elapsed, 1),
        reconciles_per_s=round(
            (operator_metrics(operator.metrics_port).get("ptm_operator_reconciles_total", 0.0) - reconciles)
            / elapsed,
            1,
        ),
        cpu_percent=round(100 * (cpu_seconds(operator.pid) - cpu) / elapsed, 1),
        rss_mib=round(proc_status_kib(operator.pid, "VmRSS") / 1024, 1),
    )


@dataclass
class RunResult:
    n: int
    ready: int = 0
    all_ready_s: float | None = None
    half_ready_s: float | None = None
    p90_ready_s: float | None = None
    create_s: float = 0.0
    timed_out: bool = False
    error: str | None = None
    operator_peak_rss_mib: float = 0.0
    operator_cpu_s: float = 0.0
    operator_requests: float = 0.0
    operator_requests_by_priority: dict[str, float] = field(default_factory=dict)
    cluster_requests: float = 0.0
    bench_requests: int = 0
    operator_apf_wait_s: float = 0.0
    cluster_requests_by_verb: dict[str, dict[str, float]] = field(default_factory=dict)
    reconciles: float = 0.0
    operator_metrics: dict[str, float] = field(default_factory=dict)
    component_cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    load_before: str = ""
    load_after: str = ""
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    final_reasons: dict[str, int] = field(default_factory=dict)
    steady: Steady | None = None
    timeline: list[Sample] = field(default_factory=list)

    @property
    def operator_requests_per_resource(self) -> float:
        return self.operator_requests / self.n

    @property
    def cluster_requests_per_resource(self) -> float:
        return (self.cluster_requests - self.bench_requests) / self.n


def ready_table(api: Api) -> tuple[int, Counter[str]]:
    """Ready count and Ready reasons, from one list request in Table form (printer columns)."""
    table = api.json("GET", MODELS_PATH, accept=TABLE)
    names = [c["name"] for c in table.get("columnDefinitions", [])]
    i_ready, i_reason = names.index("Ready"), names.index("Reason")
    ready = 0
    reasons: Counter[str] = Counter()
    for row in table.get("rows", []):
        cells = row["cells"]
        if cells[i_ready] == "True":
            ready += 1
        reasons[str(cells[i_reason] or "None")] += 1
    return ready, reasons


def create_models(api: Api, n: int, workers: int) -> None:
    base = model_manifest()

    def create(i: int) -> None:
        body = copy.deepcopy(base)
        body["metadata"]["name"] = f"model-{i:04d}"
        status, payload = api.request("POST", MODELS_PATH, body)
        if status not in (200, 201):
            raise RuntimeError(f"creating model-{i:04d}: HTTP {status}: {payload[:300]!r}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(create, range(n)))


def component_pids(dev: DevCluster) -> dict[str, int | None]:
    comps = dev.status()["components"]
    return {name: comps[name]["pid"] for name in (*CONTROL_PLANE, "kwok")}


def run_size(n: int, args: argparse.Namespace, root: Path) -> RunResult:
    result = RunResult(n=n)
    workdir = root / f"n{n}"
    workdir.mkdir(parents=True)
    ports = free_ports(6)
    config = ClusterConfig(
        directory=workdir / "cluster",
        etcd_port=ports[0],
        etcd_peer_port=ports[1],
        apiserver_port=ports[2],
        controller_manager_port=ports[3],
        scheduler_port=ports[4],
        kwok_port=ports[5],
        gpu_nodes=args.gpu_nodes,
        gpus_per_node=args.gpus_per_node,
        cpu_nodes=args.cpu_nodes,
        kwok_stages=(CONVERTER_STAGE,),
        controller_manager_args=tuple(args.controller_manager_arg),
        scheduler_args=tuple(args.scheduler_arg),
    )
    dev = DevCluster(config)
    operator: OperatorProcess | None = None
    started = time.monotonic()
    try:
        print(f"[n={n}] starting a private cluster in {config.directory} (apiserver :{ports[2]})", flush=True)
        dev.up(timeout=180)
        api = Api(dev)
        kubeconfig = prepare(dev, api, workdir)
        operator = OperatorProcess(kubeconfig, workdir / "operator.log", dict(args.operator_env))
        operator.start()
        time.sleep(2)  # kopf's watch starts right after the startup handler serves /metrics
        pids = component_pids(dev)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        op_cpu_before = cpu_seconds(operator.pid)
        before = api_counts(api)
        api.requests = 0
        result.load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])

        print(f"[n={n}] creating {n} PretrainedModels", flush=True)
        t0 = time.monotonic()
        deadline = t0 + args.timeout
        create_models(api, n, args.create_workers)
        result.create_s = time.monotonic() - t0
        print(f"[n={n}] created in {result.create_s:.1f}s; waiting for Ready", flush=True)
        last_print = 0.0
        while True:
            ready, reasons = ready_table(api)
            now = time.monotonic() - t0
            printing = now - last_print >= 10
            result.timeline.append(
                Sample(
                    t=round(now, 2),
                    ready=ready,
                    reasons=dict(reasons),
                    operator_rss_mib=round(proc_status_kib(operator.pid, "VmRSS") / 1024, 1),
                    operator_cpu_s=round(cpu_seconds(operator.pid) - op_cpu_before, 2),
                    # read with the progress line only: a /metrics scrape per poll is load on
                    # the process measured
                    queue_depth=operator_metrics(operator.metrics_port).get("ptm_operator_work_queue_depth")
                    if printing
                    else None,
                )
            )
            result.ready = ready
            result.final_reasons = dict(reasons)
            if result.half_ready_s is None and ready >= math.ceil(n * 0.5):
                result.half_ready_s = now
            if result.p90_ready_s is None and ready >= math.ceil(n * 0.9):
                result.p90_ready_s = now
            if ready >= n:
                result.all_ready_s = now
                break
            if not operator.alive():
                result.error = f"the operator exited ({operator.returncode()})"
                break
            if time.monotonic() >= deadline:
                result.timed_out = True
                break
            if printing:
                last_print = now
                depth = result.timeline[-1].queue_depth
                print(
                    f"[n={n}] t={now:6.1f}s ready={ready}/{n} {dict(reasons.most_common(4))} queue={depth}",
                    flush=True,
                )
            time.sleep(args.poll)
        print(
            f"[n={n}] {'all Ready' if result.all_ready_s else 'NOT all Ready'} at "
            f"t={time.monotonic() - t0:.1f}s ({result.ready}/{n})",
            flush=True,
        )

        result.bench_requests = api.requests
        if args.keep_workdir:  # everything the API server measured, for a closer look
            (workdir / "apiserver-metrics.txt").write_bytes(
                api.request("GET", "/metrics", accept="text/plain")[1]
            )
        after = api_counts(api)
        delta = after.minus(before)
        result.operator_requests = delta.operator
        result.operator_requests_by_priority = delta.operator_by_priority
        result.cluster_requests = delta.total
        result.operator_apf_wait_s = delta.operator_apf_wait_s
        result.cluster_requests_by_verb = {
            key: {
                "count": count,
                "mean_ms": round(1000 * delta.seconds_by_verb_resource.get(key, 0.0) / count, 1),
            }
            for key, count in sorted(delta.by_verb_resource.items(), key=lambda kv: -kv[1])[:40]
        }
        result.operator_peak_rss_mib = proc_status_kib(operator.pid, "VmHWM") / 1024
        result.operator_cpu_s = cpu_seconds(operator.pid) - op_cpu_before
        result.component_cpu_s = {
            name: round(cpu_seconds(pid) - cpu_before[name], 1) for name, pid in pids.items()
        }
        result.operator_metrics = operator_metrics(operator.metrics_port)
        result.reconciles = result.operator_metrics.get("ptm_operator_reconciles_total", 0.0)
        result.load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        result.stages = stage_latencies(api)
        if result.all_ready_s is not None and args.steady > 0:
            print(f"[n={n}] all Ready; measuring {args.steady:.0f}s of steady state", flush=True)
            result.steady = steady_state(api, operator, args.steady)
    except Exception as exc:  # recorded, and the next size still runs
        result.error = f"{type(exc).__name__}: {exc}"
        print(f"[n={n}] error: {result.error}", flush=True)
    finally:
        if operator is not None:
            operator.stop()
        dev.down()
        result.wall_s = time.monotonic() - started
        if args.keep_workdir:
            print(f"[n={n}] logs kept in {workdir}", flush=True)
        else:
            for log in (workdir / "operator.log", *sorted((config.directory / "logs").glob("*.log"))):
                if log.exists() and args.logs_dir is not None:
                    dest = args.logs_dir / f"n{n}"
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, dest / log.name)
            shutil.rmtree(workdir, ignore_errors=True)
    return result


# --- where the time went -------------------------------------------------------------------------


def _epoch(ts: Any) -> float | None:
    if not ts:
        return None
    return dt.datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()


def _condition_time(obj: dict[str, Any], type_: str) -> float | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return _epoch(c.get("lastTransitionTime"))
    return None


#: The path of one model to Ready, stage by stage, and who does each stage.
STAGES = (
    "operator: model created -> Job created",
    "job controller: Job -> converter pod",
    "scheduler: converter pod scheduled",
    "kwok: converter pod finished",
    "job controller: pod finished -> Job complete",
    "operator: Job complete -> Deployment created",
    "deployment controller: Deployment -> ReplicaSet",
    "replicaset controller: ReplicaSet -> pod",
    "scheduler: serving pod scheduled",
    "kwok: serving pod Ready",
    "controllers + operator: pod Ready -> model Ready",
    "total: model created -> Ready",
)


def stage_latencies(api: Api) -> dict[str, dict[str, float]]:
    """Per stage of a model's path to Ready: p50, p90 and max seconds over the models, from the
    objects' own timestamps (creationTimestamp, condition transitions; 1 s resolution)."""

    def items(path: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = api.json("GET", path).get("items") or []
        return found

    ns = f"/namespaces/{NAMESPACE}"
    models = items(MODELS_PATH)
    jobs = {j["metadata"]["labels"].get("ptm.dev/model"): j for j in items(f"/apis/batch/v1{ns}/jobs")}
    deployments = {
        d["metadata"]["labels"].get("ptm.dev/model"): d for d in items(f"/apis/apps/v1{ns}/deployments")
    }
    replicasets = {
        ref["uid"]: r
        for r in items(f"/apis/apps/v1{ns}/replicasets")
        for ref in r["metadata"].get("ownerReferences") or []
    }
    job_pods: dict[str, dict[str, Any]] = {}
    serving_pods: dict[str, dict[str, Any]] = {}
    for pod in items(f"/api/v1{ns}/pods"):
        labels = pod["metadata"].get("labels") or {}
        if labels.get("app.kubernetes.io/component") == "serving":
            serving_pods.setdefault(labels.get("ptm.dev/model", ""), pod)
        elif labels.get("batch.kubernetes.io/job-name"):
            job_pods.setdefault(labels["batch.kubernetes.io/job-name"], pod)
    spans: dict[str, list[float]] = {name: [] for name in STAGES}
    for m in models:
        name = m["metadata"]["name"]
        created = _epoch(m["metadata"].get("creationTimestamp"))
        job = jobs.get(name) or {}
        jpod = job_pods.get(job.get("metadata", {}).get("name", "")) or {}
        dep = deployments.get(name) or {}
        rs = replicasets.get(dep.get("metadata", {}).get("uid", "")) or {}
        spod = serving_pods.get(name) or {}
        finished = None
        for cs in (jpod.get("status") or {}).get("containerStatuses") or []:
            finished = _epoch(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt")) or finished
        points = [
            created,
            _epoch(job.get("metadata", {}).get("creationTimestamp")),
            _epoch(jpod.get("metadata", {}).get("creationTimestamp")),
            _condition_time(jpod, "PodScheduled"),
            finished,
            _epoch((job.get("status") or {}).get("completionTime")),
            _epoch(dep.get("metadata", {}).get("creationTimestamp")),
            _epoch(rs.get("metadata", {}).get("creationTimestamp")),
            _epoch(spod.get("metadata", {}).get("creationTimestamp")),
            _condition_time(spod, "PodScheduled"),
            _condition_time(spod, "Ready"),
            _condition_time(m, "Ready"),
        ]
        for stage, start, end in zip(STAGES, points, points[1:], strict=False):
            if start is not None and end is not None:
                spans[stage].append(end - start)
        if created is not None and points[-1] is not None:
            spans[STAGES[-1]].append(points[-1] - created)
    out: dict[str, dict[str, float]] = {}
    for stage, values in spans.items():
        if values:
            values.sort()
            out[stage] = {
                "n": len(values),
                "p50": values[len(values) // 2],
                "p90": values[min(len(values) - 1, int(len(values) * 0.9))],
                "max": values[-1],
            }
    return out


# --- report -------------------------------------------------------------------------------------


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def machine() -> str:
    mem_kib = proc_status_kib_meminfo()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model or 'unknown CPU'}), {mem_kib / 1024 / 1024:.0f} GiB memory"


def proc_status_kib_meminfo() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def markdown(results: list[RunResult], args: argparse.Namespace, command: str) -> str:
    lines = [
        "| N | all Ready (s) | 50% / 90% Ready (s) | creates took (s) | operator peak RSS (MiB) | operator CPU (s) "
        "| operator API requests / resource | all API requests / resource | reconciles (per resource) | result |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if r.error and not r.timeline:
            lines.append(f"| {r.n} | — | — | — | — | — | — | — | — | error: {r.error} |")
            continue
        verdict = (
            "all Ready"
            if r.all_ready_s is not None
            else f"{r.ready}/{r.n} Ready at the {args.timeout:.0f} s timeout"
            if r.timed_out
            else f"stopped: {r.error}"
        )
        lines.append(
            f"| {r.n} | {_s(r.all_ready_s)} | {_s(r.half_ready_s)} / {_s(r.p90_ready_s)} | {r.create_s:.1f} "
            f"| {r.operator_peak_rss_mib:.0f} | {r.operator_cpu_s:.0f} | {r.operator_requests_per_resource:.1f} "
            f"| {r.cluster_requests_per_resource:.1f} | {r.reconciles:.0f} ({r.reconciles / r.n:.1f}) | {verdict} |"
        )
    lines += [
        "",
        "CPU seconds per process during each run (from the first create until all Ready or the timeout):",
        "",
        "| N | operator | kube-apiserver | etcd | kube-controller-manager | kube-scheduler | kwok |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        c = r.component_cpu_s
        lines.append(
            f"| {r.n} | {r.operator_cpu_s:.0f} | {c.get('kube-apiserver', 0):.0f} | {c.get('etcd', 0):.0f} "
            f"| {c.get('kube-controller-manager', 0):.0f} | {c.get('kube-scheduler', 0):.0f} | {c.get('kwok', 0):.0f} |"
        )
    steady = [r for r in results if r.steady is not None]
    if steady:
        lines += [
            "",
            "Steady state (everything Ready, nothing changing), measured right after the run:",
            "",
            "| N | window (s) | operator API requests/s | reconciles/s | operator CPU (% of a core) | operator RSS (MiB) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in steady:
            assert r.steady is not None
            st = r.steady
            lines.append(
                f"| {r.n} | {st.seconds:.0f} | {st.requests_per_s:.1f} | {st.reconciles_per_s:.1f} "
                f"| {st.cpu_percent:.0f} | {st.rss_mib:.0f} |"
            )
    biggest = max((r for r in results if r.cluster_requests_by_verb), key=lambda r: r.n, default=None)
    if biggest is not None:
        lines += [
            "",
            f"kube-apiserver, N={biggest.n}: the most frequent requests (every client) and their mean "
            "latency as the API server measured it:",
            "",
            "| request | count | per resource | mean latency (ms) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for key, v in list(biggest.cluster_requests_by_verb.items())[:14]:
            lines.append(
                f"| `{key}` | {v['count']:.0f} | {v['count'] / biggest.n:.1f} | {v['mean_ms']:.0f} |"
            )
    for r in results:
        if not r.stages:
            continue
        lines += [
            "",
            f"N={r.n}: where a model's time went, stage by stage (objects' timestamps, 1 s resolution; "
            "over the models that reached each stage):",
            "",
            "| stage | models | p50 (s) | p90 (s) | max (s) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for stage, v in r.stages.items():
            lines.append(f"| {stage} | {v['n']:.0f} | {v['p50']:.0f} | {v['p90']:.0f} | {v['max']:.0f} |")
    env = " ".join(f"{k}={v}" for k, v in args.operator_env) or "(defaults)"
    raised = [
        (name, flags)
        for name, flags in (
            ("kube-controller-manager", args.controller_manager_arg),
            ("kube-scheduler", args.scheduler_arg),
        )
        if flags
    ]
    lines += [
        "",
        f"Machine: {machine()}; load average before and after each run: "
        + "; ".join(f"N={r.n}: {r.load_before} / {r.load_after}" for r in results)
        + ".",
        f"Command: `{command}`. Operator settings: {env}. Cluster: {args.gpu_nodes} kwok GPU nodes x "
        f"{args.gpus_per_node} `nvidia.com/gpu` and {args.cpu_nodes} CPU nodes, a fresh control plane per N"
        + "".join(f", {name} {' '.join(flags)}" for name, flags in raised)
        + ("." if raised else ", every component at its default settings."),
    ]
    return "\n".join(lines) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100,500,1000", help="comma-separated N (default: 100,500,1000)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="hard limit per N, seconds (default 300)"
    )
    parser.add_argument("--gpu-nodes", type=int, default=50)
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=24,
        help="nvidia.com/gpu per kwok node (default 24: 1000 one-GPU replicas fit on 50 nodes)",
    )
    parser.add_argument(
        "--cpu-nodes",
        type=int,
        default=10,
        help="kwok CPU nodes for the conversion Jobs, which ask for no GPU (default 10)",
    )
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between Ready polls (one list each)")
    parser.add_argument("--create-workers", type=int, default=8, help="parallel creates (default 8)")
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="PTM_X=VALUE",
        help="extra operator settings (repeatable), e.g. PTM_REQUEUE_SECONDS=2",
    )
    parser.add_argument(
        "--controller-manager-arg",
        action="append",
        default=[],
        metavar="--FLAG=VALUE",
        help="extra kube-controller-manager flag (repeatable; the = form), e.g. --controller-manager-arg=--kube-api-qps=200",
    )
    parser.add_argument(
        "--scheduler-arg",
        action="append",
        default=[],
        metavar="--FLAG=VALUE",
        help="extra kube-scheduler flag (repeatable; the = form), e.g. --scheduler-arg=--kube-api-qps=300",
    )
    parser.add_argument(
        "--steady",
        type=float,
        default=60.0,
        help="after all are Ready, measure the operator's idle cost for this many seconds (0: skip)",
    )
    parser.add_argument("--markdown", type=Path, help="write the results table here")
    parser.add_argument("--json", type=Path, help="write every number (timelines included) here")
    parser.add_argument("--logs-dir", type=Path, help="copy the operator's and components' logs here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary cluster directories")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    pairs = []
    for item in args.operator_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("PTM_"):
            parser.error(f"--operator-env wants PTM_X=VALUE, got {item!r}")
        pairs.append((key, value))
    args.operator_env = pairs
    if max(sizes) > args.gpu_nodes * args.gpus_per_node:
        parser.error(
            f"{max(sizes)} one-GPU replicas do not fit on {args.gpu_nodes}x{args.gpus_per_node} GPUs"
        )
    command = " ".join(["python", "bench/operator_scale.py", *(argv if argv is not None else sys.argv[1:])])

    def on_signal(signum: int, _frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    results: list[RunResult] = []
    root = Path(tempfile.mkdtemp(prefix="ptm-operator-scale-"))
    try:
        for n in sizes:
            results.append(run_size(n, args, root))
            if args.json:
                args.json.write_text(
                    json.dumps([asdict(r) for r in results], indent=1, default=_json_default)
                )
    except KeyboardInterrupt:
        print("interrupted; every process this benchmark started has been stopped", flush=True)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(root, ignore_errors=True)
    text = markdown(results, args, command)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if results and all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
