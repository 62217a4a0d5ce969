"""workqueue.Keys: each key queued once, urgent keys before routine ones, promotion."""

from __future__ import annotations

from ptm_operator.workqueue import Keys


def drain(keys: Keys[str]) -> list[str]:
    out = []
    while (key := keys.pop()) is not None:
        out.append(key)
    return out


def test_each_key_once_in_order() -> None:
    keys: Keys[str] = Keys()
    assert keys.add("a") and keys.add("b")
    assert not keys.add("a")
    assert len(keys) == 2 and "a" in keys
    assert drain(keys) == ["a", "b"]
    assert keys.pop() is None and len(keys) == 0


def test_urgent_before_routine() -> None:
    keys: Keys[str] = Keys()
    for k in ("t1", "t2", "t3"):
        keys.add(k, urgent=False)
    keys.add("job-done")
    assert drain(keys) == ["job-done", "t1", "t2", "t3"]


def test_urgent_add_promotes_a_routine_key_once() -> None:
    keys: Keys[str] = Keys()
    keys.add("a", urgent=False)
    keys.add("b", urgent=False)
    assert keys.add("b")  # promoted
    assert not keys.add("b", urgent=False)  # already queued above
    assert len(keys) == 2
    assert drain(keys) == ["b", "a"]


def test_a_key_taken_can_be_queued_again() -> None:
    keys: Keys[str] = Keys()
    keys.add("a", urgent=False)
    keys.add("a")
    assert keys.pop() == "a"
    assert keys.add("a", urgent=False)  # while its reconcile runs, a new tick queues it again
    assert drain(keys) == ["a"]
