"""Models built on the fused ops."""

from .mobilenet_v1 import (
    FoldedMobileNetV1,
    FrozenMobileNetV1,
    MobileNetV1,
    ReferenceMobileNetV1,
    mobilenet_v1,
    model_complexity,
    model_summary,
)

__all__ = [
    "FoldedMobileNetV1",
    "FrozenMobileNetV1",
    "MobileNetV1",
    "ReferenceMobileNetV1",
    "mobilenet_v1",
    "model_complexity",
    "model_summary",
]
