"""The second peer in the benchmark: MLServer running the same ONNX file.

A minimal custom `mlserver.MLModel` whose predict() runs one ONNX Runtime session, as a user of
MLServer's custom-runtime path would write it (like MLServer's own runtimes, the session runs
inside the async predict(), so runs do not overlap). The session options are the KServe peer's
(bench/kserve_model.py): onnxruntime's defaults on the CPU provider. Runs in its own venv
(bench/.venv-mlserver), never imported by the project. MLServer loads it from a model-settings.json
that names it, with the folder holding this file on PYTHONPATH:

    {"name": "m", "implementation": "mlserver_model.OnnxModel",
     "parameters": {"uri": "/path/to/model.onnx"}}

bench/serve_bench.py writes that file and a settings.json (127.0.0.1, free ports, metrics server
off, parallel_workers 0) into a temporary folder and runs `mlserver start FOLDER`.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel  # type: ignore[import-not-found]  # bench/.venv-mlserver only
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found]
from mlserver.types import (  # type: ignore[import-not-found]
    InferenceRequest,
    InferenceResponse,
    ResponseOutput,
)


class OnnxModel(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        path = self.settings.parameters.uri
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        values = self.session.run(self.output_names, feeds)
        outputs: list[ResponseOutput] = [
            NumpyCodec.encode_output(name, np.ascontiguousarray(array))
            for name, array in zip(self.output_names, values, strict=True)
        ]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)
