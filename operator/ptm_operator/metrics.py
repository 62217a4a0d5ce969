"""Operator metrics on /metrics: reconciles by outcome and duration, objects managed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class OperatorMetrics:
    """Collectors on a registry of their own (module-global metrics leak between tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "ptm_operator_reconciles",
            "Reconciles by outcome (settled, waiting, error).",
            ["outcome"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "ptm_operator_reconcile_duration_seconds",
            "Time to observe, plan and apply one resource.",
            ["outcome"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.applied = Counter(
            "ptm_operator_objects_applied",
            "Child objects server-side applied, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.api_requests = Counter(
            "ptm_operator_api_requests",
            "Requests to the Kubernetes API by verb (APPLY: server-side apply) and resource.",
            ["verb", "resource"],
            registry=self.registry,
        )
        self.api_seconds = Counter(
            "ptm_operator_api_request_seconds",
            "Seconds spent waiting for the Kubernetes API, by verb and resource.",
            ["verb", "resource"],
            registry=self.registry,
        )
        self.queued = Counter(
            "ptm_operator_work_queue_adds",
            "Models queued for a reconcile, by cause (model, Job, Deployment, Pod, health, timed,"
            " error) and whether the model was already queued (deduplicated).",
            ["cause", "deduplicated"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "ptm_operator_work_queue_depth",
            "Models waiting for a reconcile now (not those queued for later).",
            registry=self.registry,
        )
        self._served = False

    def api_request(self, verb: str, resource: str, seconds: float) -> None:
        self.api_requests.labels(verb, resource).inc()
        self.api_seconds.labels(verb, resource).inc(seconds)

    def reconcile_done(self, outcome: str, seconds: float) -> None:
        self.reconciles.labels(outcome).inc()
        self.reconcile_seconds.labels(outcome).observe(seconds)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Start the /metrics HTTP server once (port 0: do not serve)."""
        if port and not self._served:
            start_http_server(port, addr=addr, registry=self.registry)
            self._served = True
