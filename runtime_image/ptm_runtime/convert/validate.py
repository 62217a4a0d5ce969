"""The validation gate: every candidate against the fp32 source model, failing closed.

Metrics per candidate over all validation samples: max/mean absolute error, per-sample
cosine similarity (min and mean, the minimum over outputs for multi-output models) and,
where an output is a [batch, classes] score tensor, top-1 agreement. A candidate passes
when it meets every configured threshold and its accuracy drop is within maxAccuracyDrop,
the drop being 1 - top-1 agreement for classifiers and 1 - mean cosine otherwise. Anything
non-finite fails. The caller picks the first passing candidate in preference order.

Latency is the median of a few timed runs after warm-up, at batch 1 and batch 8, on the best
execution provider this machine has (CUDA when present, else CPU; TensorRT is left out
because building its engines takes minutes).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptm_runtime.convert import samples
from ptm_runtime.options import ValidationOptions
from ptm_runtime.report import Metrics

LATENCY_RUNS = 15
LATENCY_BUDGET_S = 1.0


def provider() -> str:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"


def session(path: Path, ep: str | None = None) -> Any:
    import onnxruntime as ort

    ep = ep or provider()
    providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), providers=providers)


#: ONNX Runtime input types -> numpy, for candidates whose inputs changed type (fp16 IO).
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def feeds(sess: Any, batch: samples.Batch) -> dict[str, np.ndarray]:
    """The batch as the session wants it: its input names, its element types."""
    out = {}
    for i in sess.get_inputs():
        arr = batch[i.name]
        want = _ORT_TYPES.get(i.type)
        out[i.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
    return out


def run(sess: Any, batches: Sequence[samples.Batch]) -> list[list[np.ndarray]]:
    return [list(sess.run(None, feeds(sess, b))) for b in batches]


def logits_output(reference: list[np.ndarray]) -> int | None:
    """Index of the first output shaped [batch, classes>=2] with float scores."""
    for i, out in enumerate(reference):
        if out.ndim == 2 and out.shape[1] >= 2 and np.issubdtype(out.dtype, np.floating):
            return i
    return None


def compare(refs: list[list[np.ndarray]], outs: list[list[np.ndarray]], logits: int | None) -> Metrics:
    """Agreement of candidate outputs with reference outputs, batch by batch."""
    max_abs = 0.0
    abs_sum = 0.0
    count = 0
    cosines: list[np.ndarray] = []
    agree = total = 0
    for ref_batch, out_batch in zip(refs, outs, strict=True):
        if len(ref_batch) != len(out_batch):
            raise ValueError(f"candidate has {len(out_batch)} outputs, the reference {len(ref_batch)}")
        per_sample: np.ndarray | None = None
        for r, o in zip(ref_batch, out_batch, strict=True):
            if r.shape != o.shape:
                raise ValueError(f"output shape {o.shape} differs from the reference {r.shape}")
            r64 = (
                r.astype(np.float64).reshape(r.shape[0], -1) if r.ndim else r.astype(np.float64).reshape(1, 1)
            )
            o64 = o.astype(np.float64).reshape(r64.shape)
            diff = np.abs(r64 - o64)
            if diff.size:
                max_abs = max(max_abs, float(diff.max()))
                abs_sum += float(diff.sum())
                count += diff.size
            cos = _cosine(r64, o64)
            per_sample = cos if per_sample is None else np.minimum(per_sample, cos)
        if per_sample is not None:
            cosines.append(per_sample)
        if logits is not None:
            r_top = np.argmax(ref_batch[logits], axis=-1)
            o_top = np.argmax(out_batch[logits], axis=-1)
            agree += int((r_top == o_top).sum())
            total += int(r_top.size)
    all_cos = np.concatenate(cosines) if cosines else np.array([1.0])
    return Metrics(
        max_abs_error=max_abs,
        mean_abs_error=abs_sum / count if count else 0.0,
        cosine_similarity=float(all_cos.min()),
        mean_cosine_similarity=float(all_cos.mean()),
        top1_agreement=agree / total if total else None,
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; identical rows (zeros included) agree exactly (1.0), one zero row
    against a non-zero one does not (0.0)."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    cos = np.where((a == b).all(axis=1), 1.0, cos)
    cos = np.where((na == 0) ^ (nb == 0), 0.0, cos)
    return np.clip(cos, -1.0, 1.0)


def finite(metrics: Metrics) -> bool:
    values = [
        metrics.max_abs_error,
        metrics.mean_abs_error,
        metrics.cosine_similarity,
        metrics.mean_cosine_similarity,
    ]
    return all(v is None or math.isfinite(v) for v in values)


def judge(metrics: Metrics, options: ValidationOptions, classifier: bool) -> tuple[bool, str, float | None]:
    """(passed, why not, accuracy drop) for one candidate."""
    if not finite(metrics):
        return False, "outputs are not finite (NaN or Inf)", None
    reasons = []
    if options.max_abs_error is not None and (metrics.max_abs_error or 0.0) > options.max_abs_error:
        reasons.append(f"max abs error {metrics.max_abs_error:.4g} > maxAbsError {options.max_abs_error:g}")
    if metrics.cosine_similarity is not None and metrics.cosine_similarity < options.min_cosine_similarity:
        reasons.append(
            f"min cosine {metrics.cosine_similarity:.6f} < minCosineSimilarity {options.min_cosine_similarity:g}"
        )
    if options.min_top1_agreement is not None:
        if metrics.top1_agreement is None:
            reasons.append(
                "top-1 agreement unavailable (no [batch, classes] output) but minTop1Agreement is set"
            )
        elif metrics.top1_agreement < options.min_top1_agreement:
            reasons.append(
                f"top-1 agreement {metrics.top1_agreement:.4f} < minTop1Agreement {options.min_top1_agreement:g}"
            )
    if classifier and metrics.top1_agreement is not None:
        drop = 1.0 - metrics.top1_agreement
        measure = "top-1"
    else:
        drop = 1.0 - (metrics.mean_cosine_similarity if metrics.mean_cosine_similarity is not None else 1.0)
        measure = "mean cosine"
    drop = max(drop, 0.0)
    if drop > options.max_accuracy_drop + 1e-12:
        reasons.append(
            f"accuracy drop {drop:.4g} ({measure}) > maxAccuracyDrop {options.max_accuracy_drop:g}"
        )
    return not reasons, "; ".join(reasons), drop


@dataclass
class Latency:
    batch1_ms: float
    batch8_ms: float | None


def latency(sess: Any, batch: samples.Batch, dynamic_batch: bool) -> Latency:
    """Median latency at batch 1 and (when the batch axis is dynamic) batch 8."""

    def median_ms(size: int) -> float:
        inputs = feeds(sess, samples.tile(samples.rows(batch, 0, 1), size))
        sess.run(None, inputs)  # warm-up: first runs allocate and pick kernels
        if size == 1:
            sess.run(None, inputs)
        times: list[float] = []
        deadline = time.perf_counter() + LATENCY_BUDGET_S
        while len(times) < LATENCY_RUNS and (len(times) < 3 or time.perf_counter() < deadline):
            start = time.perf_counter()
            sess.run(None, inputs)
            times.append((time.perf_counter() - start) * 1000.0)
        return round(statistics.median(times), 4)

    return Latency(median_ms(1), median_ms(8) if dynamic_batch else None)
