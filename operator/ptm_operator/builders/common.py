"""Pieces every pod the operator builds shares: owner reference, security context, GPU tolerations."""

from __future__ import annotations

from typing import Any

from ptm_operator.api import PretrainedModel, ResourceRequirements, Toleration

GPU_RESOURCE = "nvidia.com/gpu"
#: The taint GPU node pools carry (NVIDIA GPU operator, GKE, EKS and AKS GPU pools alike).
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
RUN_AS_USER = 10001


def owner_reference(model: PretrainedModel) -> dict[str, Any]:
    """Children are owned by the resource: deleting it garbage-collects them."""
    return {
        "apiVersion": model.api_version,
        "kind": model.kind,
        "name": model.metadata.name,
        "uid": model.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(model: PretrainedModel, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": model.metadata.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner_reference(model)],
    }


def pod_security_context() -> dict[str, Any]:
    """Pod Security Standards 'restricted': non-root, RuntimeDefault seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Read-only root filesystem, no privilege escalation, every capability dropped."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(req: ResourceRequirements, memory_limit: str | None = None) -> dict[str, Any]:
    """Container resources; GPUs go to limits (extended resources need limits == requests).

    `memory_limit` replaces the spec's (an OOMKilled remediation raised it).
    """
    requests = {k: str(v) for k, v in req.requests.items()}
    limits = {k: str(v) for k, v in req.limits.items()}
    if memory_limit is not None:
        limits["memory"] = memory_limit
    for key in [k for k in requests if k.endswith("/gpu")]:
        limits.setdefault(key, requests.pop(key))
    return {"requests": requests, "limits": limits}


def tolerations(user: list[Toleration], gpus: int) -> list[dict[str, Any]]:
    """The user's tolerations, plus the GPU taint's when GPUs are requested and none covers it."""
    out = [t.wire() for t in user]
    if gpus > 0 and not any(_covers_gpu_taint(t) for t in user):
        out.append(dict(GPU_TOLERATION))
    return out


def _covers_gpu_taint(t: Toleration) -> bool:
    if t.effect is not None and t.effect.value != "NoSchedule":
        return False
    if t.key is None:
        return t.operator.value == "Exists"
    return t.key == GPU_RESOURCE
