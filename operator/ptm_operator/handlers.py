"""Thin kopf handlers: parse -> observe -> plan -> apply -> status. Decisions live in planning.py.

kopf watches; the operator's own work queue reconciles. A model is queued when it appears
(listed at start-up, or ADDED), when it changes where planning looks, when one of its children
changes, when its health timer ticks, and when a plan waits for time (a canary's pause). All
state is in the resource's status and its children, so killing the operator at any point and
starting it again converges to the same result (server-side apply with deterministic names
never duplicates a child).

No kopf change handlers: they wrote a diff-base annotation on every model and ran only after
kopf's finalizer patch came back on the watch (measured at N=1000: a new model's first
reconcile 35-71 s after its creation). kopf still adds its finalizer, for the health timer.

Reconciles read nothing from the API server in the common case: kopf's watch streams of the
models and of the operator's Jobs, Deployments and pods feed in-memory caches (children.py),
and kopf indexes make kopf hold every resource handler until the children's initial listings
are in them, so a restarted operator never plans from a half-filled cache.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from ptm_operator import GROUP, PLURAL, VERSION, kopfcost
from ptm_operator.api import Condition, PretrainedModel
from ptm_operator.builders.names import MANAGED_BY, MANAGED_BY_LABEL
from ptm_operator.builders.store import Store, store_from_settings
from ptm_operator.children import (
    DEPLOYMENT,
    JOB,
    POD,
    ChildIndex,
    ModelCache,
    Record,
    model_key,
    same_for_planning,
    urgent_model_event,
    wakes_owner,
)
from ptm_operator.conditions import set_condition
from ptm_operator.kube import Kube
from ptm_operator.metrics import OperatorMetrics
from ptm_operator.planning import Plan, plan
from ptm_operator.settings import Settings
from ptm_operator.workqueue import Keys

log = logging.getLogger(__name__)


@functools.cache
def settings() -> Settings:
    return Settings()


@functools.cache
def store() -> Store:
    return store_from_settings(settings())


@functools.cache
def kube() -> Kube:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = 64  # work queue, kopf's executor, applies and events share it
    return Kube(
        client.ApiClient(cfg), prometheus_url=settings().prometheus_url, on_request=metrics().api_request
    )


@functools.cache
def metrics() -> OperatorMetrics:
    return OperatorMetrics()


@functools.cache
def child_index() -> ChildIndex:
    return ChildIndex()


@functools.cache
def model_cache() -> ModelCache:
    return ModelCache()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf's own state (a timer's retries) in annotations: the CRD's structural status has no kopf fields."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopfcost.configure(settings)
    settings.posting.level = logging.WARNING  # Events come from plans, few and stable
    settings.scanning.disabled = True  # the CRD is installed by the chart; no cluster-wide CRD watch
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    # One kopf worker per object and kind, alive `idle_timeout` after its last event. Handlers
    # no longer hold workers while they wait, so no cap is needed; a capped stream of pods
    # (a few events each, thousands of pods) would stall every kind's events behind it.
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 1.0
    cfg = globals()["settings"]()
    metrics().serve(cfg.metrics_port, cfg.bind_address)


@kopf.on.cleanup()
def stop_work(**_: Any) -> None:
    """Stop the work queue before kopf and the interpreter shut down the pools it uses."""
    child_queue().close()


@functools.cache
def apply_pool() -> ThreadPoolExecutor:
    """One reconcile's server-side applies run side by side (a Service's apply alone took
    0.5-1.3 s on the loaded benchmark cluster, in series with the Deployment's and the PDB's)."""
    return ThreadPoolExecutor(max_workers=32, thread_name_prefix="ptm-apply")


@functools.cache
def background_pool() -> ThreadPoolExecutor:
    """Applies of BACKGROUND_KINDS, apart from apply_pool, so that a burst of slow Service
    creations never queues a reconcile's Jobs and Deployments."""
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="ptm-apply-bg")


@functools.cache
def event_pool() -> ThreadPoolExecutor:
    """Events are posted in the background: best effort, and no reconcile waits for them."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="ptm-event")


def _post_event(model: PretrainedModel, type_: str, reason: str, message: str) -> None:
    try:
        kube().post_event(model, type_, reason, message)
    except Exception:  # an Event is best effort
        log.warning("cannot post Event %s on %s", reason, key_of(model), exc_info=True)


#: Kinds applied on their own pool: a Service's creation (its ClusterIP allocated) took 0.9-3 s
#: on average on the benchmark's loaded API server at N=1000; on the reconcile's own pool it held
#: a work-queue thread for each new model on its way to the Job. While no revision serves nothing
#: waits for them (a failure is logged and sent again by the next reconcile); once one serves,
#: the reconcile waits for them after its other applies (and for the same apply still in
#: flight), so Ready never precedes the Service. That wait holds a work-queue thread, and so
#: paces the operator: at N=1000 on a saturated control plane, Ready gated on the Service as
#: observed on a watch instead (no thread waiting, the operator's own stages 5x shorter) left
#: more of everything running beside the Services' creation, which the API server serializes,
#: and all Ready came 20-40 s later (bench/RESULTS.md, session 4).
BACKGROUND_KINDS = frozenset({"Service", "PodDisruptionBudget"})


def _apply(manifest: dict[str, Any]) -> bool:
    done = kube().apply(manifest)
    if done:
        metrics().applied.labels(manifest["kind"]).inc()
    return done


def _apply_in_background(manifest: dict[str, Any]) -> None:
    try:
        _apply(manifest)
    except Exception:
        meta = manifest["metadata"]
        log.warning("cannot apply %s %s/%s", manifest["kind"], meta["namespace"], meta["name"], exc_info=True)


def carry_out(model: PretrainedModel, result: Plan) -> None:
    k = kube()
    ns = model.metadata.namespace or "default"
    serving = result.status.stable_revision is not None
    inline = [m for m in result.apply if m["kind"] not in BACKGROUND_KINDS]
    background = [
        background_pool().submit(_apply if serving else _apply_in_background, m)
        for m in result.apply
        if m["kind"] in BACKGROUND_KINDS
    ]
    if len(inline) > 1:
        list(apply_pool().map(_apply, inline))
    else:
        for manifest in inline:
            _apply(manifest)
    if serving:  # Ready is written after this: never before the Service exists
        for future in background:
            future.result()
    for gone in result.delete:
        k.delete(gone.api_version, gone.kind, ns, gone.name)
    if result.route is not None:
        problem = k.set_route_backends(model, *result.route)
        if problem is not None:
            event_pool().submit(_post_event, model, "Warning", "RouteNotManaged", problem)
    for event in result.events:
        event_pool().submit(_post_event, model, event.type, event.reason, event.message)


_locks: dict[str, threading.Lock] = {}
_dirty: set[str] = set()
_locks_guard = threading.Lock()


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


class _Stale(Exception):
    """The status write found the model changed (where planning looks) since the body it was
    planned from; the fresh body is in the model cache."""


#: Plans from a stale body in a row before a reconcile gives up (kopf or the next event retries).
STALE_RETRIES = 3


def reconcile_named(namespace: str, name: str) -> Plan | None:
    """One reconcile of one resource, serialized per object and planned from the newest body.

    Work-queue threads may take the same model at once (queued again while it reconciles).
    Planning from a stale status could undo what another just decided (a rollback, a
    promotion), so each reconcile takes the object's lock, plans from the newest body the model
    cache has seen (the operator's own status writes included) and writes status, conditional
    on that body's resourceVersion, before releasing the lock; a conflict re-reads the model
    and plans again, unless what changed is nothing planning reads (kopf's finalizer or
    annotations: the write is then retried as is). A reconcile already running is asked to run
    once more instead of a second thread waiting for the lock; it then returns None.
    """
    key = f"{namespace}/{name}"
    lock = _lock_for(key)
    if not lock.acquire(blocking=False):
        with _locks_guard:
            _dirty.add(key)
        return None
    try:
        stale = 0
        while True:
            with _locks_guard:
                _dirty.discard(key)
            try:
                result = _reconcile_once(namespace, name)
            except _Stale:  # the fresh body is in the cache now: plan again from it
                stale += 1
                if stale >= STALE_RETRIES:
                    raise
                continue
            with _locks_guard:
                again = key in _dirty
            if not again:
                return result
    finally:
        lock.release()


def _reconcile_once(namespace: str, name: str) -> Plan | None:
    started = time.monotonic()
    k = kube()
    cache = model_cache()
    try:
        body = cache.get(namespace, name)
        if body is None:  # not seen on the watch yet (a child's event came first)
            body = k.get_model_body(namespace, name)
            if body is None:
                return None
            cache.offer(body)
        try:
            model = PretrainedModel.from_body(body)
        except ValidationError as exc:
            _report_invalid_spec(body, exc)
            metrics().reconcile_done("settled", time.monotonic() - started)
            return None
        if model.metadata.deletion_timestamp is not None:
            return None
        observed = k.observe(model, child_index().children(namespace, name))
        result = plan(model, observed, utcnow(), settings(), store())
        carry_out(model, result)
        new_status = result.status_patch(model.status.wire())
        if new_status != model.status.wire():
            stored = _write_status(model, body, new_status)
            if stored is None:
                return None
            cache.offer(stored)
        if result.consume_annotations:
            present = [key for key in result.consume_annotations if key in model.metadata.annotations]
            if present:
                cache.offer(k.remove_annotations(model, present))
    except _Stale:
        metrics().reconcile_done("stale", time.monotonic() - started)
        raise
    except Exception:
        metrics().reconcile_done("error", time.monotonic() - started)
        raise
    metrics().reconcile_done("waiting" if result.requeue_after else "settled", time.monotonic() - started)
    return result


def status_precondition(body: dict[str, Any]) -> str | None:
    """The resourceVersion a status write planned from `body` is conditional on; None for a
    model's first status (written on its uid alone: only this operator writes status, and kopf's
    finalizer patch lands between a model's creation and its first reconcile so often, most new
    models at N=1000, that a conditional first write would mostly cost a 409, a GET and a
    second PATCH)."""
    return (body.get("metadata") or {}).get("resourceVersion") if body.get("status") else None


def _report_invalid_spec(body: dict[str, Any], exc: ValidationError) -> None:
    """Ready=False, reason InvalidSpec, naming the fields (a manifest the CRD schema admitted but
    the models refuse, e.g. written before a validation rule existed). Nothing else is done
    until the spec changes."""
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    meta = body.get("metadata", {})
    log.warning("%s/%s: invalid spec: %s", meta.get("namespace"), meta.get("name"), message)
    old = [Condition.model_validate(c) for c in (body.get("status") or {}).get("conditions", [])]
    conditions = set_condition(old, "Ready", False, "InvalidSpec", message, now=utcnow())
    if conditions == old:
        return
    try:
        stored = kube().patch_status(
            *model_key(body),
            {"conditions": [c.wire() for c in conditions]},
            status_precondition(body),
            uid=meta.get("uid"),
        )
    except ApiException as exc:
        if exc.status == 404:
            return
        raise  # a 409: the work queue tries again from the fresh body in ERROR_BACKOFF
    model_cache().offer(stored)


def _write_status(
    model: PretrainedModel, planned_from: dict[str, Any], status: dict[str, Any]
) -> dict[str, Any] | None:
    """Write status conditional on the resourceVersion planned from; None when the model is gone.

    A conflict whose fresh body differs from the planned one only where planning never looks
    (kopf's finalizer and annotations, managedFields) is retried with the new resourceVersion;
    any other difference raises _Stale and the reconcile plans again from the fresh body. A
    model's first status is written on its uid alone (see status_precondition).
    """
    k = kube()
    ns, name = model_key(planned_from)
    rv = status_precondition(planned_from)
    for _ in range(STALE_RETRIES):
        try:
            return k.patch_status(ns, name, status, rv, uid=model.metadata.uid)
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status != 409:
                raise
        fresh = k.get_model_body(ns, name)
        if fresh is None:
            return None
        model_cache().offer(fresh)
        if not same_for_planning(planned_from, fresh):
            raise _Stale(key_of(model))
        rv = fresh["metadata"].get("resourceVersion")
    raise _Stale(key_of(model))


def key_of(model: PretrainedModel) -> str:
    return f"{model.metadata.namespace or 'default'}/{model.metadata.name}"


#: Retry delay after an unexpected error (API conflicts, 5xx).
ERROR_BACKOFF = 5.0


_MANAGED = {MANAGED_BY_LABEL: MANAGED_BY}


class WorkQueue:
    """Models to reconcile because they or a child changed (urgent), their health timer ticked
    (routine) or a wait for time ended (urgent, when due): each queued once (a burst of events
    for one model is one entry, see workqueue.Keys) and served by a few threads, so event
    handlers return at once and memory stays bounded by the number of models, whatever the
    event rate.

    The threads start serving once the queue is opened: kopf calls no resource handler before
    every kind's initial listing is indexed, and the first handler call opens it. Until then
    the caches are being filled; the models' own listing queues every one of them.
    """

    def __init__(self, workers: int) -> None:
        self._keys: Keys[tuple[str, str]] = Keys()
        self._looked: dict[tuple[str, str], float] = {}
        """Model -> when its last reconcile started (monotonic)."""
        self._ready = threading.Condition()
        self._open = threading.Event()
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._run, name=f"ptm-work-{i}", daemon=True).start()
        metrics().queue_depth.set_function(self.__len__)

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        """Take no more work (the operator is stopping); a reconcile in progress finishes."""
        self._closed = True
        self._open.set()
        with self._ready:
            self._ready.notify_all()

    def add(self, namespace: str, name: str, cause: str, urgent: bool = True) -> None:
        with self._ready:
            self._added(self._keys.add((namespace, name), urgent), cause)

    def add_after(self, namespace: str, name: str, seconds: float, cause: str) -> None:
        with self._ready:
            self._added(self._keys.add_later((namespace, name), time.monotonic() + seconds), cause)

    def _added(self, added: bool, cause: str) -> None:
        """Under the lock: wake a worker for a new entry, count the add either way."""
        if added:
            self._ready.notify()
        metrics().queued.labels(cause, str(not added).lower()).inc()

    def looked_since(self, namespace: str, name: str, seconds: float) -> bool:
        """Whether a reconcile of the model started within the last `seconds`."""
        with self._ready:
            last = self._looked.get((namespace, name))
        return last is not None and time.monotonic() - last < seconds

    def forget(self, namespace: str, name: str) -> None:
        with self._ready:
            self._looked.pop((namespace, name), None)

    def __len__(self) -> int:
        with self._ready:
            return len(self._keys)

    def _run(self) -> None:
        self._open.wait()
        while not self._closed:
            with self._ready:
                key = self._keys.pop(time.monotonic())
                while key is None and not self._closed:
                    due = self._keys.next_due()
                    self._ready.wait(None if due is None else max(0.0, due - time.monotonic()))
                    key = self._keys.pop(time.monotonic())
                if key is None:
                    return
                self._looked[key] = time.monotonic()
            try:
                result = reconcile_named(*key)
            except Exception:
                log.exception("reconcile of %s/%s failed; again in %.0f s", *key, ERROR_BACKOFF)
                self.add_after(*key, ERROR_BACKOFF, "error")
                continue
            # Waiting for a child (a Job, pods) needs no retry: the child's events queue the
            # model. Only a wait for time (a pause, an interval) is queued for later.
            if result is not None and result.timed and result.requeue_after is not None:
                self.add_after(*key, result.requeue_after, "timed")


@functools.cache
def child_queue() -> WorkQueue:
    return WorkQueue(settings().child_workers)


#: Plural -> the kind children.py indexes.
_CHILD_KINDS = {"jobs": JOB, "deployments": DEPLOYMENT, "pods": POD}


def _wake(owner: tuple[str, str] | None, previous: Record | None, current: Record | None, kind: str) -> None:
    """Queue the model owning a child (namespace, model label) when the change is worth it."""
    if owner is not None and wakes_owner(previous, current):
        child_queue().add(owner[0], model_cache().name_for(*owner), kind)


def _index_child(kind: str, body: kopf.Body) -> None:
    _wake(*child_index().upsert(kind, dict(body)), kind)


# Indexes, not plain event handlers, so that kopf holds every resource handler until the
# initial listing of each kind is in the cache (and no index memory: the functions return None).
@kopf.index("batch", "v1", "jobs", labels=_MANAGED, id="ptm-jobs")
async def index_jobs(body: kopf.Body, **_: Any) -> None:
    _index_child(JOB, body)


@kopf.index("apps", "v1", "deployments", labels=_MANAGED, id="ptm-deployments")
async def index_deployments(body: kopf.Body, **_: Any) -> None:
    _index_child(DEPLOYMENT, body)


@kopf.index("", "v1", "pods", labels=_MANAGED, id="ptm-pods")
async def index_pods(body: kopf.Body, **_: Any) -> None:
    _index_child(POD, body)


@kopf.on.event("batch", "v1", "jobs", labels=_MANAGED)
@kopf.on.event("apps", "v1", "deployments", labels=_MANAGED)
@kopf.on.event("", "v1", "pods", labels=_MANAGED)
async def child_event(body: kopf.Body, type: str | None, resource: kopf.Resource, **_: Any) -> None:
    """Deletions (kopf does not call index functions for them); the indexes did the rest.

    Async on purpose: event handlers run on kopf's event loop, not in its thread pool, where
    bodies would wait behind reconciles by the thousand.
    """
    child_queue().open()
    if type != "DELETED":
        return
    kind = _CHILD_KINDS[resource.plural]
    _wake(*child_index().remove(kind, dict(body)), None, kind)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def model_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Keep the newest body of every model (reconciles plan from it instead of a GET) and queue
    the model when it is new or changed where planning looks.

    The echoes of the operator's own status writes (already cached from the write's response)
    and of kopf's finalizer patch queue nothing. A listing (type None: at start-up, and when kopf
    lists again, after a 410 Gone) queues the models it lists behind children's changes, except
    those never reconciled (urgent_model_event).
    """
    queue = child_queue()
    queue.open()
    current = dict(body)
    if type == "DELETED":
        model_cache().forget(current)
        queue.forget(*model_key(current))
    elif model_cache().offer_changed(current):
        queue.add(*model_key(current), "model", urgent=urgent_model_event(type, current))


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    id="health",
    interval=settings().health_interval_seconds,
    initial_delay=2.0,
    backoff=ERROR_BACKOFF,
)
async def health(body: kopf.Body, **_: Any) -> None:
    """Look again on a timer: pods crash, nodes vanish and Jobs end without touching the spec.

    Only a queue entry (deduplicated with children's events); the reconcile runs on the work
    queue's threads, behind children's changes and new models (a thousand timers running
    reconciles in kopf's thread pool once delayed new models' first reconciles by 18-21 s).
    No entry when a reconcile looked within the last half interval (children's changes queue one
    every few seconds while a model converts and starts: at N=1000 the ticks were a third of
    all reconciles, 3.6 per model, on a saturated work queue). A model is looked at least every
    1.5 intervals.
    """
    current = dict(body)
    if current.get("metadata", {}).get("deletionTimestamp"):
        return
    model_cache().offer(current)
    queue = child_queue()
    queue.open()
    key = model_key(current)
    if not queue.looked_since(*key, settings().health_interval_seconds / 2):
        queue.add(*key, "health", urgent=False)
