"""The only module that talks to the Kubernetes API: observe children, server-side apply, delete.

Reads are label-selected lists in the resource's namespace (three per reconcile). Writes are
server-side apply with field manager `ptm-operator`, so re-applying an unchanged manifest is a
no-op and a restarted operator never duplicates what it created before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ptm_operator.analysis import LATENCY_BUCKET, REQUESTS, Sample, is_server_error, parse_metrics
from ptm_operator.api import PretrainedModel
from ptm_operator.builders import jobs, serving
from ptm_operator.builders.names import FIELD_MANAGER, REVISION_LABEL, selector
from ptm_operator.planning import (
    IN_CONVERSION,
    DeploymentObservation,
    JobObservation,
    Observed,
    PodObservation,
)
from ptm_operator.rollout import needs_samples

log = logging.getLogger(__name__)

#: How long an applied manifest is trusted before it is applied again unchanged (drift repair).
APPLY_TTL_SECONDS = 300.0

#: apiVersion/kind -> (path prefix, plural) for the kinds the operator manages.
_KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    ("keda.sh/v1alpha1", "ScaledObject"): ("/apis/keda.sh/v1alpha1", "scaledobjects"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): ("/apis/gateway.networking.k8s.io/v1", "httproutes"),
}


def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    try:
        prefix, plural = _KINDS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"ptm does not manage {api_version} {kind}") from None
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class Kube:
    """Observe and change one namespace's ptm children through one ApiClient (plain dicts)."""

    def __init__(self, api_client: client.ApiClient, prometheus_url: str | None = None) -> None:
        self.api = api_client
        self.prometheus_url = prometheus_url
        self._keda: bool | None = None
        self._goldens: dict[str, Any] = {}
        self._applied: dict[str, tuple[str, float]] = {}

    # --- reads -------------------------------------------------------------------------------

    def _list(
        self, api_version: str, kind: str, namespace: str, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        path = _path(api_version, kind, namespace)
        data = self._request("GET", path, "application/json", None, [("labelSelector", _selector(labels))])
        items: list[dict[str, Any]] = data.get("items") or []
        return items

    def observe(self, model: PretrainedModel) -> Observed:
        ns = model.metadata.namespace or "default"
        name = model.metadata.name
        job_items = self._list("batch/v1", "Job", ns, selector(name, jobs.COMPONENT))
        # A Job's pod matters only while its revision converts: later its report is in status.
        converting = {r.revision for r in model.status.revisions if r.state in IN_CONVERSION}
        known = {r.revision for r in model.status.revisions}
        needs_pods = any(_revision(j) in converting or _revision(j) not in known for j in job_items)
        observed_jobs = {
            rev: job
            for rev, job in self._observe_jobs(ns, name, jobs.COMPONENT, job_items, needs_pods)
            if rev
        }
        polls: list[JobObservation] = []
        if model.spec.source.update_policy.type.value == "Poll":
            poll_jobs = self._list("batch/v1", "Job", ns, selector(name, jobs.POLL_COMPONENT))
            polls = [
                job
                for _, job in self._observe_jobs(ns, name, jobs.POLL_COMPONENT, poll_jobs, bool(poll_jobs))
            ]
        revisions = [r.revision for r in model.status.revisions]
        self.forget_missing(
            "batch/v1",
            "Job",
            ns,
            {jobs.job_name(model, r) for r in revisions},
            {j["metadata"]["name"] for j in job_items},
        )
        observed_deps = {}
        deployments = self._list("apps/v1", "Deployment", ns, selector(name, serving.COMPONENT))
        self.forget_missing(
            "apps/v1",
            "Deployment",
            ns,
            {serving.deployment_name(model, r) for r in revisions},
            {d["metadata"]["name"] for d in deployments},
        )
        for dep in deployments:
            rev = (dep["metadata"].get("labels") or {}).get(REVISION_LABEL)
            if rev and not dep["metadata"].get("deletionTimestamp"):
                st = dep.get("status") or {}
                observed_deps[rev] = DeploymentObservation(
                    name=dep["metadata"]["name"],
                    revision=rev,
                    replicas=(dep.get("spec") or {}).get("replicas") or 0,
                    ready_replicas=st.get("readyReplicas") or 0,
                    available_replicas=st.get("availableReplicas") or 0,
                    updated_replicas=st.get("updatedReplicas") or 0,
                )
        serving_pods = []
        raw_pods: list[dict[str, Any]] = []
        if deployments:
            raw_pods = self._list("v1", "Pod", ns, selector(name, serving.COMPONENT))
            serving_pods = [_pod_observation(p) for p in raw_pods]
        samples: dict[str, Sample] = {}
        if needs_samples(model):
            measured = {r for r in (model.status.stable_revision, model.status.canary_revision) if r}
            for rev in measured:
                observed_dep = observed_deps.get(rev)
                if observed_dep is None:
                    continue
                if self.prometheus_url:
                    samples[rev] = self._prometheus_sample(ns, observed_dep.name, name)
                else:
                    mine = [
                        p for p in raw_pods if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == rev
                    ]
                    samples[rev] = scrape_pods(mine, name)
        agreement = None
        golden = model.spec.rollout.analysis.golden_set
        canary, stable = model.status.canary_revision, model.status.stable_revision
        if samples and golden is not None and canary and stable:
            agreement = self._golden_agreement(
                model,
                golden.uri,
                _ready_pod_url(raw_pods, canary, model),
                _ready_pod_url(raw_pods, stable, model),
            )
        return Observed(
            agreement=agreement,
            jobs=observed_jobs,
            deployments=observed_deps,
            pods=serving_pods,
            polls=polls,
            samples=samples,
            keda_available=self.keda_available() if model.spec.serving.autoscaling else False,
        )

    def _golden_agreement(
        self, model: PretrainedModel, uri: str, canary: str | None, stable: str | None
    ) -> float | None:
        """Golden-set agreement between one ready pod of each revision (None when not possible)."""
        if canary is None or stable is None:
            return None
        from ptm_operator.goldens import load_golden_set, measure_agreement

        try:
            golden = self._goldens.get(uri) or load_golden_set(uri)
        except (OSError, ValueError) as exc:
            log.warning("cannot read the golden set %s: %s", uri, exc)
            return None
        self._goldens[uri] = golden
        return measure_agreement(
            canary, stable, model.metadata.name, golden, model.spec.validation.min_cosine_similarity
        )

    def _prometheus_sample(self, namespace: str, deployment: str, model: str) -> Sample:
        """The revision's cumulative counts from Prometheus (PromQL over the runtime's metrics)."""
        assert self.prometheus_url
        match = f'namespace="{namespace}",pod=~"{deployment}-.*",model="{model}"'
        sample = Sample()
        for code, value in _promql(self.prometheus_url, f"sum by (code) ({REQUESTS}{{{match}}})", "code"):
            sample.requests += value
            if is_server_error(code):
                sample.errors += value
        for le, value in _promql(self.prometheus_url, f"sum by (le) ({LATENCY_BUCKET}{{{match}}})", "le"):
            sample.buckets[float(le.replace("+Inf", "inf"))] = value
        sample.pods = 1 if sample.requests or sample.buckets else 0
        return sample

    def set_route_backends(
        self, model: PretrainedModel, route: str, backends: list[dict[str, Any]]
    ) -> str | None:
        """Give the HTTPRoute rules that point at this model the revision backends and weights.

        The route belongs to the user (hostnames, matches, filters): only the backendRefs of
        rules that reference the model's Services are replaced, read-modify-write with the
        resourceVersion so a concurrent edit is never lost. Returns a problem in words, or None.
        """
        ns = model.metadata.namespace or "default"
        path = _path("gateway.networking.k8s.io/v1", "HTTPRoute", ns, route)
        try:
            current = self._request("GET", path, "application/json", None, [])
        except ApiException as exc:
            if exc.status == 404:
                return f"HTTPRoute {route} (spec.rollout.trafficRouting.httpRoute) does not exist"
            raise
        mine = (
            {serving.service_name(model)}
            | {serving.revision_service_name(model, r.revision) for r in model.status.revisions}
            | {b["name"] for b in backends}
        )
        rules = current.get("spec", {}).get("rules") or []
        changed = False
        touched = False
        for rule in rules:
            refs = rule.get("backendRefs") or []
            if refs and any(ref.get("name") in mine for ref in refs):
                touched = True
                if refs != backends:
                    rule["backendRefs"] = backends
                    changed = True
        if not touched:
            return f"no rule of HTTPRoute {route} has a backendRef to Service {serving.service_name(model)}"
        if changed:
            body = {
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "spec": {"rules": rules},
            }
            self._request("PATCH", path, "application/merge-patch+json", body, [])
        return None

    def post_event(self, model: PretrainedModel, type_: str, reason: str, message: str) -> None:
        """An Event on the resource (core/v1, what kubectl describe and get events show)."""
        ns = model.metadata.namespace or "default"
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{model.metadata.name}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": model.api_version,
                "kind": model.kind,
                "name": model.metadata.name,
                "namespace": ns,
                "uid": model.metadata.uid or "",
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
            "action": reason,
            "count": 1,
        }
        try:
            self._request("POST", f"/api/v1/namespaces/{ns}/events", "application/json", body, [])
        except ApiException as exc:  # an Event is best effort: never fail a reconcile for it
            log.warning("cannot post Event %s on %s/%s: %s", reason, ns, model.metadata.name, exc.reason)

    def patch_status(self, model: PretrainedModel, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (nulls clear fields)."""
        from ptm_operator import GROUP, PLURAL, VERSION

        ns = model.metadata.namespace or "default"
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/{model.metadata.name}/status"
        self._request("PATCH", path, "application/merge-patch+json", {"status": status}, [])

    def remove_annotations(self, model: PretrainedModel, keys: list[str]) -> None:
        from ptm_operator import GROUP, PLURAL, VERSION

        ns = model.metadata.namespace or "default"
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/{model.metadata.name}"
        body = {"metadata": {"annotations": dict.fromkeys(keys)}}
        self._request("PATCH", path, "application/merge-patch+json", body, [])

    def get_model(self, namespace: str, name: str) -> PretrainedModel | None:
        """The PretrainedModel as stored, or None when it does not exist."""
        from ptm_operator import GROUP, PLURAL, VERSION

        try:
            body = self._request(
                "GET",
                f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
                "application/json",
                None,
                [],
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return PretrainedModel.from_body(body)

    def _observe_jobs(
        self, ns: str, model: str, component: str, job_items: list[dict[str, Any]], with_pods: bool
    ) -> list[tuple[str, JobObservation]]:
        """(revision, observation) per Job; its pods (for exit codes and termination messages)
        are listed only when `with_pods`."""
        by_job: dict[str, list[dict[str, Any]]] = {}
        if with_pods:
            for pod in self._list("v1", "Pod", ns, selector(model, component)):
                lab = pod["metadata"].get("labels") or {}
                by_job.setdefault(
                    lab.get("batch.kubernetes.io/job-name") or lab.get("job-name", ""), []
                ).append(pod)
        return [(_revision(j), _job_observation(j, by_job.get(j["metadata"]["name"], []))) for j in job_items]

    def keda_available(self) -> bool:
        """Whether the KEDA ScaledObject CRD is installed (cached per process)."""
        if self._keda is None:
            path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/scaledobjects.keda.sh"
            try:
                self._request("GET", path, "application/json", None, [])
                self._keda = True
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self._keda = False
        return self._keda

    # --- writes ------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, content_type: str, body: Any, query: list[tuple[str, str]]
    ) -> Any:
        serialized = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*serialized)
        response.read()
        return self.api.response_deserialize(
            response, {"200": "object", "201": "object", "202": "object"}
        ).data

    def apply(self, manifest: dict[str, Any]) -> bool:
        """Server-side apply (force: the operator owns the fields it sets); False when skipped.

        The same manifest applied within APPLY_TTL_SECONDS is skipped: a reconcile that changes
        nothing then costs no writes. The TTL bounds how long a child changed or deleted behind
        the operator's back stays so (Jobs and Deployments it observes are re-applied at once).
        """
        meta = manifest["metadata"]
        path = _path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        text = json.dumps(manifest, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        now = time.monotonic()
        last = self._applied.get(path)
        if last is not None and last[0] == digest and now - last[1] < APPLY_TTL_SECONDS:
            return False
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        self._request("PATCH", path, "application/apply-patch+yaml", text, query)
        self._applied[path] = (digest, now)
        return True

    def forget_missing(
        self, api_version: str, kind: str, namespace: str, expected: set[str], present: set[str]
    ) -> None:
        """Drop the apply memory of the `expected` objects that are not `present` (they are gone)."""
        for name in expected - present:
            self._applied.pop(_path(api_version, kind, namespace, name), None)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete (background propagation); already gone is fine."""
        try:
            path = _path(api_version, kind, namespace, name)
            self._request("DELETE", path, "application/json", {"propagationPolicy": "Background"}, [])
        except ApiException as exc:
            if exc.status != 404:
                raise


def _revision(obj: dict[str, Any]) -> str:
    return str((obj["metadata"].get("labels") or {}).get(REVISION_LABEL, ""))


def _job_observation(job: dict[str, Any], pods: list[dict[str, Any]]) -> JobObservation:
    st = job.get("status") or {}
    conditions = st.get("conditions") or []
    failed = next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), None)
    complete = any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)
    exit_code: int | None = None
    message: str | None = None
    latest = ""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if cs.get("name") == jobs.CONTAINER and term is not None:
                finished = term.get("finishedAt") or ""
                if exit_code is None or finished > latest:
                    latest = finished
                    exit_code = term.get("exitCode")
                    message = term.get("message")
    return JobObservation(
        name=job["metadata"]["name"],
        revision=_revision(job),
        created=job["metadata"].get("creationTimestamp") or "",
        active=st.get("active") or 0,
        succeeded=complete,
        failed=failed is not None,
        failure_reason=(failed or {}).get("reason") or "",
        failure_message=(failed or {}).get("message") or "",
        exit_code=exit_code,
        termination_message=message,
    )


def _pod_observation(pod: dict[str, Any]) -> PodObservation:
    st = pod.get("status") or {}
    unschedulable = None
    ready = False
    not_ready_since = None
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "False" and cond.get("lastTransitionTime"):
            not_ready_since = dt.datetime.fromisoformat(cond["lastTransitionTime"].replace("Z", "+00:00"))
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            unschedulable = cond.get("message") or "Unschedulable"
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            ready = True
    waiting = None
    restarts = 0
    last_reason = None
    for cs in st.get("containerStatuses") or []:
        restarts += cs.get("restartCount") or 0
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason:
            waiting = reason
        last = ((cs.get("lastState") or {}).get("terminated") or {}).get("reason")
        if last:
            last_reason = last
    memory = None
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == serving.CONTAINER:
            memory = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return PodObservation(
        memory_limit=memory,
        not_ready_since=not_ready_since,
        name=pod["metadata"]["name"],
        revision=(pod["metadata"].get("labels") or {}).get(REVISION_LABEL, ""),
        phase=st.get("phase") or "Pending",
        ready=ready,
        unschedulable=unschedulable,
        waiting_reason=waiting,
        restarts=restarts,
        last_termination_reason=last_reason,
    )


def scrape_pods(
    pods: list[dict[str, Any]], model: str, port: int = serving.METRICS_PORT, timeout: float = 1.0
) -> Sample:
    """Sum the /metrics of running pods (pods that cannot be reached are skipped)."""
    urls = [
        f"http://{p['status']['podIP']}:{port}/metrics"
        for p in pods
        if (p.get("status") or {}).get("podIP") and (p.get("status") or {}).get("phase") == "Running"
    ]
    total = Sample()

    def fetch(url: str) -> Sample | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return parse_metrics(resp.read().decode(errors="replace"), model)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    with ThreadPoolExecutor(max_workers=min(8, max(len(urls), 1))) as pool:
        for got in pool.map(fetch, urls):
            if got is not None:
                total.add(got)
    return total


def _ready_pod_url(pods: list[dict[str, Any]], revision: str, model: PretrainedModel) -> str | None:
    """http://POD_IP:PORT of one ready serving pod of `revision`."""
    for pod in pods:
        st = pod.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []
        )
        if (
            (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision
            and ready
            and st.get("podIP")
        ):
            return f"http://{st['podIP']}:{model.spec.serving.port}"
    return None


def _promql(base: str, query: str, label: str) -> list[tuple[str, float]]:
    url = f"{base.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("Prometheus query failed: %s", exc)
        return []
    out = []
    for item in data.get("data", {}).get("result", []):
        try:
            out.append((str(item["metric"].get(label, "")), float(item["value"][1])))
        except (KeyError, IndexError, ValueError):
            continue
    return out
