"""The docs name what the code exports: every metric of `ptm serve` and of the operator."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ptm_operator.metrics import OperatorMetrics
from ptm_runtime.serve.metrics import ServeMetrics
from tests.conftest import REPO


def _series(registry: CollectorRegistry) -> set[str]:
    # A counter's family is named without the `_total` its samples (and the docs) carry.
    return {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}


def test_observability_doc_lists_every_metric() -> None:
    doc = (REPO / "docs" / "observability.md").read_text()
    serve, operator = CollectorRegistry(), CollectorRegistry()
    ServeMetrics(serve, "m")
    OperatorMetrics(operator)
    exported = _series(serve) | _series(operator)
    assert len(exported) > 20
    missing = sorted(name for name in exported if f"`{name}`" not in doc)
    assert not missing, f"docs/observability.md does not describe {missing}"
