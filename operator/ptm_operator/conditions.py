"""Status conditions, Kubernetes API conventions: pure helpers, no I/O.

Conventions kept here so every writer agrees:
- a condition's `lastTransitionTime` changes only when its `status` flips (a new reason or
  message alone is not a transition), so `kubectl describe` tells how long a state has held;
- `Ready` is a summary, never set on its own: `with_ready()` derives it from the others.

Helpers take and return lists (never mutate their input), so planning code can compare the
old and new status and patch only what changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from ptm_operator.api import Condition, ConditionStatus, ConditionType

#: Order in which a not-Ready model explains itself: the first condition that blocks wins.
_BLOCKERS: tuple[tuple[ConditionType, ConditionStatus], ...] = (
    (ConditionType.CONVERTED, ConditionStatus.FALSE),
    (ConditionType.VALIDATED, ConditionStatus.FALSE),
    (ConditionType.AVAILABLE, ConditionStatus.FALSE),
    (ConditionType.DEGRADED, ConditionStatus.TRUE),
)


def utcnow() -> datetime:
    """Now, in UTC, to the second (metav1.Time's precision)."""
    return datetime.now(UTC).replace(microsecond=0)


def _status(value: ConditionStatus | bool | str) -> ConditionStatus:
    if isinstance(value, bool):
        return ConditionStatus.TRUE if value else ConditionStatus.FALSE
    return ConditionStatus(value)


def get_condition(conditions: Iterable[Condition], type_: ConditionType | str) -> Condition | None:
    """The condition of that type, or None."""
    return next((c for c in conditions if c.type == str(type_)), None)


def is_true(conditions: Iterable[Condition], type_: ConditionType | str) -> bool:
    """Whether the condition exists with status True."""
    found = get_condition(conditions, type_)
    return found is not None and found.status is ConditionStatus.TRUE


def is_false(conditions: Iterable[Condition], type_: ConditionType | str) -> bool:
    """Whether the condition exists with status False (missing is neither true nor false)."""
    found = get_condition(conditions, type_)
    return found is not None and found.status is ConditionStatus.FALSE


def set_condition(
    conditions: Sequence[Condition],
    type_: ConditionType | str,
    status: ConditionStatus | bool | str,
    reason: str,
    message: str = "",
    *,
    observed_generation: int | None = None,
    now: datetime | None = None,
) -> list[Condition]:
    """A copy of `conditions` with one condition set (added or replaced in place).

    lastTransitionTime is `now` when the condition is new or its status flips, and kept
    otherwise, even when reason, message or observedGeneration change.
    """
    new_status = _status(status)
    previous = get_condition(conditions, type_)
    if previous is not None and previous.status is new_status:
        transition = previous.last_transition_time
    else:
        transition = now if now is not None else utcnow()
    updated = Condition(
        type=str(type_),
        status=new_status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=observed_generation,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c.type == updated.type else c for c in conditions]


def remove_condition(conditions: Sequence[Condition], type_: ConditionType | str) -> list[Condition]:
    """A copy of `conditions` without that type."""
    return [c for c in conditions if c.type != str(type_)]


def ready_summary(conditions: Sequence[Condition]) -> tuple[ConditionStatus, str, str]:
    """(status, reason, message) of the Ready condition implied by the others.

    Ready is True while the model serves (Available True). A degraded or progressing model that
    still serves stays Ready and says so in the message; an update that failed to convert or
    validate while the old revision serves is Degraded, not un-Ready. When nothing serves,
    Ready is False with the reason of the first blocker in order Converted, Validated,
    Available, Degraded; when nothing is known yet, Unknown.
    """
    available = get_condition(conditions, ConditionType.AVAILABLE)
    if available is not None and available.status is ConditionStatus.TRUE:
        notes = [
            f"{t.value}: {c.message or c.reason}"
            for t in (ConditionType.DEGRADED, ConditionType.PROGRESSING)
            if (c := get_condition(conditions, t)) is not None and c.status is ConditionStatus.TRUE
        ]
        message = "; ".join([available.message or "serving", *notes])
        return ConditionStatus.TRUE, available.reason, message
    for type_, blocking in _BLOCKERS:
        found = get_condition(conditions, type_)
        if found is not None and found.status is blocking:
            return ConditionStatus.FALSE, found.reason, f"{type_.value}: {found.message or found.reason}"
    progressing = get_condition(conditions, ConditionType.PROGRESSING)
    if progressing is not None and progressing.status is ConditionStatus.TRUE:
        return (
            ConditionStatus.FALSE,
            progressing.reason,
            f"Progressing: {progressing.message or progressing.reason}",
        )
    return ConditionStatus.UNKNOWN, "Reconciling", "waiting for the first reconciliation"


def with_ready(
    conditions: Sequence[Condition], *, observed_generation: int | None = None, now: datetime | None = None
) -> list[Condition]:
    """A copy of `conditions` with Ready (re)computed by `ready_summary()`."""
    others = [c for c in conditions if c.type != ConditionType.READY.value]
    status, reason, message = ready_summary(others)
    return set_condition(
        conditions,
        ConditionType.READY,
        status,
        reason,
        message,
        observed_generation=observed_generation,
        now=now,
    )
