"""kopfcost: what kopf would do per watch event that the operator needs not, off with the installed kopf."""

from __future__ import annotations

import json
import logging

import kopf
import orjson
import pytest
from kopf._cogs.clients import api

from ptm_operator import kopfcost

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "p", "namespace": "ns", "managedFields": [{"manager": "kubelet"}] * 50},
    "spec": {"containers": [{"name": "c", "image": "i"}]},
    "status": {"phase": "Running"},
}


def test_no_diff_base_is_built_stored_or_read() -> None:
    storage = kopfcost.NoDiffBase()
    body = kopf.Body(POD)
    assert storage.build(body=body) == {}
    assert storage.fetch(body=body) is None
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=kopf.BodyEssence(spec={"x": 1}))
    assert not patch  # nothing written on the object


def test_configure_sets_the_storage() -> None:
    settings = kopf.OperatorSettings()
    kopfcost.configure(settings)
    assert isinstance(settings.persistence.diffbase_storage, kopfcost.NoDiffBase)


def test_watch_streams_parse_with_orjson_on_the_installed_kopf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "json", json)
    assert kopfcost.parse_watch_streams_with_orjson()
    assert api.json.loads is orjson.loads
    line = json.dumps({"type": "MODIFIED", "object": POD})
    assert api.json.loads(line) == json.loads(line)
    assert api.json.dumps({"a": [1, 2]}) == json.dumps({"a": [1, 2]})  # the rest is the stdlib's
    assert kopfcost.parse_watch_streams_with_orjson()  # twice is fine


def test_a_moved_parser_leaves_kopf_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Elsewhere:
        loads = staticmethod(json.loads)

    monkeypatch.setattr(api, "json", Elsewhere)
    with caplog.at_level(logging.WARNING, logger="ptm_operator.kopfcost"):
        assert not kopfcost.parse_watch_streams_with_orjson()
    assert api.json is Elsewhere
