"""Condition helpers: transitions, lookups and the Ready summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ptm_operator.api import Condition, ConditionStatus, ConditionType
from ptm_operator.conditions import (
    get_condition,
    is_false,
    is_true,
    ready_summary,
    remove_condition,
    set_condition,
    utcnow,
    with_ready,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)

C = ConditionType
S = ConditionStatus


def conds(*items: tuple[ConditionType, ConditionStatus, str]) -> list[Condition]:
    out: list[Condition] = []
    for type_, status, reason in items:
        out = set_condition(out, type_, status, reason, f"{type_.value} is {status.value}", now=T0)
    return out


def test_new_condition_gets_now_as_transition_time() -> None:
    result = set_condition([], C.CONVERTED, True, "Converted", "ok", observed_generation=2, now=T0)
    assert len(result) == 1
    assert result[0].status is S.TRUE
    assert result[0].last_transition_time == T0
    assert result[0].observed_generation == 2


@pytest.mark.parametrize(
    ("first", "second", "transition"),
    [
        (S.TRUE, S.TRUE, T0),  # same status: the time is kept even though reason and message change
        (S.TRUE, S.FALSE, T1),
        (S.FALSE, S.UNKNOWN, T1),
        (S.UNKNOWN, S.UNKNOWN, T0),
    ],
)
def test_transition_time_changes_only_when_status_flips(
    first: ConditionStatus, second: ConditionStatus, transition: datetime
) -> None:
    before = set_condition([], C.AVAILABLE, first, "First", "one", now=T0)
    after = set_condition(before, C.AVAILABLE, second, "Second", "two", observed_generation=5, now=T1)
    assert after[0].last_transition_time == transition
    assert (after[0].reason, after[0].message, after[0].observed_generation) == ("Second", "two", 5)


def test_set_condition_replaces_in_place_and_does_not_mutate_its_input() -> None:
    before = conds((C.CONVERTED, S.TRUE, "A"), (C.VALIDATED, S.TRUE, "B"), (C.AVAILABLE, S.FALSE, "C"))
    snapshot = [c.model_copy() for c in before]
    after = set_condition(before, C.VALIDATED, False, "ValidationFailed", "cosine 0.91 < 0.99", now=T1)
    assert [c.type for c in after] == ["Converted", "Validated", "Available"]
    assert after[1].status is S.FALSE
    assert before == snapshot


@pytest.mark.parametrize(
    ("value", "status"), [(True, S.TRUE), (False, S.FALSE), ("Unknown", S.UNKNOWN), (S.TRUE, S.TRUE)]
)
def test_status_accepts_bools_and_strings(
    value: bool | str | ConditionStatus, status: ConditionStatus
) -> None:
    assert set_condition([], "Custom", value, "Why", now=T0)[0].status is status


def test_invalid_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="reason"):
        set_condition([], C.READY, True, "not camel case", now=T0)


def test_lookups() -> None:
    items = conds((C.CONVERTED, S.TRUE, "Done"), (C.DEGRADED, S.FALSE, "Fine"))
    assert get_condition(items, C.CONVERTED) is not None
    assert get_condition(items, "Converted") is not None
    assert get_condition(items, C.READY) is None
    assert is_true(items, C.CONVERTED)
    assert not is_true(items, C.DEGRADED)
    assert is_false(items, C.DEGRADED)
    assert not is_false(items, C.READY)  # missing is neither
    assert [c.type for c in remove_condition(items, C.CONVERTED)] == ["Degraded"]


@pytest.mark.parametrize(
    ("items", "status", "reason", "message_part"),
    [
        ([], S.UNKNOWN, "Reconciling", "waiting"),
        ([(C.PROGRESSING, S.TRUE, "Converting")], S.FALSE, "Converting", "Progressing"),
        ([(C.CONVERTED, S.FALSE, "ConversionFailed")], S.FALSE, "ConversionFailed", "Converted"),
        (
            [(C.CONVERTED, S.TRUE, "Converted"), (C.VALIDATED, S.FALSE, "ValidationFailed")],
            S.FALSE,
            "ValidationFailed",
            "Validated",
        ),
        (
            [(C.AVAILABLE, S.FALSE, "PodsPending"), (C.DEGRADED, S.TRUE, "Unschedulable")],
            S.FALSE,
            "PodsPending",
            "Available",
        ),
        ([(C.DEGRADED, S.TRUE, "CrashLoop")], S.FALSE, "CrashLoop", "Degraded"),
        ([(C.AVAILABLE, S.TRUE, "Serving")], S.TRUE, "Serving", "Available is True"),
        # A failed update while the old revision serves: still Ready, and the message says why not all is well.
        (
            [
                (C.AVAILABLE, S.TRUE, "Serving"),
                (C.VALIDATED, S.FALSE, "ValidationFailed"),
                (C.DEGRADED, S.TRUE, "UpdateFailed"),
            ],
            S.TRUE,
            "Serving",
            "Degraded: Degraded is True",
        ),
        (
            [(C.AVAILABLE, S.TRUE, "Serving"), (C.PROGRESSING, S.TRUE, "CanaryStep")],
            S.TRUE,
            "Serving",
            "Progressing: Progressing is True",
        ),
    ],
)
def test_ready_summary(
    items: list[tuple[ConditionType, ConditionStatus, str]],
    status: ConditionStatus,
    reason: str,
    message_part: str,
) -> None:
    got_status, got_reason, message = ready_summary(conds(*items))
    assert (got_status, got_reason) == (status, reason)
    assert message_part in message


def test_with_ready_sets_ready_and_keeps_its_transition_time() -> None:
    items = conds((C.AVAILABLE, S.TRUE, "Serving"))
    first = with_ready(items, observed_generation=1, now=T0)
    ready = get_condition(first, C.READY)
    assert ready is not None and ready.status is S.TRUE and ready.last_transition_time == T0

    # Progressing starts: Ready stays True, so its transition time stays.
    second = with_ready(
        set_condition(first, C.PROGRESSING, True, "CanaryStep", now=T1), observed_generation=2, now=T1
    )
    ready = get_condition(second, C.READY)
    assert ready is not None and ready.last_transition_time == T0 and ready.observed_generation == 2

    # Nothing serves any more: Ready flips.
    third = with_ready(set_condition(second, C.AVAILABLE, False, "NoReadyPods", now=T1), now=T1)
    ready = get_condition(third, C.READY)
    assert ready is not None and ready.status is S.FALSE and ready.reason == "NoReadyPods"
    assert ready.last_transition_time == T1


def test_utcnow_is_utc_to_the_second() -> None:
    now = utcnow()
    assert now.tzinfo is UTC and now.microsecond == 0
