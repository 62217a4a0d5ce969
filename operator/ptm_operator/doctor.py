"""`ptm doctor NAME`: why a PretrainedModel is not serving, ranked, in plain words.

The status already says a lot (conditions, revisions, remediations), but the first cause of a
stuck model is often one level down: a pod the scheduler cannot place, an image that cannot be
pulled, a Job whose pods the namespace's Pod Security admission refuses. `diagnose()` reads the
resource, its Jobs, Deployments, pods and events as plain dicts (as the API returns them) and
returns findings, most urgent first; it is pure, so every rule is unit-tested without a cluster.
`main()` does the reading and the printing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from ptm_operator import GROUP, PLURAL, VERSION

GPU = "nvidia.com/gpu"
_PULL = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
_CONFIG = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
_CONVERTING = "Converting"


class Severity(IntEnum):
    """How much a finding matters: BLOCKING keeps the model from serving (or from progressing)."""

    INFO = 0
    WARNING = 1
    BLOCKING = 2


@dataclass(frozen=True)
class Finding:
    severity: Severity
    summary: str
    """One line, plain words: what is wrong and the evidence."""
    hint: str = ""
    """What to do about it."""
    objects: tuple[str, ...] = ()
    """The objects it is about (kind/name)."""
    rank: int = 0
    """Tie-breaker within a severity: lower comes first (causes before their effects)."""


@dataclass
class Diagnosis:
    name: str
    namespace: str
    ready: str
    ready_reason: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not any(f.severity > Severity.INFO for f in self.findings)


# --- small readers of API dicts ------------------------------------------------------------------


def _get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    cur: Any = obj
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _name(obj: Mapping[str, Any]) -> str:
    return str(_get(obj, "metadata", "name") or "")


def _label(obj: Mapping[str, Any], key: str) -> str:
    return str((_get(obj, "metadata", "labels") or {}).get(key, ""))


def _conditions(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in _get(obj, "status", "conditions") or [] if isinstance(c, Mapping)}


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _ago(since: datetime | None, now: datetime) -> str:
    if since is None:
        return ""
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _names(objs: Sequence[Mapping[str, Any]], kind: str) -> tuple[str, ...]:
    return tuple(f"{kind}/{_name(o)}" for o in objs)


def _gpus(pod: Mapping[str, Any]) -> int:
    total = 0
    for c in _get(pod, "spec", "containers") or []:
        res = c.get("resources") or {}
        amount = (res.get("limits") or {}).get(GPU, (res.get("requests") or {}).get(GPU, 0))
        try:
            total += int(amount)
        except (TypeError, ValueError):
            continue
    return total


def _role(pod: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """'conversion', 'canary' or 'serving', as a person would call the pod."""
    component = _label(pod, "app.kubernetes.io/component")
    if component == "converter":
        return "conversion"
    revision = _label(pod, "ptm.dev/revision")
    if revision and revision == status.get("canaryRevision"):
        return "canary"
    return "serving"


# --- rules ---------------------------------------------------------------------------------------


def _condition_findings(status: Mapping[str, Any], serving: bool, now: datetime) -> list[Finding]:
    out: list[Finding] = []
    conds = _conditions({"status": status})
    ready = conds.get("Ready") or {}
    failing = Severity.WARNING if serving else Severity.BLOCKING

    if ready.get("reason") == "InvalidSpec":
        out.append(
            Finding(
                Severity.BLOCKING,
                f"the spec is invalid: {ready.get('message', '')}",
                "fix the fields named above; `kubectl explain ptm.spec` documents each",
                rank=0,
            )
        )

    converted = conds.get("Converted") or {}
    validated = conds.get("Validated") or {}
    if validated.get("status") == "False":
        out.append(
            Finding(
                failing,
                f"conversion failed the validation gate: {_strip_revision(validated.get('message', ''))}",
                "every candidate failed spec.validation against the fp32 reference: loosen the "
                "thresholds (minCosineSimilarity, maxAbsoluteError, top1Agreement) or allow a "
                "wider precision in spec.optimization.precision",
                rank=10,
            )
        )
    elif converted.get("status") == "False" and converted.get("reason") not in (None, _CONVERTING):
        reason = str(converted.get("reason"))
        message = _strip_revision(converted.get("message", ""))
        if reason in {"InvalidSource", "SourceNotFound", "InvalidSpec"}:
            out.append(
                Finding(
                    failing,
                    f"the source cannot be converted ({reason}): {message}",
                    "check spec.source.uri, its format and architecture, and the credentials "
                    "Secret it names; the conversion Job's pod log has the converter's full output",
                    rank=10,
                )
            )
        else:
            out.append(
                Finding(
                    failing,
                    f"conversion failed ({reason}): {message}",
                    "the conversion Job's pod log has the converter's full output",
                    rank=11,
                )
            )
    elif converted.get("reason") == _CONVERTING:
        since = _parse_time(converted.get("lastTransitionTime"))
        took = _ago(since, now)
        out.append(
            Finding(
                Severity.INFO,
                f"converting: {converted.get('message', '')}" + (f" (for {took})" if took else ""),
                rank=50,
            )
        )

    degraded = conds.get("Degraded") or {}
    if degraded.get("status") == "True":
        reason = str(degraded.get("reason", ""))
        message = str(degraded.get("message", ""))
        if reason == "RolledBack":
            out.append(
                Finding(
                    Severity.WARNING,
                    f"canary rolled back: {message}",
                    "fix what the analysis measured, then change the spec again (a new revision) "
                    "or pin spec.revision to the one that serves",
                    rank=20,
                )
            )
        elif reason == "UpdateFailed":
            out.append(Finding(Severity.WARNING, f"update failed: {message}", rank=21))
        elif reason == "RevisionNotFound":
            out.append(
                Finding(
                    failing,
                    f"spec.revision is not usable: {message}",
                    "pin a revision listed in status.revisions (state Stable, Superseded, "
                    "Validated or RolledBack), or remove spec.revision",
                    rank=5,
                )
            )

    progressing = conds.get("Progressing") or {}
    if progressing.get("status") == "True" and progressing.get("reason") not in (None, _CONVERTING):
        out.append(Finding(Severity.INFO, f"rollout: {progressing.get('message', '')}", rank=60))
    return out


def _strip_revision(message: str) -> str:
    """'revision abc: validation failed: x' -> 'x (revision abc)'."""
    text = str(message)
    revision = ""
    if text.startswith("revision ") and ": " in text:
        head, text = text.split(": ", 1)
        revision = head.removeprefix("revision ")
    for prefix in ("validation failed: ", "validation failed, served anyway (failurePolicy Warn): "):
        text = text.removeprefix(prefix)
    return f"{text} (revision {revision})" if revision else text


def _pod_findings(
    pods: Sequence[Mapping[str, Any]], status: Mapping[str, Any], serving: bool
) -> list[Finding]:
    pull: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    crash: dict[str, list[Mapping[str, Any]]] = {}
    config: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    unschedulable: dict[tuple[str, bool, str], list[Mapping[str, Any]]] = {}
    details: dict[str, str] = {}
    for pod in pods:
        if _get(pod, "metadata", "deletionTimestamp"):
            continue
        role = _role(pod, status)
        st = pod.get("status") or {}
        scheduled = _conditions(pod).get("PodScheduled") or {}
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            key = (role, _gpus(pod) > 0, str(scheduled.get("message", "")).strip())
            unschedulable.setdefault(key, []).append(pod)
            continue
        for cs in st.get("containerStatuses") or []:
            waiting = _get(cs, "state", "waiting") or {}
            reason = waiting.get("reason")
            if reason in _PULL:
                pull.setdefault((role, str(cs.get("image", ""))), []).append(pod)
                details[_name(pod)] = str(waiting.get("message", "") or reason)
            elif reason in _CONFIG:
                config.setdefault((role, str(waiting.get("message", "") or reason)), []).append(pod)
            elif reason == "CrashLoopBackOff" or (
                (cs.get("restartCount") or 0) >= 3 and _get(cs, "lastState", "terminated")
            ):
                crash.setdefault(role, []).append(pod)
                last = _get(cs, "lastState", "terminated") or {}
                details[_name(pod)] = (
                    f"{cs.get('restartCount', 0)} restarts, last exit: "
                    f"{last.get('reason', 'Error')} (code {last.get('exitCode', '?')})"
                )
    out: list[Finding] = []

    def sev(role: str) -> Severity:
        # a conversion that cannot run, or serving with nothing available, blocks
        if role == "conversion" or not serving:
            return Severity.BLOCKING
        return Severity.WARNING

    for (role, gpu, message), group in unschedulable.items():
        waits = "waits" if len(group) == 1 else "wait"
        what = f"{waits} for {GPU}" if gpu else "cannot be scheduled"
        hint = (
            "no node has a free GPU that matches the pods' selectors and tolerations: add GPU "
            "nodes (or let the cluster autoscaler / Karpenter add them), free GPUs, or request "
            "fewer per pod (spec.serving.resources.limits)"
            if gpu
            else "the scheduler's message names what no node offers (CPU, memory, a volume, a "
            "node selector or taint)"
        )
        out.append(
            Finding(
                sev(role),
                f"{_plural(len(group), role + ' pod')} {what}: {message}",
                hint,
                _names(group, "pod"),
                rank=30,
            )
        )
    for (role, image), group in pull.items():
        detail = details.get(_name(group[0]), "")
        out.append(
            Finding(
                sev(role),
                f"{_plural(len(group), role + ' pod')} cannot pull image {image}: {detail}",
                "check the image name and tag (operator values converterImage / serveImage, or "
                "spec.serving.image), that the registry is reachable from the nodes, and "
                "imagePullSecrets",
                _names(group, "pod"),
                rank=25,
            )
        )
    for (role, message), group in config.items():
        out.append(
            Finding(
                sev(role),
                f"{_plural(len(group), role + ' pod')} cannot start their container: {message}",
                "a Secret or ConfigMap the pod names is missing, or a key in it",
                _names(group, "pod"),
                rank=26,
            )
        )
    for role, group in crash.items():
        first = details.get(_name(group[0]), "")
        oom = "OOMKilled" in first
        out.append(
            Finding(
                sev(role),
                f"{_plural(len(group), role + ' pod')} {'crash-loops' if len(group) == 1 else 'crash-loop'}: "
                f"{first}",
                "the model needs more memory than its limit: raise spec.serving.resources.limits.memory "
                "(remediation.memoryBumpOnOOM does this automatically)"
                if oom
                else "`kubectl logs --previous` on one of them shows why the server exits",
                _names(group, "pod"),
                rank=27,
            )
        )
    return out


def _job_findings(
    jobs: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], have_conversion: bool
) -> list[Finding]:
    """A failed Job whose failure the status does not show yet (e.g. the operator is down)."""
    if have_conversion:
        return []
    out: list[Finding] = []
    for job in jobs:
        failed = _conditions(job).get("Failed") or {}
        if failed.get("status") != "True":
            continue
        message = str(failed.get("message", "") or failed.get("reason", "Failed"))
        for pod in pods:
            if _name(job) not in {_label(pod, "batch.kubernetes.io/job-name"), _label(pod, "job-name")}:
                continue
            for cs in _get(pod, "status", "containerStatuses") or []:
                term = _get(cs, "state", "terminated") or {}
                text = term.get("message")
                if not text:
                    continue
                try:
                    data = json.loads(text)
                except ValueError:
                    message = str(text).strip()[-500:]
                    continue
                if isinstance(data, dict) and "message" in data:
                    message = f"{data.get('reason', 'Failed')}: {data['message']}"
        out.append(
            Finding(
                Severity.BLOCKING,
                f"conversion Job {_name(job)} failed: {message}",
                "the Job's pod log has the converter's full output",
                (f"job/{_name(job)}",),
                rank=12,
            )
        )
    return out


def _event_findings(events: Sequence[Mapping[str, Any]], have: list[Finding], now: datetime) -> list[Finding]:
    """Warning events that explain what the rest cannot see (FailedCreate, FailedMount, ...)."""
    out: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    covered = " ".join(f.summary for f in have)
    warnings = [e for e in events if e.get("type") == "Warning"]
    warnings.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""), reverse=True)
    for ev in warnings:
        reason = str(ev.get("reason", ""))
        obj = ev.get("involvedObject") or ev.get("regarding") or {}
        kind, name = str(obj.get("kind", "")), str(obj.get("name", ""))
        message = str(ev.get("message") or ev.get("note") or "").strip()
        key = (reason, kind if reason in {"FailedCreate", "FailedMount"} else name)
        if key in seen or not message:
            continue
        seen.add(key)
        count = ev.get("count") or 1
        times = f" ({count}x)" if count and int(count) > 1 else ""
        if reason == "FailedCreate":
            owner = (
                "conversion Job" if kind == "Job" else "serving ReplicaSet" if kind == "ReplicaSet" else kind
            )
            hint = (
                "the namespace's Pod Security admission refuses the pods: ptm's pods meet "
                "'restricted', except a file:// artifact store (a hostPath); use a pvc:// store"
                if "PodSecurity" in message
                else "a quota, a LimitRange or an admission webhook refuses the pods"
            )
            out.append(
                Finding(
                    Severity.BLOCKING,
                    f"{owner} {name} cannot create pods{times}: {message}",
                    hint,
                    (f"{kind.lower()}/{name}",),
                    rank=15,
                )
            )
        elif reason == "FailedMount" or reason == "FailedAttachVolume":
            out.append(
                Finding(
                    Severity.BLOCKING,
                    f"pod {name} cannot mount a volume{times}: {message}",
                    "the artifact store's PersistentVolumeClaim (operator value storeUri) must "
                    "exist in the model's namespace and be bound",
                    (f"pod/{name}",),
                    rank=28,
                )
            )
        elif reason in {"FailedScheduling", "BackOff", "Failed"} or reason in covered:
            continue  # the pod and condition rules already say this, with more context
        elif len([f for f in out if f.rank == 90]) < 3:
            out.append(
                Finding(
                    Severity.INFO,
                    f"event {reason} on {kind.lower()}/{name}{times}: {message}",
                    objects=(f"{kind.lower()}/{name}",),
                    rank=90,
                )
            )
    return out


def _remediation_findings(status: Mapping[str, Any], now: datetime) -> list[Finding]:
    records = [r for r in status.get("remediations") or [] if isinstance(r, Mapping)]
    if not records:
        return []
    last = records[-1]
    when = _ago(_parse_time(last.get("time")), now)
    actions = Counter(str(r.get("action")) for r in records)
    summary = ", ".join(f"{n}x {a}" for a, n in actions.most_common())
    detail = f"{last.get('action')} ({last.get('reason')}"
    detail += f", revision {last['revision']}" if last.get("revision") else ""
    detail += f"): {last.get('message')}" if last.get("message") else ")"
    return [
        Finding(
            Severity.INFO,
            f"automatic remediations recorded: {summary}; latest {when + ' ago' if when else ''}: {detail}",
            rank=70,
        )
    ]


def diagnose(
    model: Mapping[str, Any],
    jobs: Sequence[Mapping[str, Any]] = (),
    pods: Sequence[Mapping[str, Any]] = (),
    events: Sequence[Mapping[str, Any]] = (),
    now: datetime | None = None,
) -> Diagnosis:
    """Findings for one PretrainedModel from what the API returned, most urgent first."""
    now = now or datetime.now(UTC)
    status: Mapping[str, Any] = model.get("status") or {}
    conds = _conditions(model)
    ready = conds.get("Ready") or {}
    available = conds.get("Available") or {}
    serving = available.get("status") == "True"

    findings = _condition_findings(status, serving, now)
    have_conversion = any(f.rank in (10, 11) for f in findings)
    findings += _job_findings(jobs, pods, have_conversion)
    findings += _pod_findings(pods, status, serving)
    findings += _event_findings(events, findings, now)
    findings += _remediation_findings(status, now)

    if not status.get("conditions"):
        findings.append(
            Finding(
                Severity.BLOCKING,
                "the operator has not reconciled this resource yet (no status.conditions)",
                "is the operator running, and does it watch this namespace? "
                "(`kubectl get pods -A -l app.kubernetes.io/component=operator`)",
                rank=1,
            )
        )
    elif ready.get("status") != "True" and not any(f.severity > Severity.INFO for f in findings):
        findings.append(
            Finding(
                Severity.WARNING,
                f"not ready ({ready.get('reason', 'Unknown')}): {ready.get('message', '')}",
                rank=80,
            )
        )
    if serving and not any(f.severity > Severity.INFO for f in findings):
        findings.append(
            Finding(
                Severity.INFO,
                f"serving revision {status.get('stableRevision')}: {available.get('message', '')}",
                rank=99,
            )
        )
    findings.sort(key=lambda f: (-f.severity, f.rank))
    return Diagnosis(
        name=_name(model),
        namespace=str(_get(model, "metadata", "namespace") or ""),
        ready=str(ready.get("status", "Unknown")),
        ready_reason=str(ready.get("reason", "")),
        findings=findings,
    )


_LABELS = {Severity.BLOCKING: "blocking", Severity.WARNING: "warning", Severity.INFO: "info"}


def render(diagnosis: Diagnosis, max_objects: int = 3) -> str:
    """The diagnosis as text: a header, then numbered findings with evidence and a hint."""
    head = f"{diagnosis.namespace}/{diagnosis.name}: Ready={diagnosis.ready}"
    head += f" ({diagnosis.ready_reason})" if diagnosis.ready_reason else ""
    lines = [head]
    for i, f in enumerate(diagnosis.findings, 1):
        lines.append(f"{i}. [{_LABELS[f.severity]}] {f.summary}")
        if f.objects:
            shown = ", ".join(f.objects[:max_objects])
            more = f" and {len(f.objects) - max_objects} more" if len(f.objects) > max_objects else ""
            lines.append(f"   objects: {shown}{more}")
        if f.hint:
            lines.append(f"   what to do: {f.hint}")
    return "\n".join(lines) + "\n"


# --- reading the cluster -------------------------------------------------------------------------


def read(namespace: str, name: str) -> tuple[dict[str, Any], list[Any], list[Any], list[Any]] | None:
    """The resource, its Jobs, its pods and the events about them, as plain API dicts."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from ptm_operator.builders.names import MODEL_LABEL, dns_name

    loader: Any = config  # the client's config loaders are untyped
    try:
        loader.load_incluster_config()
    except config.ConfigException:
        loader.load_kube_config()
    api = client.ApiClient()
    plain: Callable[[Any], Any] = api.sanitize_for_serialization
    try:
        model: Any = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    selector = f"{MODEL_LABEL}={dns_name(name)}"
    core = client.CoreV1Api(api)
    jobs = plain(client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=selector).items)
    deployments = plain(
        client.AppsV1Api(api).list_namespaced_deployment(namespace, label_selector=selector).items
    )
    pods = plain(core.list_namespaced_pod(namespace, label_selector=selector).items)
    events = plain(core.list_namespaced_event(namespace).items)
    owned = {("PretrainedModel", name)}
    owned |= {("Job", _name(j)) for j in jobs} | {("Pod", _name(p)) for p in pods}
    owned |= {("Deployment", _name(d)) for d in deployments}
    prefixes = tuple(f"{_name(d)}-" for d in deployments)
    mine = [
        e
        for e in events
        if (_get(e, "involvedObject", "kind"), _get(e, "involvedObject", "name")) in owned
        or (
            _get(e, "involvedObject", "kind") == "ReplicaSet"
            and str(_get(e, "involvedObject", "name") or "").startswith(prefixes or ("\0",))
        )
    ]
    return dict(model), list(jobs), list(pods), mine


def _current_namespace() -> str:
    try:
        from kubernetes import config

        loader: Any = config
        _, active = loader.list_kube_config_contexts()
        return str((active or {}).get("context", {}).get("namespace") or "default")
    except Exception:
        return "default"


def main(argv: Sequence[str] | None = None, out: Callable[[str], Any] = sys.stdout.write) -> int:
    parser = argparse.ArgumentParser(
        prog="ptm doctor",
        description="Explain why a PretrainedModel is not serving: its status, Jobs, pods and events, "
        "ranked with the most urgent cause first. Exit code 0: nothing is wrong; 1: something is; "
        "2: no such model.",
    )
    parser.add_argument("name", help="the PretrainedModel")
    parser.add_argument("-n", "--namespace", help="its namespace (default: the kubeconfig's)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    namespace = args.namespace or _current_namespace()
    found = read(namespace, args.name)
    if found is None:
        out(f"{namespace}/{args.name}: no PretrainedModel with that name\n")
        return 2
    model, jobs, pods, events = found
    diagnosis = diagnose(model, jobs, pods, events)
    if args.json:
        out(json.dumps(_as_json(diagnosis), indent=2) + "\n")
    else:
        out(render(diagnosis))
    return 0 if diagnosis.healthy else 1


def _as_json(d: Diagnosis) -> dict[str, Any]:
    return {
        "name": d.name,
        "namespace": d.namespace,
        "ready": d.ready,
        "readyReason": d.ready_reason,
        "findings": [
            {
                "severity": _LABELS[f.severity],
                "summary": f.summary,
                "hint": f.hint,
                "objects": list(f.objects),
            }
            for f in d.findings
        ],
    }
