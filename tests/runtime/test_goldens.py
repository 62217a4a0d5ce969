"""Golden-set prediction agreement against real `ptm serve` processes (what canary analysis uses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ptm_operator.analysis import agreement
from ptm_operator.goldens import load_golden_set, measure_agreement
from tests.runtime import models
from tests.runtime.conftest import ServeFactory


def swapped_classes(source: Path, target: Path) -> Path:
    """The linear model with its last two output columns swapped: a 'canary' that disagrees."""
    model = onnx.load(str(source))
    for i, init in enumerate(model.graph.initializer):
        if init.name in ("W", "B"):
            value = numpy_helper.to_array(init).copy()
            value[..., [1, 2]] = value[..., [2, 1]]
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(model, str(target))
    return target


def golden_file(path: Path, samples: int = 20) -> Path:
    rng = np.random.default_rng(7)
    np.savez(
        path, x=rng.normal(size=(samples, 4)).astype(np.float32), k=rng.integers(0, 9, size=(samples, 2))
    )
    return path


def test_identical_revisions_agree_and_a_changed_one_does_not(
    tmp_path: Path, serve_factory: ServeFactory
) -> None:
    stable_model = models.linear(tmp_path / "stable.onnx")
    canary_model = swapped_classes(stable_model, tmp_path / "canary.onnx")
    stable = serve_factory(stable_model, "--model-name", "m")
    same = serve_factory(stable_model, "--model-name", "m")
    changed = serve_factory(canary_model, "--model-name", "m")
    golden = load_golden_set(f"file://{golden_file(tmp_path / 'golden.npz')}")
    assert set(golden) == {"x", "k"}

    assert measure_agreement(same.url, stable.url, "m", golden, min_cosine=0.99) == 1.0
    disagreeing = measure_agreement(changed.url, stable.url, "m", golden, min_cosine=0.99)
    assert disagreeing is not None and disagreeing < 0.9
    # The same number computed from outputs directly.
    x = golden["x"]
    expected = agreement(x @ models.W[:, [0, 2, 1]] + models.B[[0, 2, 1]], x @ models.W + models.B, 0.99)
    assert abs(disagreeing - expected) < 1e-9


def test_unreachable_revision_gives_no_measurement(tmp_path: Path, serve_factory: ServeFactory) -> None:
    stable = serve_factory(models.linear(tmp_path / "m.onnx"), "--model-name", "m")
    golden = load_golden_set(f"file://{golden_file(tmp_path / 'golden.npz')}")
    assert measure_agreement("http://127.0.0.1:9", stable.url, "m", golden, min_cosine=0.99) is None
