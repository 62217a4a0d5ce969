"""Canary analysis: turn the runtime's Prometheus metrics into a pass / fail / inconclusive verdict.

Pure. The numbers come from the runtime's own collectors (ptm_runtime.serve.metrics): the
request counter `ptm_requests_total{code}` and the latency histogram
`ptm_request_duration_seconds_bucket{le}`, summed over a revision's pods — scraped from the pods
directly, or read from Prometheus when PTM_PROMETHEUS_URL is set (kube.py fetches them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ptm_operator.api import AnalysisSpec

REQUESTS = "ptm_requests_total"
LATENCY_BUCKET = "ptm_request_duration_seconds_bucket"
#: gRPC status names the runtime records that mean the server failed (not the client).
_GRPC_SERVER_ERRORS = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED"})
_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Sample:
    """Cumulative request counts and latency buckets of one revision."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    """Upper bound (seconds) -> cumulative count, summed over pods and protocols."""
    pods: int = 0
    """Pods that answered."""

    def add(self, other: Sample) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for le, count in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + count
        self.pods += other.pods

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (seconds), or None without data."""
        if not self.buckets:
            return None
        ordered = sorted(self.buckets.items())
        total = ordered[-1][1]
        if total <= 0:
            return None
        rank = q * total
        for le, count in ordered:
            if count >= rank:
                return le if math.isfinite(le) else ordered[-2][0] if len(ordered) > 1 else None
        return None


def is_server_error(code: str) -> bool:
    return (code.isdigit() and int(code) >= 500) or code.upper() in _GRPC_SERVER_ERRORS


def parse_metrics(text: str, model: str | None = None) -> Sample:
    """A Sample from one /metrics page (Prometheus text format), for `model` when given."""
    sample = Sample(pods=1)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        match = _LINE.match(line)
        if match is None or match["name"] not in (REQUESTS, LATENCY_BUCKET):
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        if model is not None and labels.get("model", model) != model:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if match["name"] == REQUESTS:
            sample.requests += value
            if is_server_error(labels.get("code", "")):
                sample.errors += value
        else:
            le = float(labels.get("le", "inf").replace("+Inf", "inf"))
            sample.buckets[le] = sample.buckets.get(le, 0.0) + value
    return sample


def agreement(canary: Any, stable: Any, min_cosine: float) -> float:
    """Share of samples on which two revisions predict the same.

    Classifier-shaped outputs ([samples, classes], rows not unit-norm) agree when their arg-max
    agrees; anything else (embeddings, token outputs) agrees when the per-sample cosine
    similarity is at least `min_cosine` (the validation gate's threshold).
    """
    import numpy as np

    a = np.asarray(canary, dtype=np.float64)
    b = np.asarray(stable, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        return 0.0
    rows_a, rows_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    unit_rows = bool(np.allclose(np.linalg.norm(rows_a, axis=1), 1.0, atol=1e-3))
    if a.ndim == 2 and a.shape[1] > 1 and not unit_rows:
        return float(np.mean(rows_a.argmax(axis=1) == rows_b.argmax(axis=1)))
    norms = np.linalg.norm(rows_a, axis=1) * np.linalg.norm(rows_b, axis=1)
    cosine = np.where(norms > 0, (rows_a * rows_b).sum(axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
    return float(np.mean(cosine >= min_cosine))


class Verdict(StrEnum):
    PASS = "Pass"
    FAIL = "Fail"
    INCONCLUSIVE = "Inconclusive"


@dataclass(frozen=True)
class Measurement:
    verdict: Verdict
    message: str


def judge(
    canary: Sample | None, stable: Sample | None, spec: AnalysisSpec, agreement: float | None = None
) -> Measurement:
    """Compare the canary with its thresholds and with the stable revision.

    `agreement` is the golden-set prediction agreement when it could be measured; it is judged
    even when too few requests reached the canary (it needs none).
    """
    if (
        spec.min_prediction_agreement is not None
        and agreement is not None
        and agreement < spec.min_prediction_agreement
    ):
        return Measurement(
            Verdict.FAIL,
            f"prediction agreement {agreement:.2%} < {spec.min_prediction_agreement:.2%} on the golden set",
        )
    if canary is None or canary.pods == 0:
        return Measurement(Verdict.INCONCLUSIVE, "no canary metrics could be read")
    if canary.requests < spec.min_requests:
        return Measurement(
            Verdict.INCONCLUSIVE, f"{canary.requests:.0f} canary requests < minRequests {spec.min_requests}"
        )
    failures = []
    facts = [f"error rate {canary.error_rate:.2%}"]
    if canary.error_rate > spec.max_error_rate:
        failures.append(f"error rate {canary.error_rate:.2%} > {spec.max_error_rate:.2%}")
    p99 = canary.quantile(0.99)
    if p99 is not None:
        facts.append(f"p99 {p99 * 1000:.0f} ms")
        if spec.max_p99_latency_ms is not None and p99 * 1000 > spec.max_p99_latency_ms:
            failures.append(f"p99 {p99 * 1000:.0f} ms > {spec.max_p99_latency_ms:.0f} ms")
        stable_p99 = stable.quantile(0.99) if stable is not None else None
        if (
            spec.max_p99_latency_ratio is not None
            and stable_p99
            and p99 > stable_p99 * spec.max_p99_latency_ratio
        ):
            failures.append(
                f"p99 {p99 * 1000:.0f} ms > {spec.max_p99_latency_ratio:g} x stable {stable_p99 * 1000:.0f} ms"
            )
    if agreement is not None:
        facts.append(f"prediction agreement {agreement:.2%}")
    if failures:
        return Measurement(Verdict.FAIL, "; ".join(failures))
    return Measurement(Verdict.PASS, ", ".join(facts))
