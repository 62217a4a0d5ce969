"""The real node's configuration: the settings this machine kind needs, written where they belong."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from ptm_operator.devcluster import ClusterConfig, DevCluster
from ptm_operator.devcluster.node import NODE_IP, NODE_TAINT, RealNode, real_node_namespace
from ptm_operator.devcluster.story import local_volume


def node(tmp_path: Path, offset: int = 0) -> RealNode:
    return RealNode(DevCluster(ClusterConfig(directory=tmp_path, port_offset=offset)))


def test_containerd_settings_this_machine_needs(tmp_path: Path) -> None:
    config = tomllib.loads(node(tmp_path).containerd_config("docker.io/library/ptm-pause:abc"))
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True  # a negative oom_score_adj is refused here
    assert cri["sandbox_image"] == "docker.io/library/ptm-pause:abc"
    assert cri["stream_server_address"] == "127.0.0.1"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert config["grpc"]["address"].startswith(str(tmp_path))
    assert len(config["grpc"]["address"]) < 108  # a unix socket path's limit


def test_kubelet_and_kube_proxy_listen_on_this_machine_only(tmp_path: Path) -> None:
    n = node(tmp_path, offset=300)
    kubelet = n.kubelet_config()
    assert kubelet["cgroupDriver"] == "cgroupfs" and kubelet["failCgroupV1"] is False
    assert kubelet["address"] == NODE_IP and kubelet["healthzBindAddress"] == "127.0.0.1"
    assert kubelet["port"] == 10550 and kubelet["readOnlyPort"] == 0
    assert kubelet["authentication"]["anonymous"]["enabled"] is False
    assert kubelet["registerWithTaints"] == [NODE_TAINT]
    assert kubelet["imageGCHighThresholdPercent"] == 100  # local images cannot be pulled back
    proxy = n.kube_proxy_config()
    assert proxy["mode"] == "iptables"
    for key in ("bindAddress", "healthzBindAddress", "metricsBindAddress"):
        assert proxy[key].startswith("127.0.0.1")
    assert proxy["healthzBindAddress"].endswith(":10556")


def test_cni_bridge_with_portmap(tmp_path: Path) -> None:
    plugins = node(tmp_path).cni_config()["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "portmap"]
    assert plugins[0]["ipam"]["dataDir"].startswith(str(tmp_path))


def test_a_namespace_opts_in_to_the_real_node() -> None:
    annotations = real_node_namespace("demo")["metadata"]["annotations"]
    assert annotations["scheduler.alpha.kubernetes.io/node-selector"] == "ptm.dev/node=real"
    [toleration] = json.loads(annotations["scheduler.alpha.kubernetes.io/defaultTolerations"])
    assert toleration == {"key": NODE_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}


def test_local_volumes_are_bound_to_their_claim_only() -> None:
    pv, pvc = local_volume("ns", "models", Path("/data/models"))
    assert pv["spec"]["claimRef"] == {"namespace": "ns", "name": "models"}
    assert pv["spec"]["hostPath"] == {"path": "/data/models", "type": "Directory"}
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["storageClassName"] == pv["spec"]["storageClassName"]
