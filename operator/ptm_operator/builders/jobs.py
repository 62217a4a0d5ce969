"""The conversion Job: `ptm convert` for one revision, writing into the artifact store."""

from __future__ import annotations

import json
from typing import Any

from ptm_operator.api import PretrainedModel, duration_seconds
from ptm_operator.builders.common import (
    container_security_context,
    metadata,
    pod_security_context,
    resources,
    tolerations,
)
from ptm_operator.builders.names import dns_name, labels
from ptm_operator.builders.store import Store
from ptm_operator.revision import artifact_inputs
from ptm_operator.settings import Settings
from ptm_runtime.convert.locations import PVC_MOUNT_ROOT
from ptm_runtime.report import EXIT_INVALID, EXIT_VALIDATION_FAILED

CONTAINER = "convert"
COMPONENT = "converter"
POLL_COMPONENT = "source-poll"
TERMINATION_LOG = "/dev/termination-log"


def source_claims(inputs: Any) -> list[str]:
    """Claims named by pvc://CLAIM/PATH anywhere in the converter's inputs (source, calibration
    data, samples), each mounted read-only where ptm convert looks for it (PTM_PVC_ROOT)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.startswith("pvc://"):
            found.add(value[len("pvc://") :].split("/", 1)[0])

    walk(inputs)
    return sorted(c for c in found if c)


def _claim_volume(claim: str) -> str:
    return dns_name("pvc", claim, max_len=63)


def job_name(model: PretrainedModel, revision: str) -> str:
    """<model>-convert-<revision>, DNS-safe (pod names append 6 characters, labels cap at 63)."""
    return dns_name(model.metadata.name, "convert", revision, max_len=52)


def poll_job_name(model: PretrainedModel, nonce: str) -> str:
    return dns_name(model.metadata.name, "poll", nonce, max_len=52)


def source_poll_job(model: PretrainedModel, nonce: str, settings: Settings, store: Store) -> dict[str, Any]:
    """A Job that only fetches the source and reports its digest (updatePolicy Poll).

    It runs with the conversion Job's image, mounts and credentials, since it reads the same
    source; the operator itself never needs the source's secrets.
    """
    job = _converter_job(model, "", settings, store, digest_only=True)
    job["metadata"]["name"] = poll_job_name(model, nonce)
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        meta["labels"] = labels(model.metadata.name, POLL_COMPONENT)
    job["spec"]["backoffLimit"] = 1
    job["spec"]["ttlSecondsAfterFinished"] = 3600
    return job


def conversion_job(model: PretrainedModel, revision: str, settings: Settings, store: Store) -> dict[str, Any]:
    """A batch/v1 Job that converts, optimizes and validates one revision.

    Permanent failures (an invalid source, a validation gate that failed) exit with codes the
    podFailurePolicy turns into an immediate Job failure, so they are never retried; anything
    else (network, store) is retried up to backoffLimit. The compact report reaches the
    operator through the container's termination message.
    """
    return _converter_job(model, revision, settings, store, digest_only=False)


def _converter_job(
    model: PretrainedModel, revision: str, settings: Settings, store: Store, digest_only: bool
) -> dict[str, Any]:
    spec = model.spec
    namespace = model.metadata.namespace or "default"
    lab = labels(model.metadata.name, COMPONENT, revision or None)
    gpus = spec.conversion.resources.gpus()
    inputs = artifact_inputs(spec)
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    env_from: list[dict[str, Any]] = []
    if spec.source.credentials_secret_ref is not None:
        env_from.append({"secretRef": {"name": spec.source.credentials_secret_ref.name}})
    if spec.source.token_secret_ref is not None:
        ref = spec.source.token_secret_ref
        # The hub token goes to hf:// sources only; an http(s) server gets a bearer token of its own.
        var = "HF_TOKEN" if spec.source.uri.startswith("hf://") else "PTM_HTTP_BEARER_TOKEN"
        env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.converter_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["ptm"],  # whatever the image's entrypoint, run the ptm CLI
        "args": [
            "convert",
            "--spec-json",
            json.dumps({"spec": inputs}, sort_keys=True, separators=(",", ":")),
            "--store",
            store.root(),
            "--namespace",
            namespace,
            "--name",
            model.metadata.name,
            *(["--revision", revision] if revision else []),
            "--termination-log",
            TERMINATION_LOG,
            *(["--digest-only"] if digest_only else []),
        ],
        "env": env,
        "resources": resources(spec.conversion.resources),
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [store.mount(read_only=False), {"name": "tmp", "mountPath": "/tmp"}],
    }
    if env_from:
        container["envFrom"] = env_from
    claims = source_claims(inputs)
    container["volumeMounts"] += [
        {"name": _claim_volume(claim), "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True}
        for claim in claims
    ]
    volumes = [store.volume, {"name": "tmp", "emptyDir": {}}] + [
        {"name": _claim_volume(claim), "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        for claim in claims
    ]
    deadline = min(int(duration_seconds(spec.conversion.timeout)), settings.job_active_deadline_seconds)
    job_spec: dict[str, Any] = {
        "backoffLimit": min(spec.conversion.backoff_limit, settings.job_backoff_limit),
        "activeDeadlineSeconds": deadline,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [EXIT_INVALID, EXIT_VALIDATION_FAILED],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {
            "metadata": {"labels": dict(lab)},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": pod_security_context(),
                "containers": [container],
                "volumes": volumes,
                "tolerations": tolerations([], gpus),
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
            },
        },
    }
    if settings.job_ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = settings.job_ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(model, job_name(model, revision), lab),
        "spec": job_spec,
    }
