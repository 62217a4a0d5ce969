"""Prediction agreement on a golden set: the same inputs to the canary and the stable revision.

This module does I/O (it reads the golden set and calls both revisions' pods over the Open
Inference Protocol); the comparison itself is `analysis.agreement`, which is pure.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ptm_operator.analysis import agreement

log = logging.getLogger(__name__)

#: V2 datatypes for the numpy kinds a golden set holds.
_DATATYPES = {
    np.dtype("float32"): "FP32",
    np.dtype("float16"): "FP16",
    np.dtype("float64"): "FP64",
    np.dtype("int64"): "INT64",
    np.dtype("int32"): "INT32",
    np.dtype("int8"): "INT8",
    np.dtype("uint8"): "UINT8",
    np.dtype("bool"): "BOOL",
}


def load_golden_set(uri: str, timeout: float = 30.0) -> dict[str, np.ndarray]:
    """Arrays by input name from a .npz at file:///PATH or http(s)://URL (first axis: samples)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        data = open(parsed.path, "rb").read()  # noqa: SIM115 - read at once
    elif parsed.scheme in ("http", "https"):
        with urllib.request.urlopen(uri, timeout=timeout) as resp:
            data = resp.read()
    else:
        raise ValueError(f"the operator reads golden sets from file:// or http(s):// only, not {uri}")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def infer(base_url: str, model: str, inputs: dict[str, np.ndarray], timeout: float = 10.0) -> np.ndarray:
    """The first output of one V2 JSON inference."""
    body = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": _DATATYPES[array.dtype],
                "data": array.ravel().tolist(),
            }
            for name, array in inputs.items()
        ]
    }
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    out = answer["outputs"][0]
    return np.asarray(out["data"], dtype=np.float64).reshape(out["shape"])


def measure_agreement(
    canary_url: str,
    stable_url: str,
    model: str,
    golden: dict[str, np.ndarray],
    min_cosine: float,
    max_samples: int = 32,
    chunk: int = 8,
) -> float | None:
    """Share of golden samples on which both revisions agree; None if either cannot answer."""
    total = min(max_samples, min(len(a) for a in golden.values()))
    canary_out, stable_out = [], []
    try:
        for start in range(0, total, chunk):
            rows = {name: array[start : min(start + chunk, total)] for name, array in golden.items()}
            canary_out.append(infer(canary_url, model, rows))
            stable_out.append(infer(stable_url, model, rows))
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        log.info("golden-set comparison not possible: %s", exc)
        return None
    if not canary_out:
        return None
    return agreement(np.concatenate(canary_out), np.concatenate(stable_out), min_cosine)
