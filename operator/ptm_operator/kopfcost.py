"""What kopf does per watch event that this operator does not need, turned off.

Profiled at N=1000 (bench/operator_scale.py, py-spy on the operator): of the operator's busy
CPU, 80% ran on kopf's event loop, and of that most went to three things no handler here uses:

- a diff-base per event (17%): kopf deep-copies every watched body (pods and Jobs with their
  managedFields and status included) to compare it with the last handled one, for change
  handlers and timers' idle reset. The operator has neither (its work queue decides what a
  change is, children.same_for_planning), so the essence built is empty;
- parsing the watch streams with the standard library's json (23%): orjson parses the same text
  three to four times faster;
- an INFO log line per handler call (4%): "Handler 'index_pods' succeeded", twice for every
  pod, Job and Deployment event (run.py keeps kopf's per-object logger at WARNING unless
  --verbose).
"""

from __future__ import annotations

import importlib
import json
import logging
import types
from typing import Any

import kopf
import orjson

log = logging.getLogger(__name__)


class NoDiffBase(kopf.DiffBaseStorage):
    """No change handlers, so no diff-base: nothing is built, stored or read."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


#: The standard json module with orjson's loads (what kopf's watch stream calls per event).
FAST_JSON = types.SimpleNamespace(**{name: getattr(json, name) for name in json.__all__})
FAST_JSON.loads = orjson.loads


def parse_watch_streams_with_orjson() -> bool:
    """Make kopf's watch streams parse events with orjson; False (and a warning) when the
    installed kopf no longer reads them through its api module's `json` (a kopf upgrade moved
    it: everything still works, only slower)."""
    try:
        api: Any = importlib.import_module("kopf._cogs.clients.api")
    except ImportError:
        api = None
    if getattr(api, "json", None) not in (json, FAST_JSON):
        log.warning("kopf's watch streams keep the standard json parser (kopf's internals moved)")
        return False
    api.json = FAST_JSON
    return True


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.diffbase_storage = NoDiffBase()
    parse_watch_streams_with_orjson()
