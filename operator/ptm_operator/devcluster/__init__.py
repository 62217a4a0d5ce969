"""A real Kubernetes control plane on 127.0.0.1 for tests and the demo.

In the spirit of Kubernetes' own local-up-cluster: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler built from the official Go modules at one pinned
version (dev/k8s/go.mod, cached under ~/.cache/ptm/k8s-<version>/bin), plus kwok simulating
nodes (GPU nodes with `nvidia.com/gpu` capacity, and CPU nodes) so that scheduling is real.

Every process is started by `up`, its PID recorded in the cluster directory, and `down`
stops exactly those PIDs (checked against /proc so a recycled PID is never signalled).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ptm_operator.devcluster.certs import ensure_pki
from ptm_operator.devcluster.node import NODE_PROCESSES, RealNode
from ptm_operator.devcluster.oci import qualified

if TYPE_CHECKING:
    from ptm_operator.devcluster.images import BuiltImage

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "dev" / "k8s" / "build.sh"
GO_MOD = REPO_ROOT / "dev" / "k8s" / "go.mod"
KWOK_STAGES = REPO_ROOT / "dev" / "kwok" / "stages.yaml"

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
BINARIES = (*CONTROL_PLANE, "kubectl", "kwok")
NODE_BINARIES = ("kubelet", "kube-proxy")
#: Processes of the real node that come from the machine's packages, not from our build.
HOST_BINARIES = ("containerd",)

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
KWOK_ANNOTATION = "kwok.x-k8s.io/node"


class ClusterError(RuntimeError):
    """The local cluster could not be built, started or reached; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("PTM_CACHE", Path.home() / ".cache" / "ptm"))


def k8s_version() -> str:
    for line in GO_MOD.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "k8s.io/kubernetes" and parts[1].startswith("v"):
            return parts[1]
    raise ClusterError(f"no k8s.io/kubernetes version in {GO_MOD}")


#: Shifts every port, so that a second cluster (another PTM_CLUSTER_DIR) can run beside the first.
_PORT_OFFSET = int(os.environ.get("PTM_CLUSTER_PORT_OFFSET", "0"))


@dataclass
class ClusterConfig:
    """Where the cluster lives and which loopback ports it uses."""

    directory: Path = field(
        default_factory=lambda: Path(os.environ.get("PTM_CLUSTER_DIR", cache_dir() / "cluster"))
    )
    etcd_port: int = 23790 + _PORT_OFFSET
    etcd_peer_port: int = 23800 + _PORT_OFFSET
    apiserver_port: int = 16443 + _PORT_OFFSET
    controller_manager_port: int = 10357 + _PORT_OFFSET
    scheduler_port: int = 10359 + _PORT_OFFSET
    kwok_port: int = 10347 + _PORT_OFFSET
    service_cidr: str = "10.96.0.0/16"
    gpu_nodes: int = int(os.environ.get("PTM_KWOK_GPU_NODES", "2"))
    gpus_per_node: int = int(os.environ.get("PTM_KWOK_GPUS_PER_NODE", "2"))
    cpu_nodes: int = int(os.environ.get("PTM_KWOK_CPU_NODES", "1"))
    kwok_stages: tuple[Path, ...] = ()
    """Extra kwok Stage files loaded after dev/kwok/stages.yaml (benchmarks drive pods with them)."""
    port_offset: int = _PORT_OFFSET
    """Shifts the real node's kubelet and kube-proxy ports (the control plane's ports are fields
    of their own; both follow PTM_CLUSTER_PORT_OFFSET by default)."""
    real_node: bool = os.environ.get("PTM_REAL_NODE", "") == "1"
    """Also run a real node (containerd + kubelet + kube-proxy, see devcluster.node)."""
    controller_manager_args: tuple[str, ...] = ()
    """Extra kube-controller-manager flags (the scale benchmark raises its client QPS with them)."""
    scheduler_args: tuple[str, ...] = ()
    """Extra kube-scheduler flags (likewise)."""

    @property
    def service_ip(self) -> str:
        base = self.service_cidr.split("/")[0].rsplit(".", 1)[0]
        return f"{base}.1"


def kwok_nodes(config: ClusterConfig) -> list[dict[str, Any]]:
    """Node objects for kwok: GPU nodes (capacity, GPU feature-discovery labels, GPU taint) and CPU nodes."""
    nodes: list[dict[str, Any]] = []

    def node(
        name: str, labels: dict[str, str], capacity: dict[str, str], taints: list[dict[str, str]]
    ) -> None:
        nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        "topology.kubernetes.io/zone": "zone-a",
                        **labels,
                    },
                },
                "spec": {"taints": taints},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
        )

    for i in range(config.gpu_nodes):
        node(
            f"kwok-gpu-{i}",
            {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.memory": "81559",
                "nvidia.com/gpu.count": str(config.gpus_per_node),
                "node.kubernetes.io/instance-type": "kwok-gpu",
            },
            {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(config.gpus_per_node)},
            [GPU_TAINT],
        )
    for i in range(config.cpu_nodes):
        node(
            f"kwok-cpu-{i}",
            {"node.kubernetes.io/instance-type": "kwok-cpu"},
            {"cpu": "16", "memory": "64Gi", "pods": "110"},
            [],
        )
    return nodes


def exited_pod_status(pod: dict[str, Any], container: str, exit_code: int, message: str) -> dict[str, Any]:
    """The status a kubelet writes when a pod's only container exits (restartPolicy Never).

    On kwok nodes nothing runs, so the demo and the tests write this to play the container
    that would have run (e.g. a converter leaving its report as termination message).
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    image = next((c.get("image", "") for c in pod["spec"]["containers"] if c["name"] == container), "")
    terminated = {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "message": message,
        "startedAt": now,
        "finishedAt": now,
    }
    return {
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
            ],
            "containerStatuses": [
                {
                    "name": container,
                    "image": image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }
    }


def run_tool(
    label: str, command: list[str], args: Sequence[str], input: str | None, check: bool, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run `command args`, capturing text; with `check`, a non-zero exit raises ClusterError naming it."""
    proc = subprocess.run(
        [*command, *args], input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise ClusterError(f"{label} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ptm-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "ptm-dev", "context": {"cluster": "ptm-dev", "user": user}}],
        "current-context": "ptm-dev",
    }


def _pid_alive(pid: int, binary: Path) -> bool:
    """True when `pid` runs `binary` (guards against a recycled PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return bool(cmdline) and cmdline[0].decode(errors="replace") == str(binary)


class DevCluster:
    """Start, inspect and stop the local cluster."""

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config or ClusterConfig()
        self.version = k8s_version()
        self.bin_dir = cache_dir() / f"k8s-{self.version}" / "bin"
        d = self.config.directory
        self.pki = d / "pki"
        self.logs = d / "logs"
        self.pids = d / "pids"
        self.kubeconfig = d / "admin.kubeconfig"
        self.server = f"https://127.0.0.1:{self.config.apiserver_port}"
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # --- binaries ----------------------------------------------------------------------------

    def binary(self, name: str) -> Path:
        if name in HOST_BINARIES:
            return Path(shutil.which(name) or f"/usr/bin/{name}")
        return self.bin_dir / name

    def ensure_binaries(self) -> None:
        """Build whatever is missing (a no-op when all are cached)."""
        wanted = (*BINARIES, *NODE_BINARIES) if self.config.real_node else BINARIES
        if all(self.binary(b).exists() for b in wanted):
            return
        if not BUILD_SCRIPT.exists():
            raise ClusterError(f"binaries missing in {self.bin_dir} and no build script at {BUILD_SCRIPT}")
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), *wanted], check=False)
        if proc.returncode != 0:
            raise ClusterError(
                f"building the cluster binaries failed (exit {proc.returncode}); see output above"
            )

    # --- process bookkeeping -----------------------------------------------------------------

    def pid_recorded(self, name: str) -> bool:
        return self._pid(name) is not None

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.pids / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def running(self, name: str) -> bool:
        pid = self._pid(name)
        return pid is not None and _pid_alive(pid, self.binary(name))

    def start_process(self, name: str, args: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [str(self.binary(name)), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the caller; `down` ends it by PID
            cwd=self.config.directory,
        )
        log.close()
        self._children[name] = proc
        (self.pids / f"{name}.pid").write_text(str(proc.pid))

    def stop_process(self, name: str, timeout: float = 15.0) -> None:
        pid = self._pid(name)
        if pid is not None and _pid_alive(pid, self.binary(name)):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid, self.binary(name)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid, self.binary(name)):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # reap if it is our child
                os.waitpid(pid, os.WNOHANG)
        (self.pids / f"{name}.pid").unlink(missing_ok=True)

    # --- health ------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def ready(self) -> bool:
        """The API server answers /readyz with ok."""
        if not (self.pki / "done").exists():
            return False
        try:
            with urllib.request.urlopen(f"{self.server}/readyz", context=self._ssl(), timeout=3) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def is_up(self) -> bool:
        return all(self.running(c) for c in (*CONTROL_PLANE, "kwok")) and self.ready()

    def wait_until(self, what: str, check: Any, timeout: float, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            child = self._children.get(log)
            if child is not None and child.poll() is not None:
                raise ClusterError(
                    f"{log} exited ({child.returncode}) while waiting for {what}; last log lines:\n{self.tail(log)}"
                )
            time.sleep(0.2)
        raise ClusterError(
            f"timed out after {timeout:.0f}s waiting for {what}; last log lines:\n{self.tail(log)}"
        )

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- lifecycle ---------------------------------------------------------------------------

    def up(self, timeout: float = 120.0) -> None:
        """Start every component not already running and wait until the cluster is usable."""
        if self.is_up():
            if self.config.real_node and not RealNode(self).is_up():
                self.up_real_node()
            return
        self.ensure_binaries()
        if any(self._pid(c) is not None for c in BINARIES):
            self.down()  # half-started or stale: start clean
        c = self.config
        c.directory.mkdir(parents=True, exist_ok=True)
        ensure_pki(self.pki, c.service_ip)
        self._write_kubeconfigs()
        etcd_data = c.directory / "etcd-data"
        shutil.rmtree(etcd_data, ignore_errors=True)
        etcd_url = f"http://127.0.0.1:{c.etcd_port}"
        peer_url = f"http://127.0.0.1:{c.etcd_peer_port}"
        self.start_process(
            "etcd",
            [
                "--name=ptm-dev",
                f"--data-dir={etcd_data}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=ptm-dev={peer_url}",
                "--unsafe-no-fsync",  # a throwaway test store: speed over durability
                "--log-level=warn",
            ],
        )
        self.wait_until("etcd", lambda: self.http_ok(f"{etcd_url}/health"), 30, "etcd")
        p = self.pki
        self.start_process(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={c.apiserver_port}",
                "--endpoint-reconciler-type=none",  # 127.0.0.1 is refused as an Endpoints address
                f"--service-cluster-ip-range={c.service_cidr}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=Node,RBAC",
                # A namespace can send every pod to the real node (devcluster.node.real_node_namespace).
                "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--allow-privileged=true",
                "--profiling=false",
                f"--cert-dir={p}",
                "--v=1",
            ],
        )
        self.wait_until("kube-apiserver /readyz", self.ready, timeout, "kube-apiserver")
        common = ["--bind-address=127.0.0.1", "--leader-elect=false", "--profiling=false", "--v=1"]
        cm_kc = c.directory / "controller-manager.kubeconfig"
        self.start_process(
            "kube-controller-manager",
            [
                *common,
                f"--kubeconfig={cm_kc}",
                f"--authentication-kubeconfig={cm_kc}",
                f"--authorization-kubeconfig={cm_kc}",
                f"--secure-port={c.controller_manager_port}",
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}",
                f"--cluster-signing-cert-file={p / 'ca.crt'}",
                f"--cluster-signing-key-file={p / 'ca.key'}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={c.service_cidr}",
                *c.controller_manager_args,
            ],
        )
        sched_kc = c.directory / "scheduler.kubeconfig"
        self.start_process(
            "kube-scheduler",
            [
                *common,
                f"--kubeconfig={sched_kc}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                f"--secure-port={c.scheduler_port}",
                *c.scheduler_args,
            ],
        )
        self.start_process(
            "kwok",
            [
                f"--kubeconfig={c.directory / 'kwok.kubeconfig'}",
                f"--config={KWOK_STAGES}",
                *(f"--config={stages}" for stages in c.kwok_stages),
                "--node-lease-duration-seconds=40",  # heartbeats, or the node controller marks nodes NotReady
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{c.kwok_port}",
                "--cidr=10.244.0.0/16",
                "--node-ip=127.0.0.1",
            ],
        )
        self.wait_until("the default ServiceAccount", self._default_sa_exists, 60, "kube-controller-manager")
        nodes = kwok_nodes(c)
        if nodes:
            self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(nodes))
            self.wait_until("kwok nodes Ready", lambda: self._nodes_ready(len(nodes)), 60, "kwok")
        if c.real_node:
            self.up_real_node()

    def up_real_node(self, images: Sequence[str] = ()) -> list[BuiltImage]:
        """Start the real node beside a running control plane (a no-op for what already runs).

        The pause image and `images` (targets of devcluster.images: convert, serve) are built
        (cached by content) and imported into the node's containerd; returns the built images.
        """
        from ptm_operator.devcluster.images import build

        self.config.real_node = True
        self.ensure_binaries()
        built = build(["pause", *images])
        RealNode(self).up(sandbox_image=qualified(built["pause"].name), images=list(built.values()))
        return [built[target] for target in images]

    def down(self) -> None:
        """Stop exactly the processes `up` started, newest first."""
        if any(self.pid_recorded(p) for p in NODE_PROCESSES):
            RealNode(self).down()
        for name in reversed(BINARIES):
            self.stop_process(name)

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ready": self.ready(),
            "components": {
                name: {
                    "pid": self._pid(name),
                    "running": self.running(name),
                    "log": str(self.logs / f"{name}.log"),
                }
                for name in (*CONTROL_PLANE, "kwok", *NODE_PROCESSES)
                if name not in NODE_PROCESSES or self.pid_recorded(name)
            },
        }

    # --- helpers -----------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster."""
        return run_tool(
            "kubectl",
            [str(self.binary("kubectl")), f"--kubeconfig={self.kubeconfig}"],
            args,
            input,
            check,
            timeout,
        )

    def wait_crd_established(self, name: str, timeout: float = 60) -> None:
        """Poll until the CRD `name` is Established (`kubectl wait` fails instead of waiting when
        it looks before the API server has written any condition)."""

        def established() -> bool:
            proc = self.kubectl("get", "crd", name, "-o", "json", check=False)
            if proc.returncode != 0:
                return False
            conditions = json.loads(proc.stdout).get("status", {}).get("conditions") or []
            return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

        self.wait_until(f"CRD {name} Established", established, timeout, "kube-apiserver")

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}"}

    def write_kubeconfig(self, path: Path, identity: str) -> None:
        """A kubeconfig for one of the client identities in devcluster.certs."""
        p = self.pki
        kc = _kubeconfig(self.server, p / "ca.crt", p / f"{identity}.crt", p / f"{identity}.key", identity)
        path.write_text(yaml.safe_dump(kc))
        path.chmod(0o600)

    def _write_kubeconfigs(self) -> None:
        for name in ("admin", "controller-manager", "scheduler", "kwok"):
            self.write_kubeconfig(self.config.directory / f"{name}.kubeconfig", name)

    @staticmethod
    def http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _default_sa_exists(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

    def _nodes_ready(self, want: int) -> bool:
        proc = self.kubectl("get", "nodes", "-l", "type=kwok", "-o", "json", check=False)
        if proc.returncode != 0:
            return False
        ready = 0
        for item in json.loads(proc.stdout).get("items", []):
            for cond in item.get("status", {}).get("conditions", []):
                if cond.get("type") == "Ready" and cond.get("status") == "True":
                    ready += 1
        return ready >= want
