"""Prometheus collectors of the serving runtime, registered on the registry they are given.

No module-global metrics: each server (and each test) builds its own `ServeMetrics` on its own
`CollectorRegistry`, and `metrics_app` serves that registry on the metrics port. Status codes are
the HTTP ones for both protocols (gRPC requests count under the HTTP status their error maps
to), so one `code=~"5.."` selector finds server errors everywhere.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServeMetrics:
    """The runtime's collectors; `model` labels every series."""

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.registry = registry
        self.model = model
        self.requests = Counter(
            "ptm_requests",
            "Inference requests answered, by protocol and status code.",
            ["model", "protocol", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "ptm_request_duration_seconds",
            "End-to-end inference request latency (decode to encode).",
            ["model", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead_seconds = Histogram(
            "ptm_request_overhead_seconds",
            "Per request: end-to-end time minus queueing and model compute (decode, validation, "
            "batching, encode, event-loop waits).",
            ["model", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "ptm_queue_duration_seconds",
            "Time a request waited in the batching queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "ptm_compute_duration_seconds",
            "Model execution time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "ptm_batch_size",
            "Rows per batch sent to the model.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "ptm_batch_requests",
            "Requests merged into one batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "ptm_queue_depth",
            "Requests waiting in the batching queue.",
            ["model"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "ptm_requests_in_flight",
            "Inference requests being handled.",
            ["model"],
            registry=registry,
        )
        self.load_seconds = Gauge(
            "ptm_model_load_seconds",
            "Time to verify and load the model (warm-up excluded).",
            ["model"],
            registry=registry,
        )
        self.warmup_seconds = Gauge(
            "ptm_model_warmup_seconds",
            "Time spent in warm-up inferences.",
            ["model"],
            registry=registry,
        )
        self.preferred_batch_size = Gauge(
            "ptm_preferred_batch_size",
            "Rows at which a forming batch closes (configured, or measured at load).",
            ["model"],
            registry=registry,
        )
        self.concurrent_runs = Gauge(
            "ptm_concurrent_runs",
            "Batches the model runs at once (configured, or measured at load).",
            ["model"],
            registry=registry,
        )
        self.provider_info = Gauge(
            "ptm_execution_provider_info",
            "The ONNX Runtime execution provider in use (value 1).",
            ["model", "provider"],
            registry=registry,
        )
        self.ready = Gauge("ptm_ready", "1 while the server reports ready.", ["model"], registry=registry)
        # Children resolved once: labels() is a dict lookup under a lock, worth skipping per request.
        self._queue_depth = self.queue_depth.labels(model)
        self._in_flight = self.in_flight.labels(model)
        self._queue_seconds = self.queue_seconds.labels(model)
        self._compute_seconds = self.compute_seconds.labels(model)
        self._batch_size = self.batch_size.labels(model)
        self._batch_requests = self.batch_requests.labels(model)

    def observe_request(self, protocol: str, code: int, seconds: float) -> None:
        self.requests.labels(self.model, protocol, str(code)).inc()
        self.request_seconds.labels(self.model, protocol).observe(seconds)

    def observe_overhead(self, protocol: str, seconds: float) -> None:
        self.overhead_seconds.labels(self.model, protocol).observe(max(0.0, seconds))

    def observe_batch(self, rows: int, requests: int, compute_seconds: float) -> None:
        self._batch_size.observe(rows)
        self._batch_requests.observe(requests)
        self._compute_seconds.observe(compute_seconds)

    def observe_queue(self, seconds: float) -> None:
        self._queue_seconds.observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def add_in_flight(self, delta: int) -> None:
        self._in_flight.inc(delta)

    def model_loaded(
        self,
        provider: str,
        load_seconds: float,
        warmup_seconds: float,
        preferred_batch_size: int,
        concurrent_runs: int,
    ) -> None:
        self.load_seconds.labels(self.model).set(load_seconds)
        self.warmup_seconds.labels(self.model).set(warmup_seconds)
        self.preferred_batch_size.labels(self.model).set(preferred_batch_size)
        self.concurrent_runs.labels(self.model).set(concurrent_runs)
        self.provider_info.labels(self.model, provider).set(1)

    def set_ready(self, ready: bool) -> None:
        self.ready.labels(self.model).set(1 if ready else 0)


def metrics_app(registry: CollectorRegistry) -> Starlette:
    """ASGI app answering GET /metrics with the registry's exposition."""

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
