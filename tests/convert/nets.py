"""Small models the converter tests build; importable as `tests.convert.nets:FACTORY`, the
`module:factory` form that pytorch-state-dict sources name as their architecture."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp() -> nn.Module:
    """[batch, 16] -> [batch, 4] scores."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def tiny_cnn() -> nn.Module:
    """[batch, 3, 16, 16] -> [batch, 5] scores."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


class TwoHeads(nn.Module):
    """Two named outputs (a dict), so output naming and multi-output metrics are exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.scores = nn.Linear(32, 3)
        self.embedding = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"scores": self.scores(h), "embedding": self.embedding(h)}


def two_heads() -> nn.Module:
    return TwoHeads()


@torch.library.custom_op("ptmtest::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone() * 2


@_mystery.register_fake
def _mystery_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Mystery(nn.Module):
    """Uses an operator that no ONNX exporter knows."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_mystery(x))


def mystery() -> nn.Module:
    return Mystery()
