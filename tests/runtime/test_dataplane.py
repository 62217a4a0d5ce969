"""DataPlane bookkeeping that needs no model: the idle hook the server trims its heap with."""

from __future__ import annotations

import asyncio
import time

from ptm_runtime.serve.dataplane import DataPlane

IDLE_S = 0.05


def test_the_idle_hook_runs_once_after_the_last_request_never_during_one_nor_when_draining() -> None:
    calls: list[float] = []

    async def until_called(times: int) -> float:
        deadline = time.monotonic() + 10
        while len(calls) < times:
            assert time.monotonic() < deadline, f"the idle hook ran {len(calls)} times, not {times}"
            await asyncio.sleep(0.005)
        return calls[-1]

    async def main() -> None:
        plane = DataPlane(
            "m", "1", max_elements=16, request_timeout_s=1, on_idle=lambda: calls.append(time.monotonic()),
            idle_after_s=IDLE_S,
        )  # fmt: skip
        first, second = plane.begin(), plane.begin()
        plane.end("rest", 200, first)
        await asyncio.sleep(IDLE_S * 4)
        assert calls == [], "ran while a request was still in flight"
        plane.end("rest", 200, second)
        idle_since = time.monotonic()
        assert await until_called(1) - idle_since >= IDLE_S * 0.9
        # A request that begins before the delay is over puts the hook off until it ends.
        plane.end("grpc", 200, plane.begin())
        late = plane.begin()
        await asyncio.sleep(IDLE_S * 4)
        assert len(calls) == 1
        plane.end("grpc", 400, late)
        await until_called(2)
        await asyncio.sleep(IDLE_S * 4)
        assert len(calls) == 2, "one idle period, one call"
        plane.start_draining()  # shutting down: the worker threads may be going away
        plane.end("rest", 503, plane.begin())
        await asyncio.sleep(IDLE_S * 4)
        assert len(calls) == 2

    asyncio.run(main())
