"""What the operator observed of a model's children, reduced to what planning needs.

Pure data: kube.py (LIST) and children.py (watch-fed caches) build it; planning, rollout and
remediation read it. Its own module so that those three import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ptm_operator.analysis import Sample

#: Container waiting reasons that mean the pod will not come up by itself.
BAD_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "InvalidImageName",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class JobObservation:
    """A conversion Job and what its (latest) pod said when it ended."""

    name: str
    revision: str
    active: int = 0
    succeeded: bool = False
    failed: bool = False
    failure_reason: str = ""
    failure_message: str = ""
    exit_code: int | None = None
    termination_message: str | None = None
    created: str = ""
    """creationTimestamp (RFC 3339, sorts in time order)."""


@dataclass(frozen=True)
class DeploymentObservation:
    name: str
    revision: str
    replicas: int = 0
    ready_replicas: int = 0
    available_replicas: int = 0
    updated_replicas: int = 0


@dataclass(frozen=True)
class PodObservation:
    """A serving pod, reduced to what status and remediation need."""

    name: str
    revision: str
    phase: str = "Pending"
    ready: bool = False
    unschedulable: str | None = None
    """The scheduler's message when PodScheduled is False/Unschedulable."""
    waiting_reason: str | None = None
    """CrashLoopBackOff, ImagePullBackOff, ErrImagePull, CreateContainerConfigError, ..."""
    restarts: int = 0
    last_termination_reason: str | None = None
    """OOMKilled, Error, ..."""
    memory_limit: str | None = None
    """The server container's memory limit (which pod template the pod comes from)."""

    def crash_looping(self, restart_threshold: int) -> bool:
        """In CrashLoopBackOff after at least `restart_threshold` restarts (spec.remediation)."""
        return self.waiting_reason == "CrashLoopBackOff" and self.restarts >= restart_threshold

    not_ready_since: datetime | None = None
    """When the Ready condition last turned False."""


@dataclass(frozen=True)
class Observed:
    jobs: dict[str, JobObservation] = field(default_factory=dict)
    deployments: dict[str, DeploymentObservation] = field(default_factory=dict)
    pods: list[PodObservation] = field(default_factory=list)
    keda_available: bool = False
    polls: list[JobObservation] = field(default_factory=list)
    """Source-poll Jobs (updatePolicy Poll), any order."""
    agreement: float | None = None
    """Golden-set prediction agreement of canary and stable (analysis.minPredictionAgreement)."""
    samples: dict[str, Sample] = field(default_factory=dict)
    """Metrics per revision, read only while a canary is in an analysis step."""
