"""MobileNetV1 layer shapes, written once and used by the model, the tests, the benchmarks and
the report.

MobileNetV1 (Howard et al. 2017, Table 1): a 3x3 stride-2 stem with 32*alpha channels, then 13
depthwise-separable blocks (depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN + ReLU6), then global
average pooling and a classifier. Channel counts are ``int(c * alpha)``.
"""

from __future__ import annotations

from dataclasses import dataclass

STEM_CHANNELS = 32
# (depthwise stride, pointwise output channels) of the 13 blocks at alpha = 1. The last
# depthwise is stride 1 (the paper's table has a typo there).
BLOCKS: tuple[tuple[int, int], ...] = (
    (1, 64),
    (2, 128),
    (1, 128),
    (2, 256),
    (1, 256),
    (2, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (2, 1024),
    (1, 1024),
)
# timm groups the blocks in stages of 1, 2, 2, 6 and 2 (output strides 2, 4, 8, 16, 32).
STAGE_SIZES: tuple[int, ...] = (1, 2, 2, 6, 2)


def channels(c: int, alpha: float) -> int:
    """Width multiplier: ``int(c * alpha)``."""
    return int(c * alpha)


def conv_out(size: int, stride: int) -> int:
    """Output size of a 3x3, padding-1 conv."""
    return (size - 1) // stride + 1


@dataclass(frozen=True)
class DepthwiseLayer:
    index: int
    batch: int
    channels: int
    height: int
    width: int
    stride: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return conv_out(self.height, self.stride), conv_out(self.width, self.stride)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def name(self) -> str:
        return f"dw{self.index:02d}_c{self.channels}_{self.height}x{self.width}_s{self.stride}"


@dataclass(frozen=True)
class PointwiseLayer:
    index: int
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def name(self) -> str:
        return (
            f"pw{self.index:02d}_{self.in_channels}to{self.out_channels}_{self.height}x{self.width}"
        )


def mobilenet_v1_layers(
    alpha: float = 1.0, resolution: int = 224, batch: int = 1
) -> tuple[list[DepthwiseLayer], list[PointwiseLayer]]:
    """The 13 depthwise and 13 pointwise layer shapes of MobileNetV1 at (alpha, resolution)."""
    h = w = conv_out(resolution, 2)  # stem
    cin = channels(STEM_CHANNELS, alpha)
    dws: list[DepthwiseLayer] = []
    pws: list[PointwiseLayer] = []
    for i, (stride, cout) in enumerate(BLOCKS):
        dws.append(DepthwiseLayer(i, batch, cin, h, w, stride))
        h, w = conv_out(h, stride), conv_out(w, stride)
        c = channels(cout, alpha)
        pws.append(PointwiseLayer(i, batch, cin, c, h, w))
        cin = c
    return dws, pws
