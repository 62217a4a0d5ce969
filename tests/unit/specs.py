"""Spec parts several unit-test modules build their models from (fresh copies: tests may mutate)."""

from __future__ import annotations

from typing import Any


def resnet_s3_source() -> dict[str, Any]:
    """A torchvision resnet50 state dict on S3 with a credentials Secret (examples/vision-resnet.yaml)."""
    return {
        "uri": "s3://models/vision/resnet50/weights.pt",
        "format": "pytorch-state-dict",
        "architecture": "torchvision.models:resnet50",
        "credentialsSecretRef": {"name": "s3-models"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 3, 224, 224]}],
    }
