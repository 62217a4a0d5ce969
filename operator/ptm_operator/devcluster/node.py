"""A real node in the local cluster: containerd + kubelet + kube-proxy on this machine.

kwok proves the control logic; this node runs real pods. containerd, runc and the CNI plugins
come from Debian's packages (dev/node/install.sh); kubelet and kube-proxy are built from the same
pinned Kubernetes module as the control plane. Settings this machine kind needs (measured):

* containerd's CRI with `restrict_oom_score_adj` (a negative oom_score_adj is refused here) and
  runc with cgroupfs (`SystemdCgroup = false`: there is no systemd); kubelet `cgroupDriver:
  cgroupfs` and `failCgroupV1: false` (cgroups are v1 here, which kubelet >= 1.35 refuses by default);
* CNI `bridge` + `portmap` on a private bridge; kube-proxy in iptables mode (no IPVS);
* the node's address lives on the loopback interface (kubelet refuses 127.0.0.1 itself as a node
  IP), so nothing the node serves is reachable from outside this machine;
* images are built locally (ptm_operator.devcluster.images) and imported into containerd, and
  the pause image is ours.

The node is tainted `ptm.dev/real-node=true:NoSchedule` so that pods meant for kwok nodes never
land on it; a namespace opts in with `real_node_namespace()` (the PodNodeSelector and
PodTolerationRestriction admission plugins give every pod there the selector and toleration).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ptm_operator.devcluster.certs import NODE_NAME

if TYPE_CHECKING:
    from ptm_operator.devcluster import DevCluster
    from ptm_operator.devcluster.images import BuiltImage

NODE_PROCESSES = ("containerd", "kubelet", "kube-proxy")
NODE_LABEL = "ptm.dev/node"
NODE_LABEL_VALUE = "real"
NODE_TAINT = {"key": "ptm.dev/real-node", "value": "true", "effect": "NoSchedule"}
NODE_IP = "10.250.0.1"
POD_CIDR = "10.245.0.0/24"
BRIDGE = "ptm0"
CNI_BIN_DIR = Path("/usr/lib/cni")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip", "debootstrap")
INSTALL_HINT = "run dev/node/install.sh (Debian: apt-get install containerd runc containernetworking-plugins iptables debootstrap)"


def real_node_namespace(name: str) -> dict[str, Any]:
    """A Namespace whose pods all run on the real node (admission adds selector and toleration)."""
    toleration = {"key": NODE_TAINT["key"], "operator": "Exists", "effect": NODE_TAINT["effect"]}
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "annotations": {
                "scheduler.alpha.kubernetes.io/node-selector": f"{NODE_LABEL}={NODE_LABEL_VALUE}",
                "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps([toleration]),
            },
        },
    }


def missing_host_tools() -> list[str]:
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    missing += [
        f"{CNI_BIN_DIR}/{p}"
        for p in ("bridge", "portmap", "host-local", "loopback")
        if not (CNI_BIN_DIR / p).exists()
    ]
    return missing


class RealNode:
    """Configuration files, start and stop of the node's three processes."""

    def __init__(self, cluster: DevCluster) -> None:
        self.cluster = cluster
        self.dir = cluster.config.directory / "node"
        self.socket = self.dir / "containerd" / "containerd.sock"
        offset = cluster.config.port_offset
        self.kubelet_port = 10250 + offset
        self.kubelet_healthz_port = 10248 + offset
        self.proxy_healthz_port = 10256 + offset
        self.proxy_metrics_port = 10249 + offset

    # --- configuration -------------------------------------------------------------------------

    def containerd_config(self, sandbox_image: str) -> str:
        d = self.dir / "containerd"
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        return "\n".join(
            [
                "version = 2",
                f'root = "{d / "root"}"',
                f'state = "{d / "state"}"',
                "[grpc]",
                f'  address = "{self.socket}"',
                cri,
                f'  sandbox_image = "{sandbox_image}"',
                "  restrict_oom_score_adj = true",
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                f"{cri[:-1]}.containerd]",
                '  snapshotter = "overlayfs"',
                '  default_runtime_name = "runc"',
                f"{cri[:-1]}.containerd.runtimes.runc]",
                '  runtime_type = "io.containerd.runc.v2"',
                f"{cri[:-1]}.containerd.runtimes.runc.options]",
                "  SystemdCgroup = false",
                f"{cri[:-1]}.cni]",
                f'  bin_dir = "{CNI_BIN_DIR}"',
                f'  conf_dir = "{self.dir / "cni" / "net.d"}"',
                "",
            ]
        )

    def cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "ptm",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def kubelet_config(self) -> dict[str, Any]:
        pki = self.cluster.pki
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.kubelet_healthz_port,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "podLogsDir": str(self.dir / "pod-logs"),
            # A shared development disk: evict only when it is really full, and never garbage-
            # collect the locally built images (there is no registry to pull them back from).
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 30,
            "registerWithTaints": [NODE_TAINT],
            "serializeImagePulls": False,
        }

    def kube_proxy_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE_NAME,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{self.proxy_healthz_port}",
            "metricsBindAddress": f"127.0.0.1:{self.proxy_metrics_port}",
            # Leave the machine's conntrack sysctls alone (they are not ours to change here).
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "nodePortAddresses": ["127.0.0.1/32"],
        }

    def write_configs(self, sandbox_image: str) -> None:
        for sub in ("containerd", "cni/net.d", "kubelet", "pod-logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "containerd" / "config.toml").write_text(self.containerd_config(sandbox_image))
        (self.dir / "cni" / "net.d" / "10-ptm.conflist").write_text(json.dumps(self.cni_config(), indent=1))
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(self.kubelet_config()))
        (self.dir / "kube-proxy.yaml").write_text(yaml.safe_dump(self.kube_proxy_config()))
        for who in ("kubelet", "kube-proxy"):
            self.cluster.write_kubeconfig(self.dir / f"{who}.kubeconfig", who)

    # --- lifecycle -----------------------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        from ptm_operator.devcluster import run_tool

        return run_tool(
            "ctr", ["ctr", "--address", str(self.socket), "-n", "k8s.io"], args, None, check, timeout
        )

    def up(self, sandbox_image: str, images: Sequence[BuiltImage], timeout: float = 120) -> None:
        """Start containerd (importing `images`), kubelet and kube-proxy; wait until the node is Ready."""
        from ptm_operator.devcluster import ClusterError
        from ptm_operator.devcluster.images import import_into_containerd

        missing = missing_host_tools()
        if missing:
            raise ClusterError(f"the real node needs {', '.join(missing)}: {INSTALL_HINT}")
        c = self.cluster
        self.write_configs(sandbox_image)
        # The node's address, on the loopback interface: reachable from this machine only.
        subprocess.run(["ip", "addr", "replace", f"{NODE_IP}/32", "dev", "lo"], check=True)
        if not c.running("containerd"):
            c.start_process("containerd", ["--config", str(self.dir / "containerd" / "config.toml")])
            c.wait_until(
                "containerd", lambda: self.ctr("version", check=False).returncode == 0, 30, "containerd"
            )
        for image in images:
            import_into_containerd(image, str(self.socket))
        if not c.running("kubelet"):
            c.start_process(
                "kubelet",
                [
                    f"--config={self.dir / 'kubelet.yaml'}",
                    f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}",
                    f"--root-dir={self.dir / 'kubelet'}",
                    f"--node-ip={NODE_IP}",
                    f"--hostname-override={NODE_NAME}",
                    f"--node-labels={NODE_LABEL}={NODE_LABEL_VALUE},node.kubernetes.io/instance-type=local",
                    "--v=1",
                ],
            )
        c.wait_until(f"node {NODE_NAME} Ready", self.ready, timeout, "kubelet")
        if not c.running("kube-proxy"):
            c.start_process("kube-proxy", [f"--config={self.dir / 'kube-proxy.yaml'}", "--v=1"])
        c.wait_until(
            "kube-proxy healthz",
            lambda: c.http_ok(f"http://127.0.0.1:{self.proxy_healthz_port}/healthz"),
            60,
            "kube-proxy",
        )
        if not self.ready():
            raise ClusterError(f"node {NODE_NAME} is not Ready; last kubelet log lines:\n{c.tail('kubelet')}")

    def ready(self) -> bool:
        proc = self.cluster.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if proc.returncode != 0:
            return False
        conditions = json.loads(proc.stdout).get("status", {}).get("conditions", [])
        return any(x.get("type") == "Ready" and x.get("status") == "True" for x in conditions)

    def is_up(self) -> bool:
        return all(self.cluster.running(p) for p in NODE_PROCESSES) and self.ready()

    def down(self) -> None:
        """Stop kube-proxy and kubelet, every container they left, then containerd; undo host changes."""
        c = self.cluster
        had_proxy = c.pid_recorded("kube-proxy")
        c.stop_process("kube-proxy")
        if had_proxy:
            # Remove the KUBE-* iptables chains kube-proxy made.
            subprocess.run(
                [str(c.binary("kube-proxy")), "--cleanup", f"--config={self.dir / 'kube-proxy.yaml'}"],
                capture_output=True,
                check=False,
                timeout=60,
            )
        c.stop_process("kubelet")
        if c.running("containerd"):
            tasks = self.ctr("tasks", "ls", "-q", check=False, timeout=60).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=60)
            deadline = time.monotonic() + 30
            for task in tasks:
                while self.ctr("tasks", "delete", task, check=False, timeout=60).returncode != 0:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.3)
            for container in self.ctr("containers", "ls", "-q", check=False, timeout=60).stdout.split():
                self.ctr("containers", "delete", container, check=False, timeout=60)
        c.stop_process("containerd")
        self._unmount_leftovers()
        for netns in _cni_netns():
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
        subprocess.run(
            ["ip", "addr", "delete", f"{NODE_IP}/32", "dev", "lo"], capture_output=True, check=False
        )
        # A node that is gone should not linger as NotReady in a control plane that stays up.
        if c.ready():
            c.kubectl("delete", "node", NODE_NAME, "--ignore-not-found", "--wait=false", check=False)

    def _unmount_leftovers(self) -> None:
        """Volumes and rootfs mounts of pods that were killed with the node, deepest first."""
        root = str(self.dir.resolve())
        with contextlib.suppress(OSError):
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
            for mount in sorted((m for m in mounts if m.startswith(root + "/")), key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)

    def service_url(self, namespace: str, name: str, port_name: str) -> str:
        """http://CLUSTER-IP:PORT of a Service; reachable from this machine through kube-proxy."""
        proc = self.cluster.kubectl("get", "service", name, "-n", namespace, "-o", "json")
        svc = json.loads(proc.stdout)
        port = next(p["port"] for p in svc["spec"]["ports"] if p.get("name") == port_name)
        return f"http://{svc['spec']['clusterIP']}:{port}"


def _cni_netns() -> list[str]:
    """Network namespaces containerd made for pods (cni-<uuid>), left when containers were killed."""
    try:
        names = os.listdir("/var/run/netns")
    except OSError:
        return []
    return [n for n in names if n.startswith("cni-")]
