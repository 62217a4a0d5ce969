"""Small ONNX models built with onnx.helper for the runtime tests (no torch, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 7.0
B = np.array([0.25, -1.5, 3.0], dtype=np.float32)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def linear(path: Path) -> Path:
    """x FP32 [b,4], k INT64 [b,2] -> y = x@W+B FP32 [b,3], s = sum(k) INT64 [b,1]."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
            helper.make_node("ReduceSum", ["k", "axes"], ["s"], keepdims=1),
        ],
        "linear",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("s", TensorProto.INT64, ["batch", 1]),
        ],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B"), axes],
    )
    return _save(graph, path)


def linear_reference(x: np.ndarray, k: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": x @ W + B, "s": k.sum(axis=1, keepdims=True)}


def ragged(path: Path) -> Path:
    """x FP32 [b, n] (n dynamic too) -> y = sum over n, FP32 [b, 1]."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "ragged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [axes],
    )
    return _save(graph, path)


def fixed(path: Path) -> Path:
    """No dynamic axis: x FP32 [2,4] -> y = x@W+B [2,3] (batching must stay off)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return _save(graph, path)


def slow(path: Path, size: int = 1024, depth: int = 12) -> Path:
    """x FP32 [b,4] -> y = x + mean(chain of `depth` size x size matmuls scaled by mean(x)) [b,4].

    The chain depends on the input (ONNX Runtime cannot fold it away), so every call costs the
    same fixed compute whatever the batch: a model slow enough to fill queues on purpose.
    """
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        helper.make_node("Mul", ["A", "m"], ["h0"]),
    ]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "A"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"h{depth}"], ["r"], keepdims=0),
        helper.make_node("Mul", ["r", "zero"], ["r0"]),
        helper.make_node("Add", ["x", "r0"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")],
    )
    return _save(graph, path)


def string_input(path: Path) -> Path:
    """A model with a string input, which the server refuses to load."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["u"])],
        "strings",
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("u", TensorProto.STRING, ["batch"])],
    )
    return _save(graph, path)
