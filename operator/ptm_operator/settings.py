"""Operator settings: one pydantic-settings model, environment variables `PTM_*`."""

from __future__ import annotations

import secrets

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """What the operator needs to know that is not in a PretrainedModel."""

    model_config = SettingsConfigDict(env_prefix="PTM_", extra="ignore")

    converter_image: str = "ghcr.io/ptm-dev/ptm-convert:0.1.0"
    """Image of conversion Jobs (runtime_image/Dockerfile, target convert)."""
    serve_image: str = "ghcr.io/ptm-dev/ptm-serve:0.1.0"
    """Image of serving pods (target serve; the GPU variant when GPUs are requested)."""
    serve_gpu_image: str | None = None
    """Image for pods that request GPUs (defaults to serve_image)."""
    image_pull_policy: str = "IfNotPresent"

    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty means the whole cluster."""

    store_uri: str = "pvc://ptm-artifacts"
    """Artifact store root: pvc://CLAIM[/PREFIX] (mounted into Jobs and serving pods) or
    file:///HOST/PATH (a hostPath, for single-node development clusters)."""
    store_mount_path: str = "/var/lib/ptm/store"
    """Where the store is mounted inside pods."""

    job_backoff_limit: int = Field(default=2, ge=0)
    """Retries of a conversion Job for transient failures (permanent exit codes never retry)."""
    job_active_deadline_seconds: int = Field(default=3600, ge=60)
    job_ttl_seconds_after_finished: int | None = None
    """Keep finished Jobs by default: their pods carry the conversion report."""

    requeue_seconds: float = Field(default=5.0, gt=0)
    """How soon to look again while waiting on a Job or a rollout."""
    health_interval_seconds: float = Field(default=30.0, gt=0)
    """How often the health timer re-reads each resource's children."""

    child_workers: int = Field(default=24, ge=1, le=64)
    """Threads that reconcile models whose children (Jobs, Deployments, pods) changed."""

    prometheus_url: str | None = None
    """When set, canary analysis queries this Prometheus; otherwise pods are scraped directly."""

    metrics_port: int = 8080
    """Operator /metrics port (0: none)."""
    bind_address: str = "0.0.0.0"
    """Address the metrics and liveness endpoints listen on (127.0.0.1 for local runs)."""
    liveness_port: int = 8081
    """kopf liveness endpoint port (/healthz; 0: none)."""
    peering: str = "ptm-operator"
    """kopf peering name: replicas with the same name elect one active operator."""
    peering_priority: int = Field(default_factory=lambda: secrets.randbelow(1_000_000) + 1)
    """This replica's priority among peers; kopf pauses every replica that shares the highest
    one, so each process draws its own unless set."""

    def serve_image_for(self, gpus: int) -> str:
        return (self.serve_gpu_image or self.serve_image) if gpus > 0 else self.serve_image
