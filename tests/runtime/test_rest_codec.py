"""The REST codec (pure): V2 JSON, the binary extension, strict decoding, and a hypothesis fuzz."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptm_runtime.serve.dataplane import InferResponse, OutputTensor, array_from_list
from ptm_runtime.serve.errors import InvalidInput
from ptm_runtime.serve.rest import encode_infer_response, parse_infer_request

MAX_ELEMENTS = 1 << 20


def _body(doc: dict[str, Any], binary: bytes = b"") -> tuple[bytes, int | None]:
    header = json.dumps(doc).encode()
    return header + binary, (len(header) if binary else None)


def test_json_request_nested_or_flat() -> None:
    for data in ([1, 2, 3, 4, 5, 6], [[1, 2, 3], [4, 5, 6]]):
        body, n = _body(
            {"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": data}]}
        )
        request, binary = parse_infer_request(body, n, MAX_ELEMENTS)
        assert request.id == "r1" and binary is False
        np.testing.assert_array_equal(request.inputs[0].data, np.arange(1, 7, dtype=np.float32).reshape(2, 3))
        assert request.inputs[0].data.dtype == np.float32


def test_binary_inputs_and_output_flags() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    k = np.array([[1, -2]], dtype=np.int64)
    doc = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}},
            {"name": "k", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": k.nbytes}},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "s"}],
    }
    body, n = _body(doc, x.tobytes() + k.tobytes())
    request, binary = parse_infer_request(body, n, MAX_ELEMENTS)
    np.testing.assert_array_equal(request.inputs[0].data, x)
    np.testing.assert_array_equal(request.inputs[1].data, k)
    assert binary == {"y": True, "s": False}
    assert [o.name for o in request.outputs or []] == ["y", "s"]


@pytest.mark.parametrize(
    ("doc", "binary", "header", "message"),
    [
        ({"inputs": []}, b"", None, "non-empty 'inputs'"),
        (
            {"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]},
            b"",
            None,
            "'FP99' is not supported",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]},
            b"",
            None,
            "1 data elements, but shape",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]},
            b"",
            None,
            "must not contain number",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}]},
            b"",
            None,
            "outside the UINT8 range",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]},
            b"",
            None,
            "must not contain integer",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [True]}]},
            b"",
            None,
            "must not contain BOOL",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]},
            b"",
            None,
            "values that are not numbers",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3]]}]},
            b"",
            None,
            "ragged",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]},
            b"",
            None,
            "non-negative",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1 << 20, 1 << 20], "data": []}]},
            b"",
            None,
            "more than",
        ),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, b"", None, "neither 'data' nor"),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}
                ]
            },
            b"\0" * 4,
            0,
            "only 4 bytes of binary data remain",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}
                ]
            },
            b"\0" * 4,
            0,
            "4 bytes of data, but shape",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}
                ]
            },
            b"\0" * 8,
            0,
            "4 bytes of binary data follow the JSON header but no input claims them",
        ),
        (
            {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                "outputs": [{"name": "y", "parameters": {"classification": 3}}],
            },
            b"",
            None,
            "classification extension",
        ),
    ],
)
def test_bad_requests_name_the_problem(
    doc: dict[str, Any], binary: bytes, header: int | None, message: str
) -> None:
    body, n = _body(doc, binary)
    if header is not None:
        n = len(body) - len(binary)
    with pytest.raises(InvalidInput, match=message):
        parse_infer_request(body, n, MAX_ELEMENTS)


def test_garbage_and_nan_literals_are_refused() -> None:
    with pytest.raises(InvalidInput, match="not valid JSON"):
        parse_infer_request(b"{nope", None, MAX_ELEMENTS)
    with pytest.raises(InvalidInput, match="NaN, which is not valid JSON"):
        parse_infer_request(
            b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[NaN]}]}', None, MAX_ELEMENTS
        )
    with pytest.raises(InvalidInput, match="nested too deeply"):
        parse_infer_request(b"[" * 100000, None, MAX_ELEMENTS)
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length is 99"):
        parse_infer_request(b"{}", 99, MAX_ELEMENTS)


def test_response_json_binary_and_non_finite() -> None:
    y = np.array([[1.5, math.nan], [math.inf, -2.0]], dtype=np.float32)
    s = np.array([[3]], dtype=np.int64)
    response = InferResponse(
        "m", "1", [OutputTensor("y", "FP32", (2, 2), y), OutputTensor("s", "INT64", (1, 1), s)], id="abc"
    )
    body, header = encode_infer_response(response, False)
    assert header is None
    doc = json.loads(body)
    assert doc["id"] == "abc" and doc["outputs"][0]["data"] == [1.5, None, None, -2.0]
    body, header = encode_infer_response(response, {"y": True, "s": False})
    assert header is not None
    doc = json.loads(body[:header])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_array_equal(np.frombuffer(body[header:], np.float32).reshape(2, 2), y)  # NaN/Inf exact
    assert doc["outputs"][1]["data"] == [3]


def test_array_from_list_accepts_ints_for_floats_and_checks_ranges() -> None:
    assert array_from_list("x", "FP16", (2,), [1, 2.5]).dtype == np.float16
    np.testing.assert_array_equal(
        array_from_list("x", "INT8", (2,), [-128, 127]), np.array([-128, 127], np.int8)
    )
    np.testing.assert_array_equal(array_from_list("x", "BOOL", (1, 2), [[True, False]]), [[True, False]])


# --- property tests: whatever arrives, the parser answers or raises InvalidInput --------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_datatypes = st.sampled_from(
    ["BOOL", "INT8", "INT32", "INT64", "UINT8", "FP16", "FP32", "FP64", "BYTES", "", "fp32"]
)
_shapes = st.lists(st.integers(min_value=-2, max_value=6), max_size=4) | _json_values
_inputs = st.fixed_dictionaries(
    {"name": st.text(max_size=4) | _json_values, "datatype": _datatypes, "shape": _shapes},
    optional={
        "data": _json_values | st.lists(st.integers(-300, 300) | st.floats(allow_nan=False), max_size=40),
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-4, 64) | _json_values}
        ),
    },
)
_docs = st.fixed_dictionaries(
    {"inputs": st.lists(_inputs, max_size=3) | _json_values},
    optional={"outputs": _json_values, "parameters": _json_values, "id": _json_values},
)


def _check(body: bytes, header: int | None) -> None:
    try:
        request, _ = parse_infer_request(body, header, 4096)
    except InvalidInput as exc:
        assert exc.message
        return
    for tensor in request.inputs:  # what is accepted is exactly what was declared
        assert tensor.data.shape == tensor.shape


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_docs, binary=st.binary(max_size=64), split=st.integers(-2, 200) | st.none())
def test_structured_requests_never_escape_invalid_input(
    doc: dict[str, Any], binary: bytes, split: int | None
) -> None:
    header = json.dumps(doc).encode()
    if split is None:
        _check(header, None)
    else:
        _check(header + binary, min(split, len(header)) if split >= 0 else split)
        _check(header + binary, len(header))


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=256), header=st.integers(-5, 300) | st.none())
def test_arbitrary_bytes_never_escape_invalid_input(body: bytes, header: int | None) -> None:
    _check(body, header)


def test_binary_size_mismatch_of_every_datatype() -> None:
    for datatype, size in [("FP64", 8), ("FP16", 2), ("INT16", 2), ("UINT64", 8), ("BOOL", 1)]:
        doc = {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": [3],
                    "parameters": {"binary_data_size": 2 * size},
                }
            ]
        }
        body, n = _body(doc, struct.pack("<" + "x" * 2 * size))
        with pytest.raises(InvalidInput, match=f"needs {3 * size}"):
            parse_infer_request(body, n, MAX_ELEMENTS)
