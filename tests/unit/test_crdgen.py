"""The CRD generator: structural output, Kubernetes extensions, the committed files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ptm_operator import GROUP, KIND, PLURAL, VERSION
from ptm_operator.cli import main as ptm_main
from ptm_operator.crdgen import (
    CHART_CRD_FILE,
    CRD_FILE,
    OUTPUTS,
    crd,
    main,
    openapi_schema,
    render,
    stale,
    structural,
    write,
)

REPO = Path(__file__).resolve().parents[2]

#: Keys a structural schema node may carry (OpenAPI v3 subset + Kubernetes extensions).
ALLOWED_KEYS = {
    "description",
    "type",
    "format",
    "enum",
    "default",
    "nullable",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "anyOf",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
}


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.strip(".").split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


SCHEMA = openapi_schema()
SPEC = SCHEMA["properties"]["spec"]
STATUS = SCHEMA["properties"]["status"]


def test_committed_crd_files_equal_the_generator_output() -> None:
    assert stale(REPO) == [], "run `ptm crd` and commit the result"
    assert (REPO / CRD_FILE).read_text() == (REPO / CHART_CRD_FILE).read_text() == render()


def test_crd_identity() -> None:
    manifest = crd()
    assert manifest["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    names = manifest["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (KIND, PLURAL, ["ptm"])
    assert manifest["spec"]["scope"] == "Namespaced"
    (version,) = manifest["spec"]["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Ready", "Revision", "Precision", "Canary", "Endpoint", "Age"]


def structural_problems(path: str, node: dict[str, Any]) -> list[str]:
    problems = [f"{path}: unexpected {key}" for key in sorted(set(node) - ALLOWED_KEYS)]
    if node.get("x-kubernetes-int-or-string"):
        if "type" in node:
            problems.append(f"{path}: int-or-string has no type")
    elif node.get("type") not in {"object", "array", "string", "integer", "number", "boolean"}:
        problems.append(f"{path}: no type")
    problems += [
        f"{path}: OpenAPI v3 {bound} is a boolean"
        for bound in ("exclusiveMinimum", "exclusiveMaximum")
        if bound in node and node[bound] is not True
    ]
    if (
        node.get("type") == "object"
        and path not in {"", ".metadata"}
        and not (
            "properties" in node
            or "additionalProperties" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
        )
    ):
        problems.append(f"{path}: object without properties")
    problems += [
        f"{path}: malformed rule {rule}"
        for rule in node.get("x-kubernetes-validations", [])
        if not (set(rule) <= {"rule", "message", "fieldPath"} and rule.get("message"))
    ]
    return problems


def test_every_node_is_structural() -> None:
    nodes = list(walk(SCHEMA))
    assert len(nodes) > 100
    assert [p for path, node in nodes for p in structural_problems(path, node)] == []


@pytest.mark.parametrize(
    "node",
    [
        {"properties": {}},
        {"type": "object"},
        {"type": "number", "exclusiveMinimum": 0},
        {"type": "string", "title": "T"},
        {"type": "string", "x-kubernetes-int-or-string": True},
        {"type": "object", "properties": {}, "x-kubernetes-validations": [{"rule": "true"}]},
    ],
)
def test_structural_check_catches_problems(node: dict[str, Any]) -> None:
    assert structural_problems(".x", node) != []


def test_every_spec_and_status_field_is_described() -> None:
    """kubectl explain is only useful when every field says what it is."""
    undescribed = [
        path
        for root, prefix in ((SPEC, ".spec"), (STATUS, ".status"))
        for path, node in walk(root, prefix)
        if not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert undescribed == []


def test_no_yaml_anchors_or_python_tags() -> None:
    text = render()
    assert "&id" not in text and "*id" not in text and "!!python" not in text
    assert yaml.safe_load(text) == crd()


@pytest.mark.parametrize(
    ("path", "default"),
    [
        (".source.allowPickle", False),
        (".serving.replicas", 1),
        (".serving.port", 8080),
        (".optimization.precision", ["fp32"]),
        (".rollout.strategy", "Canary"),
        (".validation.failurePolicy", "Block"),
        (".remediation.memoryBumpOnOOM.ceiling", "16Gi"),
    ],
)
def test_defaults(path: str, default: Any) -> None:
    assert at(SPEC, path)["default"] == default


def test_sections_default_to_complete_objects() -> None:
    """A section default must satisfy the section's CEL rules as written: the API server checks
    defaults without applying nested defaults first."""
    for section in ("conversion", "optimization", "validation", "serving", "rollout", "remediation"):
        node = SPEC["properties"][section]
        assert isinstance(node["default"], dict), section
    assert SPEC["properties"]["serving"]["default"]["port"] == 8080
    assert SPEC["properties"]["optimization"]["default"]["quantization"]["mode"] == "dynamic"
    assert SPEC["required"] == ["source"]
    assert SCHEMA["required"] == ["spec"]


def test_status_has_no_defaults_and_conditions_are_a_map() -> None:
    assert not [p for p, n in walk(STATUS, ".status") if "default" in n]
    conditions = STATUS["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) >= {"type", "status", "reason", "lastTransitionTime"}
    assert conditions["items"]["properties"]["lastTransitionTime"]["format"] == "date-time"
    revisions = STATUS["properties"]["revisions"]
    assert (revisions["x-kubernetes-list-type"], revisions["x-kubernetes-list-map-keys"]) == (
        "map",
        ["revision"],
    )


@pytest.mark.parametrize(
    ("path", "snippet"),
    [
        (".source", "has(self.architecture)"),
        (".source", "self.uri.startsWith(p)"),
        (".source", "credentialsSecretRef"),
        (".optimization.quantization", "has(self.calibration)"),
        (".optimization", "int8-static"),
        (".serving", "self.port != self.grpcPort"),
        (".serving.autoscaling", "self.minReplicas <= self.maxReplicas"),
        (".serving.resources.limits", "nvidia.com/gpu"),
        (".serving.resources.requests", ">= 0"),
        (".rollout", "isSorted()"),
        (".rollout.steps.[]", "has(self.setWeight)"),
        (".rollout.trafficRouting", "gatewayAPI"),
        (".rollout.analysis", "goldenSet"),
        (".source.inputs.[]", "self.shape.all"),
    ],
)
def test_cel_rules_are_carried(path: str, snippet: str) -> None:
    rules = at(SPEC, path).get("x-kubernetes-validations", [])
    assert any(snippet in r["rule"] for r in rules), rules


def test_lists_and_maps_with_rules_are_bounded() -> None:
    """CEL cost estimates need maxItems / maxProperties / maxLength where rules iterate."""
    assert at(SPEC, ".rollout.steps")["maxItems"] <= 64
    assert at(SPEC, ".serving.resources.limits")["maxProperties"] <= 64
    assert at(SPEC, ".source.uri")["maxLength"] <= 4096
    assert at(SPEC, ".source.inputs")["maxItems"] <= 64


def test_free_form_objects_preserve_unknown_fields() -> None:
    assert at(SPEC, ".serving.affinity")["x-kubernetes-preserve-unknown-fields"] is True
    assert at(SPEC, ".serving.topologySpreadConstraints.[]")["x-kubernetes-preserve-unknown-fields"] is True
    quantity = at(SPEC, ".serving.resources.limits")["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] is True


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}, {"type": "string"}),
        (
            {"anyOf": [{"$ref": "#/$defs/E"}, {"type": "null"}], "description": "d"},
            {"description": "d", "type": "string", "enum": ["a"]},
        ),
        (
            {"$ref": "#/$defs/E", "default": "a", "description": "site"},
            {"description": "site", "type": "string", "enum": ["a"], "default": "a"},
        ),
        ({"allOf": [{"$ref": "#/$defs/E"}]}, {"description": "An enum.", "type": "string", "enum": ["a"]}),
        ({"const": "x", "type": "string"}, {"type": "string", "enum": ["x"]}),
        (
            {"type": "object", "additionalProperties": True},
            {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string", "title": "A"}},
                "additionalProperties": False,
                "title": "T",
            },
            {"type": "object", "properties": {"a": {"type": "string"}}},
        ),
        (
            {"type": "object", "additionalProperties": {"type": "string"}, "maxLength": 4},
            {"type": "object", "maxProperties": 4, "additionalProperties": {"type": "string"}},
        ),
        (
            {"type": "number", "exclusiveMinimum": 1},
            {"type": "number", "minimum": 1, "exclusiveMinimum": True},
        ),
        (
            {"type": "number", "exclusiveMaximum": 2},
            {"type": "number", "maximum": 2, "exclusiveMaximum": True},
        ),
        (
            {"type": "string", "description": "one\n    line\n\nnext"},
            {"description": "one line\n\nnext", "type": "string"},
        ),
        (
            {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
            {"type": "array", "items": {"type": "integer"}},
        ),
    ],
)
def test_structural_translation(given: dict[str, Any], expected: dict[str, Any]) -> None:
    defs = {"E": {"enum": ["a"], "type": "string", "title": "E", "description": "An enum."}}
    assert structural(given, defs) == expected


def test_status_defaults_are_dropped_on_request() -> None:
    node = {"type": "object", "properties": {"a": {"type": "integer", "default": 3}}}
    assert structural(node, {}, keep_defaults=False) == {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
    }


def test_write_and_check(tmp_path: Path) -> None:
    messages: list[str] = []
    assert main(["--check", "--root", str(tmp_path)], out=messages.append) == 1
    assert len(messages) == len(OUTPUTS)

    assert sorted(write(tmp_path)) == sorted(OUTPUTS)
    assert write(tmp_path) == []  # idempotent
    assert main(["--check", "--root", str(tmp_path)]) == 0

    (tmp_path / CHART_CRD_FILE).write_text(render().replace("PretrainedModel", "Tampered", 1))
    messages.clear()
    assert main(["--check", "--root", str(tmp_path)], out=messages.append) == 1
    assert messages == [f"{CHART_CRD_FILE} is stale: run `ptm crd` to regenerate it"]


def test_ptm_crd_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ptm_main(["crd", "--root", str(tmp_path)]) == 0
    assert (tmp_path / CRD_FILE).read_text() == render()
    assert ptm_main(["crd", "--check", "--root", str(tmp_path)]) == 0
    assert ptm_main(["crd", "--stdout"]) == 0
    assert capsys.readouterr().out.endswith(render())
