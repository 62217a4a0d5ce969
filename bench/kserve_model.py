"""The peer in the benchmark: KServe's Python ModelServer running the same ONNX file.

A minimal `kserve.Model` whose predict() runs one ONNX Runtime session, as a user of KServe's
custom-model path would write it. Runs in its own venv (bench/.venv-kserve), never imported by
the project:

    bench/.venv-kserve/bin/python bench/kserve_model.py --model_name m --model_path model.onnx \
        --http_port 8090 --grpc_port 8091
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import numpy as np
import onnxruntime as ort
from kserve import (  # type: ignore[import-not-found]  # bench/.venv-kserve only
    InferOutput,
    InferRequest,
    InferResponse,
    Model,
    ModelServer,
    model_server,
)

_V2 = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
}


class OnnxModel(Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return True

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        values = self.session.run(self.output_names, feeds)
        outputs = []
        for name, array in zip(self.output_names, values, strict=True):
            out = InferOutput(name=name, shape=list(array.shape), datatype=_V2[array.dtype])
            out.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return InferResponse(
            model_name=self.name,
            infer_outputs=outputs,
            response_id=payload.id or str(uuid.uuid4()),
            use_binary_outputs=payload.use_binary_outputs,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port).start(
        [OnnxModel(args.model_name, args.model_path)]
    )
