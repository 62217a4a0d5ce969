"""The dynamic batcher with a real ONNX Runtime model: merge, split, back-pressure, deadlines, drain."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ptm_runtime.options import RuntimeOptions
from ptm_runtime.serve.batching import Batcher, batch_sizes_to_try, choose_execution, tuning_cells
from ptm_runtime.serve.errors import DeadlineExceeded, QueueFull, Unavailable
from ptm_runtime.serve.metrics import ServeMetrics
from ptm_runtime.serve.model import OnnxModel
from tests.runtime import models


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    return OnnxModel.load(models.linear(tmp_path_factory.mktemp("m") / "linear.onnx"), RuntimeOptions())


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    options = RuntimeOptions.model_validate({"intraOpThreads": 1})
    return OnnxModel.load(models.slow(tmp_path_factory.mktemp("m") / "slow.onnx", depth=6), options)


def _feeds(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, 4)).astype(np.float32), "k": rng.integers(-50, 50, (rows, 2))}


def test_concurrent_mixed_sizes_are_merged_and_split_exactly(linear: OnnxModel) -> None:
    metrics = ServeMetrics(CollectorRegistry(), "m")

    async def main() -> list[tuple[dict[str, np.ndarray], int]]:
        batcher = Batcher(
            linear.infer,
            max_batch_size=16,
            max_queue_delay_ms=50,
            max_queue_size=64,
            batching=True,
            metrics=metrics,
        )
        batcher.start()
        sizes = [1, 3, 2, 5, 1, 4]
        results = await asyncio.gather(
            *(batcher.submit(_feeds(n, i), n, ("same",), timeout=10) for i, n in enumerate(sizes))
        )
        assert await batcher.close(5)
        return [(r.outputs, r.batch_rows) for r in results]

    results = asyncio.run(main())
    for i, (n, (outputs, batch_rows)) in enumerate(zip([1, 3, 2, 5, 1, 4], results, strict=True)):
        want = models.linear_reference(**_feeds(n, i))
        assert outputs["y"].shape == (n, 3) and outputs["s"].shape == (n, 1)
        np.testing.assert_allclose(outputs["y"], want["y"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(outputs["s"], want["s"])
        assert batch_rows == 16  # all six (16 rows) ran as one batch
    reg = metrics.registry
    assert reg.get_sample_value("ptm_batch_size_count", {"model": "m"}) == 1
    assert reg.get_sample_value("ptm_batch_requests_sum", {"model": "m"}) == 6


def test_batches_respect_max_rows_and_signature(tmp_path: Path) -> None:
    model = OnnxModel.load(models.ragged(tmp_path / "ragged.onnx"), RuntimeOptions())

    async def main() -> list[int]:
        batcher = Batcher(
            model.infer, max_batch_size=4, max_queue_delay_ms=30, max_queue_size=64, batching=True
        )
        batcher.start()
        jobs = []
        for i in range(6):
            n = 3 if i % 2 else 5  # two signatures: width 3 and width 5 cannot share a batch
            x = np.full((2, n), float(i), np.float32)
            jobs.append(batcher.submit({"x": x}, 2, (n,), timeout=10))
        results = await asyncio.gather(*jobs)
        for i, r in enumerate(results):
            n = 3 if i % 2 else 5
            np.testing.assert_array_equal(r.outputs["y"], np.full((2, 1), i * n, np.float32))
        await batcher.close(5)
        return [r.batch_rows for r in results]

    rows = asyncio.run(main())
    assert max(rows) == 4  # 2 + 2 rows of one signature, never a third request of 2 rows


def test_full_queue_refuses_at_once_and_drain_finishes_queued_work(slow: OnnxModel) -> None:
    async def main() -> None:
        batcher = Batcher(
            slow.infer, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2, batching=False
        )
        batcher.start()
        x = {"x": np.ones((1, 4), np.float32)}
        first = asyncio.ensure_future(batcher.submit(x, 1, (), timeout=30))
        await asyncio.sleep(0)  # the batcher takes it: it computes, the queue is empty again
        while batcher.depth:
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(batcher.submit(x, 1, (), timeout=30)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.submit(x, 1, (), timeout=30)
        assert await batcher.close(30)  # drain: the computing and both queued requests finish
        for job in [first, *queued]:
            np.testing.assert_array_equal((await job).outputs["y"], np.ones((1, 4), np.float32))
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.submit(x, 1, (), timeout=30)

    asyncio.run(main())


def test_deadline_expires_in_the_queue(slow: OnnxModel) -> None:
    async def main() -> None:
        batcher = Batcher(
            slow.infer, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=8, batching=False
        )
        batcher.start()
        x = {"x": np.ones((1, 4), np.float32)}
        busy = asyncio.ensure_future(batcher.submit(x, 1, (), timeout=30))
        await asyncio.sleep(0)
        with pytest.raises(DeadlineExceeded, match="deadline of 1 ms"):
            await batcher.submit(x, 1, (), timeout=0.001)
        assert batcher.depth == 0  # the expired request left the queue
        await busy
        await batcher.close(5)

    asyncio.run(main())


def test_concurrent_runs_compute_two_batches_at_once(linear: OnnxModel) -> None:
    """Each run waits for the other at a barrier: with one run at a time the barrier breaks."""
    both = threading.Barrier(2, timeout=10)

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        both.wait()
        return linear.infer(feeds)

    async def main() -> None:
        batcher = Batcher(
            run,
            max_batch_size=1,
            max_queue_delay_ms=0,
            max_queue_size=8,
            batching=False,
            concurrent_runs=2,
        )
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(_feeds(1, i), 1, (), timeout=30) for i in range(2)))
        assert [r.batch_rows for r in results] == [1, 1]
        assert await batcher.close(5)

    asyncio.run(main())


def test_batches_close_at_the_preferred_size(linear: OnnxModel) -> None:
    async def main() -> list[int]:
        batcher = Batcher(
            linear.infer,
            max_batch_size=16,
            preferred_batch_size=3,
            max_queue_delay_ms=50,
            max_queue_size=64,
            batching=True,
        )
        batcher.start()
        sizes = [1, 1, 2, 1, 5, 1]
        results = await asyncio.gather(
            *(batcher.submit(_feeds(n, i), n, ("same",), timeout=10) for i, n in enumerate(sizes))
        )
        for i, (n, r) in enumerate(zip(sizes, results, strict=True)):
            np.testing.assert_allclose(
                r.outputs["y"], models.linear_reference(**_feeds(n, i))["y"], rtol=1e-6
            )
        assert await batcher.close(5)
        return [r.batch_rows for r in results]

    rows = asyncio.run(main())
    # Batches close at 3 rows: [1, 1, 1] (the 2-row request did not fit), then [2, 1]; the
    # 5-row request (more than 3, within maxBatchSize) runs alone.
    assert rows == [3, 3, 3, 3, 5, 3]


def test_a_forming_batch_waits_only_while_requests_are_arriving(linear: OnnxModel) -> None:
    """The queue delay is 10 s here: every wait below that ends sooner is the arriving count's."""
    arriving = [0]

    async def main() -> None:
        batcher = Batcher(
            linear.infer,
            max_batch_size=16,
            max_queue_delay_ms=10_000,
            max_queue_size=64,
            batching=True,
            arriving=lambda: arriving[0],
        )
        batcher.start()

        def submit(rows: int, seed: int) -> asyncio.Future[Any]:
            return asyncio.ensure_future(batcher.submit(_feeds(rows, seed), rows, ("same",), timeout=30))

        async def forming() -> None:  # the batcher took the request and waits for company
            await asyncio.sleep(0)  # the submit runs: the request is queued
            while batcher.depth:
                await asyncio.sleep(0.001)

        # Nothing else arriving: a lone request runs at once instead of waiting out the delay.
        lone = await asyncio.wait_for(submit(1, 0), 5)
        assert lone.batch_rows == 1
        # One more on its way: the batch waits for it, and closes when it is queued.
        arriving[0] = 1
        first = submit(2, 1)
        await forming()
        await asyncio.sleep(0.05)
        assert not first.done()  # still waiting for the arriving request
        arriving[0] = 0
        second = submit(3, 2)
        results = await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert [r.batch_rows for r in results] == [5, 5]
        np.testing.assert_allclose(
            results[1].outputs["y"], models.linear_reference(**_feeds(3, 2))["y"], rtol=1e-6
        )
        # The arriving request fails before it is queued: the server wakes the batcher.
        arriving[0] = 1
        waiting = submit(1, 3)
        await forming()
        arriving[0] = 0
        batcher.wake()
        assert (await asyncio.wait_for(waiting, 5)).batch_rows == 1
        assert await batcher.close(5)

    asyncio.run(main())


def test_batch_sizes_to_try_doubles_up_to_the_maximum() -> None:
    assert batch_sizes_to_try(1) == [1]
    assert batch_sizes_to_try(8) == [1, 2, 4, 8]
    assert batch_sizes_to_try(12) == [1, 2, 4, 8, 12]


def test_tuning_cells_measure_only_what_the_options_leave_unset() -> None:
    def opts(**batching: int) -> RuntimeOptions:
        runs = batching.pop("runs", None)
        wire: dict[str, object] = {"batching": {k: v for k, v in batching.items()}}
        if runs is not None:
            wire["concurrentRuns"] = runs
        return RuntimeOptions.model_validate(wire)

    assert tuning_cells(opts(maxBatchSize=4), dynamic_batch=True) == [
        (1, 1),
        (2, 1),
        (1, 2),
        (2, 2),
        (1, 4),
        (2, 4),
    ]
    assert tuning_cells(opts(maxBatchSize=4, runs=1), dynamic_batch=True) == [(1, 1), (1, 2), (1, 4)]
    assert tuning_cells(opts(maxBatchSize=4, preferredBatchSize=2), dynamic_batch=True) == [(1, 2), (2, 2)]
    assert tuning_cells(opts(maxBatchSize=4, preferredBatchSize=2, runs=2), dynamic_batch=True) == [(2, 2)]
    assert tuning_cells(opts(maxBatchSize=8), dynamic_batch=False) == [(1, 1), (2, 1)]
    assert tuning_cells(opts(maxBatchSize=1, runs=3), dynamic_batch=True) == [(3, 1)]


# Measured on 2 CPU cores (ONNX Runtime 1.32, sequence 128 for MiniLM; rows/s).
MINILM_INT8 = {
    (1, 1): 164.8,
    (2, 1): 228.4,
    (1, 2): 196.0,
    (2, 2): 240.0,
    (1, 4): 208.0,
    (2, 4): 236.8,
    (1, 8): 201.6,
    (2, 8): 220.8,
}
RESNET18 = {
    (1, 1): 118.4,
    (2, 1): 121.6,
    (1, 2): 124.8,
    (2, 2): 124.0,
    (1, 4): 128.0,
    (2, 4): 115.2,
    (1, 8): 134.4,
    (2, 8): 112.0,
}


@pytest.mark.parametrize(
    ("rates", "chosen"),
    [
        (MINILM_INT8, (2, 2)),  # two runs of 2 rows side by side
        (RESNET18, (1, 8)),  # one run of the largest batch
        ({(1, 1): 100.0, (1, 2): 150.0, (1, 4): 300.0}, (1, 4)),  # a tiny model: bigger is better
        ({(1, 1): 100.0, (2, 1): 101.0, (1, 2): 99.0}, (1, 1)),  # nothing gains: fewest runs, smallest batch
        ({(1, 1): 50.0}, (1, 1)),
    ],
)
def test_choose_execution_takes_the_fewest_runs_and_smallest_batch_near_the_best(
    rates: dict[tuple[int, int], float], chosen: tuple[int, int]
) -> None:
    assert choose_execution(rates) == chosen


def test_choose_execution_needs_a_measurement() -> None:
    with pytest.raises(ValueError, match="no \\(runs, batch size\\) cell"):
        choose_execution({})


def test_measure_throughput_gives_rows_per_second_for_each_cell(linear: OnnxModel) -> None:
    rates = linear.measure_throughput([(1, 1), (2, 1), (1, 4)], seconds_per_cell=0.1)
    assert sorted(rates) == [(1, 1), (1, 4), (2, 1)]
    assert all(rate > 0 for rate in rates.values())


def test_each_cell_keeps_its_best_pass_and_the_second_pass_runs_backwards(
    linear: OnnxModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[tuple[int, int]] = []
    slow_once = {(1, 4)}  # one slow run sinks a cell's first pass

    def runs_per_second(call: Any, threads: int, seconds: float) -> float:
        size = len(next(iter(call.args[0].values())))
        measured.append((threads, size))
        if (threads, size) in slow_once:
            slow_once.discard((threads, size))
            return 1.0
        return 10.0

    monkeypatch.setattr("ptm_runtime.serve.model._runs_per_second", runs_per_second)
    cells = [(1, 1), (2, 1), (1, 4)]
    rates = linear.measure_throughput(cells, seconds_per_cell=0.01)
    assert measured == [*cells, *reversed(cells)]
    assert rates == {(1, 1): 10.0, (2, 1): 10.0, (1, 4): 40.0}  # rows/s: size x runs/s
    measured.clear()
    assert linear.measure_throughput(cells, seconds_per_cell=0.01, passes=1)[(1, 4)] == 40.0
    assert measured == cells


def test_a_lone_batch_runs_on_every_thread_and_batches_side_by_side_on_one_each(linear: OnnxModel) -> None:
    beside = linear.single_threaded()
    assert beside is not None and beside.options.intra_op_threads == 1
    calls: list[str] = []

    def wide(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append("wide")
        return linear.infer(feeds)

    def narrow(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append("narrow")
        return beside.infer(feeds)

    async def main() -> None:
        batcher = Batcher(
            wide,
            run_beside=narrow,
            max_batch_size=4,
            preferred_batch_size=1,
            max_queue_delay_ms=0,
            max_queue_size=64,
            batching=True,
            concurrent_runs=2,
        )
        batcher.start()
        alone = await batcher.submit(_feeds(1, 0), 1, ("same",), timeout=10)
        assert calls == ["wide"]
        together = await asyncio.gather(
            *(batcher.submit(_feeds(1, i), 1, ("same",), timeout=10) for i in range(1, 7))
        )
        assert await batcher.close(5)
        for i, r in enumerate([alone, *together]):  # both sessions give the same answers
            np.testing.assert_allclose(
                r.outputs["y"], models.linear_reference(**_feeds(1, i))["y"], rtol=1e-6
            )

    asyncio.run(main())
    assert calls.count("narrow") >= 1, calls


def test_no_second_session_when_one_thread_is_all_a_run_has(tmp_path: Path) -> None:
    options = RuntimeOptions.model_validate({"intraOpThreads": 1})
    model = OnnxModel.load(models.linear(tmp_path / "linear.onnx"), options)
    assert model.single_threaded() is None
