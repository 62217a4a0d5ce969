"""Session-wide fixtures: the real local cluster and a fresh namespace per test.

The cluster is started once per session (or reused when one is already up) by
`ptm_operator.devcluster`. If it cannot start, every test that needs it errors with the
reason — tests never skip because the cluster is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "ptm.dev_pretrainedmodels.yaml"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll until `predicate` returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class Cluster:
    """What tests get: the kubeconfig, the server URL and a kubectl runner."""

    def __init__(self, dev: Any) -> None:
        self._dev = dev
        self.kubeconfig: Path = dev.kubeconfig
        self.server: str = dev.server
        self.bin_dir: Path = dev.bin_dir

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc: subprocess.CompletedProcess[str] = self._dev.kubectl(
            *args, input=input, check=False, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def wait_crd_established(self, name: str) -> None:
        self._dev.wait_crd_established(name)

    def patch_status(self, kind: str, name: str, namespace: str, body: dict[str, Any]) -> None:
        """Merge-patch an object's status subresource (what a kubelet or controller writes)."""
        self.kubectl(
            "patch",
            kind,
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(body),
        )


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    from ptm_operator.devcluster import DevCluster

    dev = DevCluster()
    started_here = not dev.is_up()
    dev.up()  # raises ClusterError with the reason; the test then errors, never skips
    yield Cluster(dev)
    if started_here and os.environ.get("PTM_KEEP_CLUSTER") != "1":
        dev.down()


@pytest.fixture(scope="session")
def k8s_api(cluster: Cluster) -> Iterator[Any]:
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    assert isinstance(api_client, client.ApiClient)
    yield api_client
    api_client.close()


@pytest.fixture(scope="session")
def crd_installed(cluster: Cluster) -> str:
    """The generated CRD from crds/, applied server-side and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    name = "pretrainedmodels.ptm.dev"
    cluster.wait_crd_established(name)
    return name


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount ready), deleted afterwards."""
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"default ServiceAccount never appeared in namespace {name}")
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
