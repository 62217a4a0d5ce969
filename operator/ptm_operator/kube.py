"""The only module that talks to the Kubernetes API: observe children, server-side apply, delete.

The operator observes children from its watch-fed index (children.py, handlers.py) and reads
here only what the index cannot give; without an index (`ptm plan`) it lists children by label.
Writes are server-side apply with field manager `ptm-operator`, so re-applying an unchanged
manifest is a no-op and a restarted operator never duplicates what it created before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ptm_operator.analysis import LATENCY_BUCKET, REQUESTS, Sample, is_server_error, parse_metrics
from ptm_operator.api import PretrainedModel
from ptm_operator.builders import jobs, serving
from ptm_operator.builders.names import FIELD_MANAGER, selector
from ptm_operator.children import (
    Children,
    ChildView,
    deployment_record,
    job_record,
    pod_record,
    reports_missing,
    view,
)
from ptm_operator.observed import Observed
from ptm_operator.planning import IN_CONVERSION
from ptm_operator.rollout import needs_samples

log = logging.getLogger(__name__)

#: How long an applied manifest is trusted before it is applied again unchanged (drift repair).
APPLY_TTL_SECONDS = 300.0

#: How long an apply waits for the same one in flight on another thread before sending its own.
APPLY_WAIT_SECONDS = 60.0

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


def _model_path(namespace: str, name: str) -> str:
    from ptm_operator import GROUP, PLURAL, VERSION

    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


def resource_of(path: str) -> str:
    """`pods`, `pretrainedmodels/status`, ... of an API path (for request metrics)."""
    parts = [p for p in path.split("/") if p]
    if "namespaces" in parts:
        i = parts.index("namespaces")
        rest = parts[i + 2 :]
        if not rest:
            return "namespaces"
        return "/".join(rest[0:1] + rest[2:3])
    if parts[:1] == ["apis"] and len(parts) >= 4:
        return "/".join(parts[3:4] + parts[5:6])
    if parts[:1] == ["api"] and len(parts) >= 3:
        return "/".join(parts[2:3] + parts[4:5])
    return path


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class Kube:
    """Observe and change one namespace's ptm children through one ApiClient (plain dicts)."""

    def __init__(
        self,
        api_client: client.ApiClient,
        prometheus_url: str | None = None,
        on_request: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.api = api_client
        self.prometheus_url = prometheus_url
        self.on_request = on_request
        """Called with (verb, resource, seconds) after every request (the operator's metrics)."""
        self._keda: bool | None = None
        self._goldens: dict[str, Any] = {}
        self._applied: dict[str, tuple[str, float]] = {}
        self._applying: dict[str, tuple[str, threading.Event]] = {}
        """path -> (digest, set when done) of applies in flight: a slow one is not sent twice."""
        self._apply_lock = threading.Lock()

    # --- reads -------------------------------------------------------------------------------

    def _list(
        self, api_version: str, kind: str, namespace: str, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        path = _path(api_version, kind, namespace)
        data = self._request("GET", path, "application/json", None, [("labelSelector", _selector(labels))])
        items: list[dict[str, Any]] = data.get("items") or []
        return items

    def observe(self, model: PretrainedModel, cached: Children | None = None) -> Observed:
        """What planning needs about the model's children.

        `cached`: the model's children from the watch-fed index (handlers.py); then nothing
        is read unless a finished Job's pod end is not there yet (separate watch streams) and
        its report is about to be read. Without it, label-selected LISTs as `ptm plan` does.
        """
        ns = model.metadata.namespace or "default"
        name = model.metadata.name
        if cached is None:
            found = self.list_children(model)
        elif reports_missing(model, cached):
            found = Children(jobs=cached.jobs, deployments=cached.deployments)
            found.pods = [p for p in cached.pods if p.component == serving.COMPONENT]
            for component in (jobs.COMPONENT, jobs.POLL_COMPONENT):
                found.pods += [pod_record(p) for p in self._list("v1", "Pod", ns, selector(name, component))]
        else:
            found = cached
        children = view(found)
        revisions = [r.revision for r in model.status.revisions]
        self.forget_missing(
            "batch/v1", "Job", ns, {jobs.job_name(model, r) for r in revisions}, children.job_names
        )
        self.forget_missing(
            "apps/v1",
            "Deployment",
            ns,
            {serving.deployment_name(model, r) for r in revisions},
            children.deployment_names,
        )
        samples: dict[str, Sample] = {}
        if needs_samples(model):
            measured = {r for r in (model.status.stable_revision, model.status.canary_revision) if r}
            for rev in measured:
                observed_dep = children.deployments.get(rev)
                if observed_dep is None:
                    continue
                if self.prometheus_url:
                    samples[rev] = self._prometheus_sample(ns, observed_dep.name, name)
                else:
                    ips = [
                        children.pod_ips[p.name]
                        for p in children.pods
                        if p.revision == rev and p.phase == "Running" and p.name in children.pod_ips
                    ]
                    samples[rev] = scrape_pods(ips, name)
        agreement = None
        golden = model.spec.rollout.analysis.golden_set
        canary, stable = model.status.canary_revision, model.status.stable_revision
        if samples and golden is not None and canary and stable:
            agreement = self._golden_agreement(
                model,
                golden.uri,
                _ready_pod_url(children, canary, model),
                _ready_pod_url(children, stable, model),
            )
        return Observed(
            agreement=agreement,
            jobs=children.jobs,
            deployments=children.deployments,
            pods=children.pods,
            polls=children.polls,
            samples=samples,
            keda_available=self.keda_available() if model.spec.serving.autoscaling else False,
        )

    def list_children(self, model: PretrainedModel) -> Children:
        """The model's children by label-selected LISTs (pods only where planning reads them)."""
        ns = model.metadata.namespace or "default"
        name = model.metadata.name
        found = Children()
        job_items = self._list("batch/v1", "Job", ns, selector(name, jobs.COMPONENT))
        found.jobs = [job_record(j) for j in job_items]
        # A Job's pod matters only while its revision converts: later its report is in status.
        converting = {r.revision for r in model.status.revisions if r.state in IN_CONVERSION}
        known = {r.revision for r in model.status.revisions}
        if any(j.job.revision in converting or j.job.revision not in known for j in found.jobs):
            found.pods += [pod_record(p) for p in self._list("v1", "Pod", ns, selector(name, jobs.COMPONENT))]
        if model.spec.source.update_policy.type.value == "Poll":
            polls = self._list("batch/v1", "Job", ns, selector(name, jobs.POLL_COMPONENT))
            found.jobs += [job_record(j) for j in polls]
            if polls:
                found.pods += [
                    pod_record(p) for p in self._list("v1", "Pod", ns, selector(name, jobs.POLL_COMPONENT))
                ]
        found.deployments = [
            deployment_record(d)
            for d in self._list("apps/v1", "Deployment", ns, selector(name, serving.COMPONENT))
        ]
        if found.deployments:
            found.pods += [
                pod_record(p) for p in self._list("v1", "Pod", ns, selector(name, serving.COMPONENT))
            ]
        return found

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

    def patch_status(
        self,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
        uid: str | None = None,
    ) -> dict[str, Any]:
        """Merge-patch the status subresource (nulls clear fields); returns the object as stored.

        With `resource_version` the write is conditional: the API server answers 409 when the
        object changed since (the status was planned from a body that is no longer current).
        With `uid` only, it applies to that object whatever else changed (not to a namesake
        created after a deletion).
        """
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        elif uid:
            body["metadata"] = {"uid": uid}
        stored: dict[str, Any] = self._request(
            "PATCH",
            _model_path(namespace, name) + "/status",
            "application/merge-patch+json",
            body,
            [("fieldManager", FIELD_MANAGER)],
        )
        return stored

    def remove_annotations(self, model: PretrainedModel, keys: list[str]) -> dict[str, Any]:
        """Remove annotations of the model; returns the object as stored."""
        body = {"metadata": {"annotations": dict.fromkeys(keys)}}
        stored: dict[str, Any] = self._request(
            "PATCH",
            _model_path(model.metadata.namespace or "default", model.metadata.name),
            "application/merge-patch+json",
            body,
            [("fieldManager", FIELD_MANAGER)],
        )
        return stored

    def get_model_body(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The PretrainedModel as stored (plain dict), or None when it does not exist."""
        from ptm_operator import GROUP, PLURAL, VERSION

        try:
            body: dict[str, Any] = self._request(
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
        return body

    def get_model(self, namespace: str, name: str) -> PretrainedModel | None:
        """The PretrainedModel as stored, or None when it does not exist."""
        body = self.get_model_body(namespace, name)
        return None if body is None else PretrainedModel.from_body(body)

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
        started = time.monotonic()
        serialized = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*serialized)
            response.read()
            return self.api.response_deserialize(
                response, {"200": "object", "201": "object", "202": "object"}
            ).data
        finally:
            if self.on_request is not None:
                verb = "APPLY" if content_type == "application/apply-patch+yaml" else method
                self.on_request(verb, resource_of(path), time.monotonic() - started)

    def apply(self, manifest: dict[str, Any]) -> bool:
        """Server-side apply (force: the operator owns the fields it sets); False when skipped.

        The same manifest applied within APPLY_TTL_SECONDS is skipped: a reconcile that changes
        nothing then costs no writes. The TTL bounds how long a child changed or deleted behind
        the operator's back stays so (Jobs and Deployments it observes are re-applied at once).
        The same manifest being applied by another thread is waited for, not sent twice.
        """
        meta = manifest["metadata"]
        path = _path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        text = json.dumps(manifest, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        while True:
            now = time.monotonic()
            with self._apply_lock:
                last = self._applied.get(path)
                if last is not None and last[0] == digest and now - last[1] < APPLY_TTL_SECONDS:
                    return False
                running = self._applying.get(path)
                if running is None or running[0] != digest:
                    done = threading.Event()
                    self._applying[path] = (digest, done)
                    break
            running[1].wait(APPLY_WAIT_SECONDS)  # then applied (skipped above) or failed (sent again)
        try:
            query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
            self._request("PATCH", path, "application/apply-patch+yaml", text, query)
            with self._apply_lock:
                self._applied[path] = (digest, now)
        finally:
            with self._apply_lock:
                if self._applying.get(path, (None,))[0] == digest:
                    del self._applying[path]
            done.set()
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


def scrape_pods(ips: list[str], model: str, port: int = serving.METRICS_PORT, timeout: float = 1.0) -> Sample:
    """Sum the /metrics of running pods by IP (pods that cannot be reached are skipped)."""
    urls = [f"http://{ip}:{port}/metrics" for ip in ips]
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


def _ready_pod_url(children: ChildView, revision: str, model: PretrainedModel) -> str | None:
    """http://POD_IP:PORT of one ready serving pod of `revision`."""
    for pod in children.pods:
        ip = children.pod_ips.get(pod.name)
        if pod.revision == revision and pod.ready and ip:
            return f"http://{ip}:{model.spec.serving.port}"
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
