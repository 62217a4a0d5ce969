"""workqueue.Keys: each key queued once, urgent keys before routine ones, promotion, keys for later."""

from __future__ import annotations

from ptm_operator.workqueue import Keys


def drain(keys: Keys[str], now: float = float("-inf")) -> list[str]:
    out = []
    while (key := keys.pop(now)) is not None:
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


def test_keys_queued_for_later_join_the_urgent_level_when_due() -> None:
    keys: Keys[str] = Keys()
    assert keys.add_later("paused", due=10.0)
    assert not keys.add_later("paused", due=30.0)  # a later time for the same key: the earlier one stands
    keys.add_later("interval", due=20.0)
    keys.add("tick", urgent=False)
    assert keys.next_due() == 10.0
    assert keys.pop(now=5.0) == "tick" and keys.pop(now=5.0) is None
    keys.add("tick", urgent=False)
    assert keys.pop(now=10.0) == "paused"  # due: urgent, before the routine tick
    assert keys.pop(now=10.0) == "tick"
    assert keys.next_due() == 20.0
    assert keys.add_later("interval", due=15.0)  # an earlier time supersedes the queued one
    assert keys.next_due() == 15.0 and keys.pop(now=15.0) == "interval"
    assert keys.next_due() is None and keys.pop(now=100.0) is None


def test_a_due_key_already_queued_is_queued_once() -> None:
    keys: Keys[str] = Keys()
    keys.add("a")
    keys.add_later("a", due=1.0)
    assert drain(keys, now=2.0) == ["a"]
