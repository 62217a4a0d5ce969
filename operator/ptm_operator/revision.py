"""Revisions: a short stable hash of everything that changes the artifact.

Source, conversion, optimization and validation decide what `ptm convert` produces; serving,
rollout and remediation only decide how it runs. Hashing the first group alone means a change
of replicas or batching never reconverts, while a new checkpoint, opset or precision list
always does. Operator-only source fields (secrets, update policy) and the conversion Job's
resources are left out: they change how the Job runs, not what it makes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ptm_operator.api import PretrainedModelSpec

REVISION_LENGTH = 10


def artifact_inputs(spec: PretrainedModelSpec) -> dict[str, Any]:
    """The parts of the spec that the converter reads, in wire form."""
    return {
        "source": spec.source.source_options().wire(),
        "conversion": spec.conversion.conversion_options().wire(),
        "optimization": spec.optimization.wire(),
        "validation": spec.validation.wire(),
    }


def revision_of(spec: PretrainedModelSpec, source_digest: str | None = None) -> str:
    """Revision id: first characters of sha256 over the canonical JSON of the artifact inputs.

    `source_digest` joins the hash when the operator polls a source whose content changes at
    the same URI (updatePolicy Poll).
    """
    data = artifact_inputs(spec)
    if source_digest:
        data["sourceDigest"] = source_digest
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_LENGTH]
