"""Canary analysis: Prometheus text -> Sample -> a pass / fail / inconclusive verdict."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ptm_operator.analysis import Sample, Verdict, is_server_error, judge, parse_metrics
from ptm_operator.api import AnalysisSpec
from ptm_runtime.serve.metrics import ServeMetrics

INF = math.inf

#: One serving pod's /metrics page as prometheus_client writes it: 120 REST requests (3 of them
#: 503s, 2 of them 400s) and 30 gRPC ones (1 INTERNAL), plus series analysis must ignore.
POD_METRICS = """\
# HELP ptm_requests_total Inference requests answered, by protocol and status code.
# TYPE ptm_requests_total counter
ptm_requests_total{code="200",model="resnet50",protocol="rest"} 115.0
ptm_requests_total{code="400",model="resnet50",protocol="rest"} 2.0
ptm_requests_total{code="503",model="resnet50",protocol="rest"} 3.0
ptm_requests_total{code="OK",model="resnet50",protocol="grpc"} 29.0
ptm_requests_total{code="INTERNAL",model="resnet50",protocol="grpc"} 1.0
# HELP ptm_requests_created Inference requests answered, by protocol and status code.
# TYPE ptm_requests_created gauge
ptm_requests_created{code="200",model="resnet50",protocol="rest"} 1.7402436e+09
ptm_requests_created{code="503",model="resnet50",protocol="rest"} 1.7402437e+09
# HELP ptm_request_duration_seconds End-to-end inference request latency (decode to encode).
# TYPE ptm_request_duration_seconds histogram
ptm_request_duration_seconds_bucket{le="0.005",model="resnet50",protocol="rest"} 60.0
ptm_request_duration_seconds_bucket{le="0.01",model="resnet50",protocol="rest"} 100.0
ptm_request_duration_seconds_bucket{le="0.05",model="resnet50",protocol="rest"} 118.0
ptm_request_duration_seconds_bucket{le="0.1",model="resnet50",protocol="rest"} 120.0
ptm_request_duration_seconds_bucket{le="+Inf",model="resnet50",protocol="rest"} 120.0
ptm_request_duration_seconds_count{model="resnet50",protocol="rest"} 120.0
ptm_request_duration_seconds_sum{model="resnet50",protocol="rest"} 1.02
ptm_request_duration_seconds_bucket{le="0.005",model="resnet50",protocol="grpc"} 10.0
ptm_request_duration_seconds_bucket{le="0.01",model="resnet50",protocol="grpc"} 25.0
ptm_request_duration_seconds_bucket{le="0.05",model="resnet50",protocol="grpc"} 29.0
ptm_request_duration_seconds_bucket{le="0.1",model="resnet50",protocol="grpc"} 30.0
ptm_request_duration_seconds_bucket{le="+Inf",model="resnet50",protocol="grpc"} 30.0
ptm_request_duration_seconds_count{model="resnet50",protocol="grpc"} 30.0
ptm_request_duration_seconds_sum{model="resnet50",protocol="grpc"} 0.3
ptm_request_duration_seconds_created{model="resnet50",protocol="rest"} 1.7402436e+09
# HELP ptm_queue_duration_seconds Time a request waited in the batching queue.
# TYPE ptm_queue_duration_seconds histogram
ptm_queue_duration_seconds_bucket{le="0.005",model="resnet50"} 150.0
ptm_queue_duration_seconds_bucket{le="+Inf",model="resnet50"} 150.0
# HELP ptm_requests_in_flight Inference requests being handled.
# TYPE ptm_requests_in_flight gauge
ptm_requests_in_flight{model="resnet50"} 2.0
ptm_requests_total{code="500",model="other",protocol="rest"} 40.0
ptm_request_duration_seconds_bucket{le="+Inf",model="other",protocol="rest"} 40.0
"""


def test_parse_metrics_sums_requests_errors_and_buckets_over_protocols() -> None:
    sample = parse_metrics(POD_METRICS, "resnet50")
    assert sample.pods == 1
    assert sample.requests == 150.0
    assert sample.errors == 4.0  # 3 x 503 + 1 x INTERNAL; 400s are the client's fault
    assert sample.buckets == {0.005: 70.0, 0.01: 125.0, 0.05: 147.0, 0.1: 150.0, INF: 150.0}
    assert sample.error_rate == pytest.approx(4 / 150)


def test_parse_metrics_without_a_model_takes_every_series() -> None:
    sample = parse_metrics(POD_METRICS)
    assert sample.requests == 190.0
    assert sample.errors == 44.0
    assert sample.buckets[INF] == 190.0


def test_parse_metrics_of_another_model_finds_only_its_series() -> None:
    sample = parse_metrics(POD_METRICS, "other")
    assert (sample.requests, sample.errors, sample.buckets) == (40.0, 40.0, {INF: 40.0})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# HELP ptm_requests_total nothing yet\n# TYPE ptm_requests_total counter\n",
        'garbage line without value\n{}\nptm_requests_total{code="200"} not-a-number\n',
    ],
)
def test_parse_metrics_of_an_empty_or_broken_page(text: str) -> None:
    sample = parse_metrics(text, "resnet50")
    assert (sample.requests, sample.errors, sample.buckets, sample.pods) == (0.0, 0.0, {}, 1)
    assert sample.quantile(0.99) is None
    assert sample.error_rate == 0.0


def test_parse_metrics_tolerates_timestamps_escapes_and_series_without_a_model_label() -> None:
    text = (
        'ptm_requests_total{code="200",model="resnet50",protocol="rest",note="a \\"quoted\\" value"} 10 1740243600000\n'
        'ptm_requests_total{code="502",protocol="rest"} 2\n'
        'ptm_request_duration_seconds_bucket{le="+Inf"} 12\n'
    )
    sample = parse_metrics(text, "resnet50")
    assert sample.requests == 12.0
    assert sample.errors == 2.0
    assert sample.buckets == {INF: 12.0}


def test_parse_metrics_reads_what_the_runtime_writes() -> None:
    """Contract with ptm_runtime.serve.metrics: the real collectors' exposition parses."""
    registry = CollectorRegistry()
    metrics = ServeMetrics(registry, "minilm")
    for _ in range(18):
        metrics.observe_request("rest", 200, 0.004)
    metrics.observe_request("rest", 500, 0.02)
    metrics.observe_request("grpc", 503, 0.7)
    metrics.observe_request("grpc", 429, 0.001)
    sample = parse_metrics(generate_latest(registry).decode(), "minilm")
    assert sample.requests == 21.0
    assert sample.errors == 2.0
    assert sample.buckets[INF] == 21.0
    assert sample.quantile(0.5) == 0.005
    assert sample.quantile(1.0) == 1.0


@pytest.mark.parametrize(
    ("code", "server_error"),
    [
        ("200", False),
        ("400", False),
        ("429", False),
        ("499", False),
        ("500", True),
        ("503", True),
        ("504", True),
        ("OK", False),
        ("INVALID_ARGUMENT", False),
        ("RESOURCE_EXHAUSTED", False),
        ("NOT_FOUND", False),
        ("INTERNAL", True),
        ("UNKNOWN", True),
        ("UNAVAILABLE", True),
        ("DATA_LOSS", True),
        ("DEADLINE_EXCEEDED", True),
        ("internal", True),
        ("", False),
    ],
)
def test_server_errors(code: str, server_error: bool) -> None:
    assert is_server_error(code) is server_error


def test_samples_add_up_over_pods() -> None:
    total = Sample()
    total.add(parse_metrics(POD_METRICS, "resnet50"))
    total.add(parse_metrics(POD_METRICS, "resnet50"))
    assert (total.pods, total.requests, total.errors) == (2, 300.0, 8.0)
    assert total.buckets[0.01] == 250.0
    assert total.buckets[INF] == 300.0


BUCKETS = {0.005: 90.0, 0.01: 95.0, 0.05: 99.0, 0.1: 100.0, INF: 100.0}


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        (BUCKETS, 0.5, 0.005),
        (BUCKETS, 0.9, 0.005),
        (BUCKETS, 0.95, 0.01),
        (BUCKETS, 0.96, 0.05),
        (BUCKETS, 0.99, 0.05),
        (BUCKETS, 0.999, 0.1),
        ({0.1: 90.0, 0.5: 90.0, INF: 100.0}, 0.99, 0.5),  # beyond the last bound: the last finite one
        ({INF: 100.0}, 0.99, None),
        ({0.1: 0.0, INF: 0.0}, 0.99, None),
        ({}, 0.99, None),
        ({0.25: 4.0, 0.01: 1.0, INF: 4.0}, 0.5, 0.25),  # unordered input
    ],
)
def test_quantile_from_buckets(buckets: dict[float, float], q: float, expected: float | None) -> None:
    assert Sample(requests=100.0, buckets=dict(buckets), pods=1).quantile(q) == expected


def sample(requests: float, errors: float = 0.0, p99: float | None = 0.01, pods: int = 1) -> Sample:
    """A sample whose p99 bucket bound is `p99` seconds (every request at or below it)."""
    buckets = {} if p99 is None else {p99 / 2: requests * 0.9, p99: requests, INF: requests}
    return Sample(requests=requests, errors=errors, buckets=buckets, pods=pods)


def analysis(**fields: Any) -> AnalysisSpec:
    return AnalysisSpec.model_validate(fields)


@pytest.mark.parametrize(
    ("canary", "stable", "spec", "verdict", "words"),
    [
        pytest.param(None, sample(100), {}, Verdict.INCONCLUSIVE, "no canary metrics", id="no sample"),
        pytest.param(
            sample(100, pods=0),
            sample(100),
            {},
            Verdict.INCONCLUSIVE,
            "no canary metrics",
            id="no pods answered",
        ),
        pytest.param(
            sample(19),
            sample(100),
            {"minRequests": 20},
            Verdict.INCONCLUSIVE,
            "19 canary requests < minRequests 20",
            id="too few requests",
        ),
        pytest.param(
            sample(19, errors=19),
            None,
            {"minRequests": 20},
            Verdict.INCONCLUSIVE,
            "minRequests",
            id="few requests, all failed",
        ),
        pytest.param(
            sample(20),
            sample(100),
            {"minRequests": 20},
            Verdict.PASS,
            "error rate 0.00%",
            id="exactly minRequests",
        ),
        pytest.param(
            sample(0), None, {"minRequests": 0}, Verdict.PASS, "error rate 0.00%", id="minRequests 0"
        ),
        pytest.param(
            sample(100, errors=1),
            sample(100),
            {"maxErrorRate": 0.01},
            Verdict.PASS,
            "error rate 1.00%",
            id="error rate at the limit",
        ),
        pytest.param(
            sample(100, errors=2),
            sample(100),
            {"maxErrorRate": 0.01},
            Verdict.FAIL,
            "error rate 2.00% > 1.00%",
            id="error rate over",
        ),
        pytest.param(
            sample(100, p99=0.25),
            sample(100, p99=0.25),
            {"maxP99LatencyMs": 200},
            Verdict.FAIL,
            "p99 250 ms > 200 ms",
            id="p99 over absolute",
        ),
        pytest.param(
            sample(100, p99=0.1),
            sample(100, p99=0.1),
            {"maxP99LatencyMs": 100},
            Verdict.PASS,
            "p99 100 ms",
            id="p99 at absolute",
        ),
        pytest.param(
            sample(100, p99=0.05),
            sample(100, p99=0.025),
            {"maxP99LatencyRatio": 1.5},
            Verdict.FAIL,
            "p99 50 ms > 1.5 x stable 25 ms",
            id="p99 over ratio",
        ),
        pytest.param(
            sample(100, p99=0.05),
            sample(100, p99=0.05),
            {"maxP99LatencyRatio": 1.5},
            Verdict.PASS,
            "p99 50 ms",
            id="p99 same as stable",
        ),
        pytest.param(
            sample(100, p99=0.05),
            sample(100, p99=0.025),
            {"maxP99LatencyRatio": None},
            Verdict.PASS,
            "p99 50 ms",
            id="ratio off",
        ),
        pytest.param(
            sample(100, p99=0.05), None, {}, Verdict.PASS, "p99 50 ms", id="no stable sample: ratio skipped"
        ),
        pytest.param(
            sample(100, p99=0.05),
            sample(0, p99=None),
            {},
            Verdict.PASS,
            "p99 50 ms",
            id="stable without latency data",
        ),
        pytest.param(
            sample(100, p99=None),
            sample(100),
            {"maxP99LatencyMs": 1},
            Verdict.PASS,
            "error rate",
            id="no latency data",
        ),
        pytest.param(
            sample(100, errors=5, p99=0.5),
            sample(100, p99=0.1),
            {"maxP99LatencyMs": 300},
            Verdict.FAIL,
            "error rate 5.00% > 1.00%; p99 500 ms > 300 ms; p99 500 ms > 1.5 x stable 100 ms",
            id="every failure named",
        ),
    ],
)
def test_judge(
    canary: Sample | None, stable: Sample | None, spec: dict[str, Any], verdict: Verdict, words: str
) -> None:
    measured = judge(canary, stable, analysis(**spec))
    assert measured.verdict is verdict
    assert words in measured.message


def test_judge_default_thresholds_on_parsed_pages() -> None:
    canary = parse_metrics(POD_METRICS, "resnet50")  # 4/150 = 2.7% server errors
    stable = parse_metrics(
        POD_METRICS.replace('code="503"', 'code="200"').replace("INTERNAL", "OK"), "resnet50"
    )
    assert judge(stable, stable, AnalysisSpec()).verdict is Verdict.PASS
    failed = judge(canary, stable, AnalysisSpec())
    assert failed.verdict is Verdict.FAIL
    assert "error rate 2.67% > 1.00%" in failed.message


def test_agreement_of_classifier_outputs_is_argmax_agreement() -> None:
    import numpy as np

    from ptm_operator.analysis import agreement

    stable = np.array([[0.1, 2.0, 0.3], [3.0, 0.1, 0.2], [0.0, 0.1, 5.0], [1.0, 0.0, 0.0]])
    canary = stable.copy()
    canary[3] = [0.0, 1.0, 0.0]
    assert agreement(canary, stable, 0.99) == 0.75


def test_agreement_of_embeddings_is_cosine_above_the_threshold() -> None:
    import numpy as np

    from ptm_operator.analysis import agreement

    rng = np.random.default_rng(0)
    stable = rng.normal(size=(10, 16))
    stable /= np.linalg.norm(stable, axis=1, keepdims=True)
    canary = stable + 0.001 * rng.normal(size=stable.shape)
    canary[0] = -canary[0]
    canary /= np.linalg.norm(canary, axis=1, keepdims=True)
    assert agreement(canary, stable, 0.99) == 0.9
    assert agreement(canary[:, :8], stable, 0.99) == 0.0  # shapes differ: nothing agrees


def test_low_golden_set_agreement_fails_the_canary_even_without_traffic() -> None:
    from ptm_operator.analysis import Verdict, judge
    from ptm_operator.api import AnalysisSpec, DataRef

    spec = AnalysisSpec(min_prediction_agreement=0.95, golden_set=DataRef(uri="file:///golden.npz"))
    measured = judge(None, None, spec, agreement=0.8)
    assert measured.verdict is Verdict.FAIL and "prediction agreement 80.00% < 95.00%" in measured.message
    assert judge(None, None, spec, agreement=0.99).verdict is Verdict.INCONCLUSIVE
