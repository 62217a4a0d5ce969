"""The order in which models wait for a reconcile: a deduplicating queue with two levels.

A child's change (a Job completed, a Deployment became available, a pod crash-loops) is waited
on by a user; a health tick only looks again. With a thousand models a tick arrives 33 times a
second, and in one FIFO a Job's completion waited behind a whole round of ticks (measured: a
Deployment created 58 s, median, after its Job completed at N=1000). Urgent keys are served
first; a key is queued once, and an urgent add promotes a routine one. A key can also be queued
for later (a canary's pause, an analysis interval, a retry after an error): it joins the urgent
level when its time comes.

Pure and not thread-safe: handlers.WorkQueue holds the lock and the threads.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Keys(Generic[K]):
    def __init__(self) -> None:
        self._pending: dict[K, bool] = {}
        """key -> urgent, for every queued key."""
        self._urgent: deque[K] = deque()
        self._routine: deque[K] = deque()
        self._due: dict[K, float] = {}
        """key -> the earliest time it is queued for (see add_later)."""
        self._timeline: list[tuple[float, int, K]] = []
        self._added = 0

    def add(self, key: K, urgent: bool = True) -> bool:
        """Queue `key` (no-op when queued at this level or above); True when it was added."""
        queued = self._pending.get(key)
        if queued is not None and (queued or not urgent):
            return False
        self._pending[key] = urgent
        (self._urgent if urgent else self._routine).append(key)
        return True

    def add_later(self, key: K, due: float) -> bool:
        """Queue `key` (urgent) once the clock passed by pop() reaches `due`; an earlier time
        for the same key wins. True when this call queued it or brought it forward."""
        if key in self._due and self._due[key] <= due:
            return False
        self._due[key] = due
        self._added += 1  # ties broken by insertion, keys need not be ordered
        heapq.heappush(self._timeline, (due, self._added, key))
        return True

    def next_due(self) -> float | None:
        """When the earliest key queued for later comes due; None when none is."""
        while self._timeline and self._due.get(self._timeline[0][2]) != self._timeline[0][0]:
            heapq.heappop(self._timeline)  # superseded by an earlier time
        return self._timeline[0][0] if self._timeline else None

    def pop(self, now: float = float("-inf")) -> K | None:
        """The next key, urgent ones first, keys queued for `now` or earlier joining them; None
        when nothing is queued for now."""
        while (due := self.next_due()) is not None and due <= now:
            _, _, key = heapq.heappop(self._timeline)
            del self._due[key]
            self.add(key, urgent=True)
        while self._urgent:
            key = self._urgent.popleft()
            if self._pending.pop(key, None) is not None:
                return key
        while self._routine:
            key = self._routine.popleft()
            if self._pending.get(key) is False:  # promoted keys left with their urgent entry
                del self._pending[key]
                return key
        return None

    def __len__(self) -> int:
        """Keys queued now (not those queued for later)."""
        return len(self._pending)

    def __contains__(self, key: object) -> bool:
        return key in self._pending
