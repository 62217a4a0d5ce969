"""The order in which models wait for a reconcile: a deduplicating queue with two levels.

A child's change (a Job completed, a Deployment became available, a pod crash-loops) is waited
on by a user; a health tick only looks again. With a thousand models a tick arrives 33 times a
second, and in one FIFO a Job's completion waited behind a whole round of ticks (measured: a
Deployment created 58 s, median, after its Job completed at N=1000). Urgent keys are served
first; a key is queued once, and an urgent add promotes a routine one.

Pure and not thread-safe: handlers.WorkQueue holds the lock and the threads.
"""

from __future__ import annotations

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

    def add(self, key: K, urgent: bool = True) -> bool:
        """Queue `key` (no-op when queued at this level or above); True when it was added."""
        queued = self._pending.get(key)
        if queued is not None and (queued or not urgent):
            return False
        self._pending[key] = urgent
        (self._urgent if urgent else self._routine).append(key)
        return True

    def pop(self) -> K | None:
        """The next key, urgent ones first; None when empty."""
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
        return len(self._pending)

    def __contains__(self, key: object) -> bool:
        return key in self._pending
