"""Modules over the fused ops. Each keeps ``conv`` and ``bn`` submodules shaped like
``nn.Conv2d`` / ``nn.BatchNorm2d``, so existing state dicts load unchanged."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as DF
from ._validation import activation_code

__all__ = ["DepthwiseConvBNAct", "PointwiseConvBNAct"]


def _bn_forward_args(module: nn.Module, bn: nn.BatchNorm2d) -> dict:
    """The batch_norm arguments that nn.BatchNorm2d.forward would use (momentum=None means a
    cumulative average; num_batches_tracked is advanced here)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if module.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    training = module.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not module.training or bn.track_running_stats
    return {
        "running_mean": bn.running_mean if use_running else None,
        "running_var": bn.running_var if use_running else None,
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
        "training": training,
        "momentum": momentum,
        "eps": bn.eps,
    }


class _ConvBNAct(nn.Module):
    conv: nn.Conv2d
    bn: nn.BatchNorm2d

    def __init__(self, activation: Optional[str]) -> None:
        super().__init__()
        activation_code(type(self).__name__, activation)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    @staticmethod
    def _check_pair(cls_name: str, conv: nn.Module, bn: nn.Module) -> None:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                f"{cls_name}.from_modules: conv must be nn.Conv2d, got {type(conv).__name__}"
            )
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(
                f"{cls_name}.from_modules: bn must be nn.BatchNorm2d, got {type(bn).__name__}"
            )
        if conv.bias is not None:
            raise ValueError(
                f"{cls_name}.from_modules: conv must have bias=False (BN follows it), got a bias"
            )
        if bn.num_features != conv.out_channels:
            raise ValueError(
                f"{cls_name}.from_modules: bn.num_features must equal conv.out_channels="
                f"{conv.out_channels}, got {bn.num_features}"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{cls_name}.from_modules: conv.padding_mode must be 'zeros', got {conv.padding_mode!r}"
            )


class DepthwiseConvBNAct(_ConvBNAct):
    """Depthwise 3x3 conv (padding 1, stride 1 or 2) + BatchNorm + activation, fused.

    Follows ``train()``/``eval()`` like ``nn.BatchNorm2d``: batch statistics and running-stat
    updates in training, the folded running statistics in eval.
    """

    def __init__(
        self,
        channels: int,
        stride: int = 1,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        activation: Optional[str] = "relu6",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(activation)
        if stride not in (1, 2):
            raise ValueError(f"DepthwiseConvBNAct: stride must be 1 or 2, got {stride!r}")
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False, **kw)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, **kw)

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str] = "relu6"
    ) -> DepthwiseConvBNAct:
        """Take over an existing depthwise ``conv`` and ``bn`` pair (parameters are shared)."""
        name = f"{cls.__name__}"
        cls._check_pair(name, conv, bn)
        C = conv.in_channels
        if not (
            conv.groups == C == conv.out_channels
            and tuple(conv.kernel_size) == (3, 3)
            and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1)
            and conv.stride[0] == conv.stride[1]
            and conv.stride[0] in (1, 2)
        ):
            raise ValueError(
                f"{name}.from_modules: conv must be a depthwise 3x3 conv with padding 1, dilation 1, "
                f"stride 1 or 2 and groups=in_channels=out_channels, got {conv}"
            )
        self = cls.__new__(cls)
        _ConvBNAct.__init__(self, activation)
        self.conv = conv
        self.bn = bn
        return self

    @property
    def stride(self) -> int:
        return int(self.conv.stride[0])

    def forward(self, x: Tensor) -> Tensor:
        return DF.depthwise_conv_bn_act(
            x,
            self.conv.weight,
            stride=self.stride,
            activation=self.activation,
            **_bn_forward_args(self, self.bn),
        )


class PointwiseConvBNAct(_ConvBNAct):
    """Pointwise 1x1 conv + BatchNorm + activation, fused (a GEMM with a fused epilogue)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        activation: Optional[str] = "relu6",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(activation)
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **kw)

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str] = "relu6"
    ) -> PointwiseConvBNAct:
        """Take over an existing 1x1 ``conv`` and ``bn`` pair (parameters are shared)."""
        name = f"{cls.__name__}"
        cls._check_pair(name, conv, bn)
        if not (
            tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (0, 0)
            and conv.groups == 1
        ):
            raise ValueError(
                f"{name}.from_modules: conv must be a 1x1 conv with stride 1, padding 0 and "
                f"groups=1, got {conv}"
            )
        self = cls.__new__(cls)
        _ConvBNAct.__init__(self, activation)
        self.conv = conv
        self.bn = bn
        return self

    def forward(self, x: Tensor) -> Tensor:
        return DF.pointwise_conv_bn_act(
            x, self.conv.weight, activation=self.activation, **_bn_forward_args(self, self.bn)
        )
