"""Fixtures for the operator's integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import Cluster
from tests.integration.helpers import Operator, pool_node


@pytest.fixture
def operator(cluster: Cluster, crd_installed: str, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    runtime_class = {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": "nvidia"},
        "handler": "nvidia",
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(runtime_class))
    node = pool_node(namespace)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(node))
    op = Operator(cluster, namespace, tmp_path / "operator.log")
    op.start()
    yield op
    # Delete the models while the operator still runs, so kopf lifts its finalizers and the
    # namespace can go.
    cluster.kubectl("delete", "pretrainedmodels", "--all", "-n", namespace, "--timeout=30s", check=False)
    op.stop()
    cluster.kubectl("delete", "node", node["metadata"]["name"], "--wait=false", check=False)
