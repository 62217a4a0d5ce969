"""Names and labels for everything the operator creates."""

from __future__ import annotations

import hashlib
import re

MANAGED_BY = "ptm-operator"
FIELD_MANAGER = "ptm-operator"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
VERSION_LABEL = "app.kubernetes.io/version"
REVISION_LABEL = "ptm.dev/revision"
MODEL_LABEL = "ptm.dev/model"

_INVALID = re.compile(r"[^a-z0-9-]+")


def dns_name(*parts: str, max_len: int = 63) -> str:
    """Join parts into a DNS-1123 label; too long -> truncated with a short hash suffix.

    Kubernetes object names derived from user names overflow easily (Job names become pod
    label values, capped at 63); the hash keeps truncated names unique and stable.
    """
    raw = "-".join(p for p in parts if p)
    name = _INVALID.sub("-", raw.lower()).strip("-") or "x"
    if len(name) <= max_len:
        return name
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{name[: max_len - 9].rstrip('-')}-{digest}"


def dns1035_name(*parts: str, max_len: int = 63) -> str:
    """Like dns_name, but starting with a letter: Service names must be DNS-1035 labels."""
    name = dns_name(*parts, max_len=max_len)
    return name if name[0].isalpha() else dns_name("m", name, max_len=max_len)


def labels(model_name: str, component: str, revision: str | None = None) -> dict[str, str]:
    """The app.kubernetes.io set plus ptm's own model/revision labels."""
    out = {
        NAME_LABEL: "ptm",
        INSTANCE_LABEL: dns_name(model_name),
        COMPONENT_LABEL: component,
        MANAGED_BY_LABEL: MANAGED_BY,
        MODEL_LABEL: dns_name(model_name),
    }
    if revision:
        out[REVISION_LABEL] = revision
        out[VERSION_LABEL] = revision
    return out


def selector(model_name: str, component: str, revision: str | None = None) -> dict[str, str]:
    """The immutable subset used in selectors (no version label)."""
    out = {
        INSTANCE_LABEL: dns_name(model_name),
        COMPONENT_LABEL: component,
        MODEL_LABEL: dns_name(model_name),
    }
    if revision:
        out[REVISION_LABEL] = revision
    return out
