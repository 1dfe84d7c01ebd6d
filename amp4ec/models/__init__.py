"""The model zoo: torchvision-compatible architectures built without torchvision.

Parameter names match torchvision's state_dict keys, so official weights saved to a local
file load with ``ModelSource(name, weights=path)``. Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from amp4ec.models.mobilenet_v2 import mobilenet_v2
from amp4ec.models.resnet import resnet18, resnet50
from amp4ec.models.vit import vit_b_16, vit_tiny

__all__ = [
    "ZOO",
    "ZooEntry",
    "mobilenet_v2",
    "resnet18",
    "resnet50",
    "vit_b_16",
    "vit_tiny",
]


@dataclass(frozen=True)
class ZooEntry:
    """How to build one zoo model and what it takes as input."""

    factory: Callable[[], nn.Module]
    """Builds the model with random weights (seed first for reproducible weights)."""
    input_shape: tuple[int, ...]
    """Default input, batch 1, e.g. ``(1, 3, 224, 224)``."""
    description: str


ZOO: dict[str, ZooEntry] = {
    "mobilenet_v2": ZooEntry(
        mobilenet_v2, (1, 3, 224, 224), "MobileNetV2 (3.5M params, ImageNet head), torchvision layout"
    ),
    "resnet18": ZooEntry(resnet18, (1, 3, 224, 224), "ResNet-18 (11.7M params), torchvision layout"),
    "resnet50": ZooEntry(resnet50, (1, 3, 224, 224), "ResNet-50 (25.6M params), torchvision layout"),
    "vit_tiny": ZooEntry(
        vit_tiny, (1, 3, 224, 224), "ViT patch 16, hidden 192, 6 layers, 3 heads (~3M params)"
    ),
    "vit_b_16": ZooEntry(vit_b_16, (1, 3, 224, 224), "ViT-B/16 (86.6M params), torchvision layout"),
}
