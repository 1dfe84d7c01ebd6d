"""Tiny user models for tests, loadable as ``tests.model_zoo:<factory>`` specs."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvStack", "ResidualNet", "conv_stack", "no_shape_net", "residual_net"]


class ResidualNet(nn.Module):
    """stem → body (3 conv stages) → + stem (a long skip) → pool → head.

    The stem's output is read again after the whole body, so every cut inside the body
    carries two tensors: the running activation and the skip.
    """

    def __init__(self, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()) for _ in range(3))
        )
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        y = self.body(skip) + skip
        return self.head(y.mean(dim=(2, 3)))


def residual_net() -> ResidualNet:
    return ResidualNet()


residual_net.input_shape = (1, 3, 16, 16)  # type: ignore[attr-defined]


class ConvStack(nn.Module):
    """Wide 3×3 convolutions on a tall feature map, then a small head. Nearly all its time is
    work in proportion to rows (few weights, no tiny maps), so row tiles over three equal nodes
    cut one request's latency on any CPU: the e2e test of a tiled plan."""

    def __init__(self, channels: int = 48, depth: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU())
        self.body = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()) for _ in range(depth))
        )
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def conv_stack() -> ConvStack:
    return ConvStack()


conv_stack.input_shape = (1, 3, 192, 192)  # type: ignore[attr-defined]


def no_shape_net() -> nn.Module:
    """A factory that declares no input shape (ModelSource.input_shape is then required)."""
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU())
