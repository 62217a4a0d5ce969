"""Health remediation of the serving revision: memory bumps after OOMKilled, restarts of stuck
pods, rollback of a crash-looping stable revision to the previous good one.

Pure. Every action is allowed by `spec.remediation`, rate limited by maxActionsPerHour, and
recorded (status.remediations, a Degraded condition, an Event). When an action is not allowed,
only the condition and the Event tell a person what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from ptm_operator.api import (
    PretrainedModel,
    PretrainedModelStatus,
    RemediationAction,
    RemediationRecord,
    RevisionState,
    duration_seconds,
)
from ptm_operator.observed import Observed

_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_bytes(quantity: str | int) -> int:
    """Bytes in a memory quantity ("2Gi", "1500M", 1073741824)."""
    if isinstance(quantity, int):
        return quantity
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kMGT]i?)?", quantity.strip())
    if match is None:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def format_mebibytes(n: int) -> str:
    """A memory quantity in whole Mi (rounded up), or Gi when exact."""
    mi = -(-n // 2**20)
    return f"{mi // 1024}Gi" if mi % 1024 == 0 else f"{mi}Mi"


@dataclass
class Remedy:
    """What remediation decided this round."""

    memory_limit: str | None = None
    """The memory limit serving pods should get (when raised above the spec's)."""
    delete_pods: list[str] = field(default_factory=list)
    rollback_to: str | None = None
    degraded: tuple[str, str] | None = None
    """(reason, message) for the Degraded condition."""
    events: list[tuple[str, str, str]] = field(default_factory=list)


def effective_memory_limit(model: PretrainedModel) -> str | None:
    """The serving memory limit: the spec's, or the remediated one recorded in status if larger."""
    spec_limit = model.spec.serving.resources.limits.get("memory")
    bumped = model.status.memory_limit
    if bumped is None:
        return None if spec_limit is None else str(spec_limit)
    if spec_limit is not None and parse_bytes(spec_limit) >= parse_bytes(bumped):
        return str(spec_limit)  # the user raised it since: theirs wins
    return bumped


def recent_actions(status: PretrainedModelStatus, now: datetime) -> int:
    return sum(1 for r in status.remediations if (now - r.time).total_seconds() < 3600)


def remediate(
    model: PretrainedModel, observed: Observed, status: PretrainedModelStatus, now: datetime
) -> Remedy:
    """Look at the stable revision's pods and decide what to repair."""
    remedy = Remedy()
    stable = status.stable_revision
    if stable is None or status.canary_revision is not None:
        return remedy  # the canary machinery handles a revision that is rolling in
    spec = model.spec.remediation
    allowed = recent_actions(status, now) < spec.max_actions_per_hour
    pods = [p for p in observed.pods if p.revision == stable]

    def record(action: RemediationAction, reason: str, message: str) -> None:
        entry = RemediationRecord(time=now, action=action, reason=reason, revision=stable, message=message)
        status.remediations = [*status.remediations, entry][-spec.history_limit :]
        remedy.events.append(("Warning", action.value, message))

    # 1. OOMKilled: raise the memory limit (of the current pod template only, once per size).
    current = effective_memory_limit(model)
    oom = [p for p in pods if p.last_termination_reason == "OOMKilled" and p.memory_limit == current]
    if oom and current is not None:
        ceiling = parse_bytes(spec.memory_bump_on_oom.ceiling)
        wanted = min(int(parse_bytes(current) * spec.memory_bump_on_oom.factor), ceiling)
        names = ", ".join(sorted(p.name for p in oom)[:3])
        if not spec.memory_bump_on_oom.enabled or not allowed or wanted <= parse_bytes(current):
            why = (
                "remediation.memoryBumpOnOOM is disabled"
                if not spec.memory_bump_on_oom.enabled
                else f"the ceiling {spec.memory_bump_on_oom.ceiling} is reached"
                if wanted <= parse_bytes(current)
                else f"maxActionsPerHour {spec.max_actions_per_hour} reached"
            )
            remedy.degraded = (
                "OOMKilled",
                f"pod(s) {names} OOMKilled at memory limit {current}; not raised: {why}",
            )
            remedy.events.append(("Warning", "OOMKilled", remedy.degraded[1]))
        else:
            new = format_mebibytes(wanted)
            status.memory_limit = new
            remedy.memory_limit = new
            record(
                RemediationAction.MEMORY_BUMP,
                "OOMKilled",
                f"pod(s) {names} OOMKilled: memory {current} -> {new}",
            )
            remedy.degraded = ("OOMKilled", f"memory limit raised {current} -> {new} after OOMKilled")
            return remedy
    remedy.memory_limit = current if status.memory_limit else None

    # 2. A crash-looping stable revision: back to the previous good one.
    policy = spec.rollback_on_crash_loop
    crashing = [p for p in pods if p.crash_looping(policy.restart_threshold)]
    previous = next(
        (
            r
            for r in reversed(status.revisions)
            if r.state is RevisionState.SUPERSEDED and r.artifact is not None and r.revision != stable
        ),
        None,
    )
    if crashing and len(crashing) == len(pods):
        message = f"every pod of revision {stable} crash-loops ({crashing[0].name}: {crashing[0].restarts} restarts)"
        if policy.enabled and allowed and previous is not None and not model.spec.revision:
            record(
                RemediationAction.ROLLBACK,
                "CrashLoopBackOff",
                f"{message}; rolled back to {previous.revision}",
            )
            remedy.rollback_to = previous.revision
            remedy.degraded = ("RolledBack", f"{message}; rolled back to revision {previous.revision}")
            return remedy
        remedy.degraded = ("CrashLoopBackOff", message + ("" if previous else "; no earlier good revision"))

    # 3. Pods stuck not-ready: delete each once (the Deployment recreates it).
    if spec.restart_stuck_pods.enabled:
        limit = duration_seconds(spec.restart_stuck_pods.not_ready_for)
        restarted = [r.message for r in status.remediations if r.action is RemediationAction.RESTART_POD]
        for pod in pods:
            stuck_for = (now - pod.not_ready_since).total_seconds() if pod.not_ready_since else 0.0
            if (
                pod.phase == "Running"
                and not pod.ready
                and stuck_for > limit
                and not any(f"pod {pod.name} " in m for m in restarted)
                and allowed
            ):
                remedy.delete_pods.append(pod.name)
                record(
                    RemediationAction.RESTART_POD,
                    "NotReady",
                    f"pod {pod.name} not ready for {stuck_for:.0f}s; deleted",
                )
    return remedy
