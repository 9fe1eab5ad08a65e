"""Pure-PyTorch reference implementations of the fused ops.

They define the semantics every backend must meet, serve as the ``"torch"`` backend (they are
differentiable through PyTorch's autograd), and are the oracle in the tests (called on float64
copies of the inputs).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def apply_activation(z: Tensor, activation: Optional[str]) -> Tensor:
    """``relu6``, ``relu`` or ``None`` (identity)."""
    if activation == "relu6":
        return F.relu6(z)
    if activation == "relu":
        return F.relu(z)
    if activation is None:
        return z
    raise ValueError(f"activation must be 'relu6', 'relu' or None, got {activation!r}")


def depthwise_conv_bn_act(
    x: Tensor,
    weight: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    *,
    stride: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = "relu6",
) -> Tensor:
    """``act(batch_norm(conv2d(x, weight, stride=stride, padding=1, groups=C)))``."""
    z = F.conv2d(x, weight, None, stride, 1, 1, x.shape[1])
    z = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return apply_activation(z, activation)


def pointwise_conv_bn_act(
    x: Tensor,
    weight: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = "relu6",
) -> Tensor:
    """``act(batch_norm(conv2d(x, weight)))`` with a (Cout, Cin, 1, 1) weight."""
    z = F.conv2d(x, weight)
    z = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return apply_activation(z, activation)
