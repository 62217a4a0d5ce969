"""Dynamic batching: queued requests run together, each gets back exactly its rows.

One asyncio task forms batches; up to `concurrent_runs` worker threads run them (ONNX Runtime
sessions are thread-safe and release the GIL, so the event loop keeps decoding and queueing while
batches compute). A batch forms when a worker is free: whatever queued meanwhile joins it. The
first request of a batch waits at most `maxQueueDelayMs` for others (Triton's semantics), and
the batch closes earlier when `preferredBatchSize` rows are reached (the batch size the model
runs fastest at per row, measured at load by `choose_execution`; `maxBatchSize` is the most rows
one request may carry) or when no other request is on its way: the server says how many
requests it is still reading or decoding (`arriving`), and when none is, waiting could only add
latency (a lone client would pay the whole delay on every request). Requests are merged only
when their non-batch dimensions agree (same signature key); others wait their turn in order.

Memory stays bounded: at most `maxQueueSize` requests wait; the next one is refused at once
(QueueFull → 429 / RESOURCE_EXHAUSTED) rather than queued. Every request carries a deadline; one
that expires while queued is dropped from the queue and answered 504 / DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ptm_runtime.options import RuntimeOptions
from ptm_runtime.serve.errors import DeadlineExceeded, InternalError, QueueFull, ServeError, Unavailable
from ptm_runtime.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class BatchResult:
    """One request's outputs and how it was served."""

    outputs: dict[str, np.ndarray]
    queue_seconds: float
    compute_seconds: float
    batch_rows: int


@dataclass(eq=False)
class _Pending:
    feeds: Mapping[str, np.ndarray]
    rows: int
    key: Hashable
    deadline: float
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """Queue + batch former + single model worker.

    `batching=False` (a model without a dynamic batch axis, or maxBatchSize 1) keeps the queue,
    back-pressure and deadlines but runs each request alone.
    """

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        batching: bool,
        concurrent_runs: int = 1,
        preferred_batch_size: int | None = None,
        run_beside: RunFn | None = None,
        arriving: Callable[[], int] | None = None,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self._run = run
        self._arriving = arriving
        self._run_beside = run_beside or run
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.batching = batching and max_batch_size > 1
        self.preferred_batch_size = (
            min(preferred_batch_size or max_batch_size, max_batch_size) if self.batching else 1
        )
        self._metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self.concurrent_runs = concurrent_runs
        self._executor = ThreadPoolExecutor(max_workers=concurrent_runs, thread_name_prefix="ptm-model")
        self._slots = asyncio.Semaphore(concurrent_runs)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._batches: dict[asyncio.Task[None], list[_Pending]] = {}

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch computing."""
        return not self._queue and not self._running

    def wake(self) -> None:
        """A request the server was reading or decoding will not be queued (it failed): a
        forming batch stops waiting for it."""
        self._arrived.set()

    def _more_coming(self) -> bool:
        return self._arriving is None or self._arriving() > 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ptm-batcher")

    async def submit(
        self, feeds: Mapping[str, np.ndarray], rows: int, key: Hashable, timeout: float
    ) -> BatchResult:
        """Queue one request and wait for its rows; raises QueueFull, DeadlineExceeded, Unavailable."""
        if self._closed:
            raise Unavailable("the server is shutting down and takes no new requests")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(
                f"the request queue is full ({self.max_queue_size} requests waiting); retry later"
            )
        loop = asyncio.get_running_loop()
        item = _Pending(feeds, rows, key, time.monotonic() + timeout, loop.create_future())
        self._queue.append(item)
        self._set_depth()
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout)
        except TimeoutError:
            self._drop(item)
            raise DeadlineExceeded(
                f"no answer within the request deadline of {timeout * 1000:.0f} ms"
            ) from None
        except asyncio.CancelledError:
            # The client went away: free its queue slot; a batch already computing ignores it.
            self._drop(item)
            raise

    def _drop(self, item: _Pending) -> None:
        if not item.future.done():
            item.future.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(item)
            self._set_depth()

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.set_queue_depth(len(self._queue))

    async def close(self, timeout: float) -> bool:
        """Refuse new requests, finish queued and computing ones within `timeout` seconds.

        Returns True when everything finished; what is left then is answered 503.
        """
        self._closed = True
        self._arrived.set()
        deadline = time.monotonic() + timeout
        drained = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                drained = False
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._running:
            _, pending = await asyncio.wait(self._running, timeout=max(0.0, deadline - time.monotonic()))
            drained = drained and not pending
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Unavailable("the server shut down before this request ran"))
        for task in list(self._running):  # past the deadline: their requests are answered 503
            for item in self._batches.get(task, []):
                if not item.future.done():
                    item.future.set_exception(
                        Unavailable("the server shut down before this request finished")
                    )
        self._set_depth()
        self._executor.shutdown(wait=False, cancel_futures=True)
        return drained

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a worker is free: form the next batch now
            batch = await self._next_batch()
            if batch is None:
                self._slots.release()
                return
            batch = [p for p in batch if not p.future.done()]  # left while the batch formed
            if not batch:
                self._slots.release()
                continue
            # A lone batch runs with every thread; one that runs beside others, or with more
            # queued behind it, takes the one-thread session (when there is one).
            beside = bool(self._running or self._queue)
            task = loop.create_task(self._execute(batch, self._run_beside if beside else self._run))
            self._running.add(task)
            self._batches[task] = batch
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._batches.pop(task, None)
        self._slots.release()

    async def _execute(self, batch: list[_Pending], run: RunFn) -> None:
        loop = asyncio.get_running_loop()
        dispatched = time.monotonic()
        rows = sum(p.rows for p in batch)
        try:
            feeds = _concat([p.feeds for p in batch]) if len(batch) > 1 else batch[0].feeds
            started = time.perf_counter()
            outputs = await loop.run_in_executor(self._executor, run, feeds)
            compute = time.perf_counter() - started
            parts = _split(outputs, [p.rows for p in batch]) if len(batch) > 1 else [outputs]
        except ServeError as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            log.exception("model execution failed for a batch of %d requests", len(batch))
            self._fail(batch, InternalError(f"model execution failed: {exc}"))
            return
        if self._metrics is not None:
            self._metrics.observe_batch(rows, len(batch), compute)
        for item, part in zip(batch, parts, strict=True):
            if not item.future.done():
                queued = dispatched - item.enqueued
                if self._metrics is not None:
                    self._metrics.observe_queue(queued)
                item.future.set_result(BatchResult(part, queued, compute, rows))

    @staticmethod
    def _fail(batch: list[_Pending], exc: ServeError) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    async def _next_batch(self) -> list[_Pending] | None:
        """Wait for work; form one batch. None once closed and empty."""
        while True:
            self._expire()
            if self._queue:
                break
            if self._closed:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        first = self._queue.popleft()
        batch = [first]
        rows = first.rows
        if self.batching:
            close_at = first.enqueued + self.max_queue_delay
            while rows < self.preferred_batch_size:
                self._arrived.clear()
                rows = self._take_compatible(batch, rows)
                remaining = close_at - time.monotonic()
                if (
                    rows >= self.preferred_batch_size
                    or remaining <= 0
                    or self._closed
                    or not self._more_coming()
                ):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
        self._set_depth()
        return batch

    def _take_compatible(self, batch: list[_Pending], rows: int) -> int:
        """Move queued requests with the batch's key into it, in order, while they fit."""
        key = batch[0].key
        kept: deque[_Pending] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.key == key and rows + item.rows <= self.preferred_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self._queue = kept
        return rows

    def _expire(self) -> None:
        """Drop answered (timed out, cancelled) requests from the head of the queue."""
        now = time.monotonic()
        while self._queue and (self._queue[0].future.done() or self._queue[0].deadline <= now):
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded("the request deadline passed while it was queued"))


def _concat(feeds: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([f[name] for f in feeds], axis=0) for name in feeds[0]}


def _split(outputs: Mapping[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise InternalError(
                f"output {name!r} has shape {list(array.shape)}, not {total} rows along axis 0: "
                "the model cannot be batched (serve it with maxBatchSize 1)"
            )
    parts: list[dict[str, np.ndarray]] = []
    offset = 0
    for n in rows:
        parts.append({name: array[offset : offset + n] for name, array in outputs.items()})
        offset += n
    return parts


#: A cell is chosen when its rows per second come within this share of the best cell's. Small:
#: the load-time measurement moves by a few percent, and a wider tolerance made the smallest of
#: several near-equal batch sizes win every time (resnet18: 4 rows chosen three runs out of
#: three, 32 rows being faster in a longer measurement).
TUNING_TOLERANCE = 0.01

#: Concurrent runs tried when serving.concurrentRuns is unset.
RUNS_TO_TRY = (1, 2)


def batch_sizes_to_try(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including `max_batch_size`."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size > 1:
        sizes.append(max_batch_size)
    return sizes


def tuning_cells(options: RuntimeOptions, dynamic_batch: bool) -> list[tuple[int, int]]:
    """The (concurrent runs, batch size) pairs to measure at load: what the options leave unset.

    One cell means there is nothing to choose (both set, or a model without a batch axis and
    concurrentRuns set).
    """
    batching = options.batching
    if not dynamic_batch or batching.max_batch_size == 1:
        sizes = [1]
    elif batching.preferred_batch_size is not None:
        sizes = [batching.preferred_batch_size]
    else:
        sizes = batch_sizes_to_try(batching.max_batch_size)
    runs = [options.concurrent_runs] if options.concurrent_runs is not None else list(RUNS_TO_TRY)
    return [(r, size) for size in sizes for r in runs]


def choose_execution(
    rows_per_second: Mapping[tuple[int, int], float], tolerance: float = TUNING_TOLERANCE
) -> tuple[int, int]:
    """The (concurrent runs, batch size) with the fewest runs, then the smallest batch, whose
    throughput is within `tolerance` of the best measured.

    Neither more rows per batch nor more runs at once is always faster. On 2 CPU cores, MiniLM
    at sequence 128 runs fastest per row at 2-4 rows with two runs side by side (int8: 240
    rows/s, against 202 for one run of 8 rows), while resnet18 is fastest as one run of the
    largest batch (two runs slow it by 15%). Fewer runs and smaller batches queue least.
    """
    if not rows_per_second:
        raise ValueError("no (runs, batch size) cell was measured")
    best = max(rows_per_second.values())
    return min(cell for cell, rate in rows_per_second.items() if rate >= best * (1 - tolerance))
