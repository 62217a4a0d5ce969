"""End to end on the local cluster's real node: real conversion pods, real serving pods, a canary
with analysis, an automatic rollback, and a client that never sees a failed request.

The steps are devcluster.story's, the same `make demo` shows; this test asserts on them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ptm_operator.devcluster.story import SENTENCES, Story, pytorch_reference
from tests.conftest import Cluster, wait_for


@pytest.fixture
def story(cluster: Cluster, crd_installed: str, tmp_path: Path) -> Iterator[Story]:
    dev = cluster._dev
    built = dev.up_real_node(images=("convert", "serve"))  # cached by content: a no-op when built
    s = Story(dev, f"e2e-{uuid.uuid4().hex[:6]}", {b.target: b.name for b in built}, tmp_path)
    s.prepare()
    s.start_operator()
    yield s
    s.cleanup()  # deletes the model while the operator runs (its finalizer), then stops it


@pytest.mark.timeout(2400)
def test_convert_serve_canary_and_rollback_on_the_real_node(story: Story) -> None:
    body = story.manifest()
    story.apply(body)

    # A real conversion pod converts the real model to int8 and validates it; real pods serve it.
    first = story.wait_serving(None, timeout=900)
    record = story.record(first)
    assert record["precision"] == "int8-dynamic", record
    assert record["metrics"]["cosineSimilarity"] >= 0.98  # the gate measured it in the conversion pod
    (served,) = wait_for(lambda: _try(story.ask), 120, "an answer through the Service")
    cosine = np.sum(served * pytorch_reference(SENTENCES), axis=1)
    assert cosine.min() >= 0.99, cosine
    assert served[0] @ served[1] > served[0] @ served[2]  # guitar sentences closer than markets

    client = story.client()
    client.start()
    try:
        # fp32: a new revision, converted, then a canary with analysis, then promoted.
        body["spec"]["optimization"]["precision"] = ["fp32"]
        story.apply(body)
        second = story.wait_serving(first, timeout=900)
        assert story.record(second)["precision"] == "fp32"
        assert story.record(first)["state"] == "Superseded"
        # The int8 pods leave after the scale-down delay; from then on fp32 answers, exactly.
        wait_for(lambda: story.revision_gone(first), 120, f"revision {first}'s pods to go")
        reference = pytorch_reference(SENTENCES)
        wait_for(lambda: np.sum(story.ask() * reference, axis=1).min() >= 0.999, 60, "fp32 answers only")
        for _ in range(5):
            assert np.sum(story.ask() * reference, axis=1).min() >= 0.999

        # A revision the server cannot load: its pods crash-loop and the canary is rolled back.
        broken_body, broken = story.break_next_revision(body, second)
        story.apply(broken_body)
        degraded = story.wait(
            "the broken canary to be rolled back",
            lambda: (c := story.condition("Degraded")).get("reason") == "RolledBack" and c,
            600,
        )
        st = story.status()
        assert st["stableRevision"] == second and not st.get("canaryRevision")
        assert story.record(broken)["state"] == "RolledBack"
        assert "CrashLoopBackOff" in degraded["message"] or "crash" in degraded["message"].lower()
    finally:
        client.stop()
    assert client.ok > 50, (client.ok, client.failed)
    assert client.failed == 0, client.errors[:10]


def _try(ask: Callable[[], np.ndarray]) -> tuple[np.ndarray] | None:
    """(answer,) once the Service answers (kube-proxy may lag the endpoints by a moment)."""
    try:
        return (ask(),)
    except OSError:
        return None
