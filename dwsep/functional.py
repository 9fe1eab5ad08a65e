"""The fused ops: validation, autocast, dispatch to the selected backend, running stats."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validation as V
from . import backends, reference
from .ops import (
    DepthwiseConvBNActFn,
    PointwiseConvBNActFn,
    _as,
    conv_out_hw,
    dw_forward,
    pw_forward,
)

__all__ = ["depthwise_conv_bn_act", "pointwise_conv_bn_act"]


def _autocast_dtype(x: Tensor, weight: Tensor) -> Optional[torch.dtype]:
    """Autocast's dtype when autocast applies to the conv of x and weight (as to F.conv2d),
    else None."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        if x.dtype in (torch.float32, dtype) and weight.dtype in (torch.float32, dtype):
            return dtype
    return None


def _autocast(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Under autocast, run the conv in the autocast dtype (BN tensors stay as they are),
    as F.conv2d would."""
    dtype = _autocast_dtype(x, weight)
    return (x, weight) if dtype is None else (x.to(dtype), weight.to(dtype))


def _update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """running = (1 - momentum) * running + momentum * batch (unbiased variance), as
    F.batch_norm. Both buffers go through multi-tensor ops: one scale of the batch variance,
    then one multi-tensor mul and one add for the pair (three small launches on a GPU, plus a
    dtype conversion only where the buffers are not in the statistics' dtype)."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1)) if count > 1 else var
        bufs = [running_mean, running_var]
        torch._foreach_mul_(bufs, 1.0 - momentum)
        new = [_as(mean, running_mean.dtype), _as(unbiased, running_var.dtype)]
        torch._foreach_add_(bufs, new, alpha=momentum)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    """Fused depthwise 3x3 conv (padding 1) + BatchNorm + activation.

    Same result as ``act(F.batch_norm(F.conv2d(x, weight, None, stride, 1, 1, C), running_mean,
    running_var, bn_weight, bn_bias, training, momentum, eps))``, including the in-place
    running-stat update (unbiased variance) in training mode.

    Args:
        x: (N, C, H, W), contiguous or channels_last (other strides are made dense first).
        weight: (C, 1, 3, 3), same dtype and device as x.
        running_mean, running_var: (C,) or None (only when ``training=True``).
        bn_weight, bn_bias: BN affine (C,) or None.
        stride: 1 or 2.
        training: batch statistics (True) or running statistics (False).
        momentum, eps: as in ``F.batch_norm``.
        activation: ``"relu6"``, ``"relu"`` or ``None``.

    Returns:
        (N, C, floor((H-1)/s)+1, floor((W-1)/s)+1) in x's memory format.
    """
    fn = "dwsep.depthwise_conv_bn_act"
    x = V.check_input(fn, x)
    C = x.shape[1]
    if isinstance(weight, Tensor):  # autocast first: an fp32 weight meets a bf16 x under AMP
        x, weight = _autocast(x, weight)
    weight = V.check_weight(fn, weight, x, (C, 1, 3, 3), "(C, 1, 3, 3) for x's C channels")
    stride = V.check_stride(fn, stride)
    act = V.activation_code(fn, activation)
    V.check_bn(fn, x, C, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], stride)
    count = x.shape[0] * ho * wo
    V.check_batch_count(fn, count, (x.shape[0], C, ho, wo), training)

    backend = backends.resolve(x.device, "depthwise_conv_bn_act", x.dtype)
    if backend == "torch":
        return reference.depthwise_conv_bn_act(
            x,
            weight,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            stride=stride,
            training=training,
            momentum=momentum,
            eps=eps,
            activation=activation,
        )
    fmt = V.memory_format(x)
    x = x.contiguous(memory_format=fmt)
    weight = weight.contiguous()
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, backend, stride, training)
    if _needs_grad(x, weight, bn_weight, bn_bias):
        y, mean, var = DepthwiseConvBNActFn.apply(*args, float(eps), act)
    else:  # no autograd.Function on the inference path (its overhead is per call)
        y, mean, var = dw_forward(*args, float(eps), act)[:3]
    if training and running_mean is not None and count > 0:
        _update_running_stats(running_mean, running_var, mean, var, float(momentum), count)
    return y


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
    """Fused pointwise 1x1 conv (a GEMM) + BatchNorm + activation.

    Same result as ``act(F.batch_norm(F.conv2d(x, weight), running_mean, running_var,
    bn_weight, bn_bias, training, momentum, eps))``, including the running-stat update.

    Args:
        x: (N, Cin, H, W), contiguous or channels_last.
        weight: (Cout, Cin, 1, 1), same dtype and device as x.
        running_mean, running_var, bn_weight, bn_bias: (Cout,) or None, as in F.batch_norm.
        training, momentum, eps, activation: as in :func:`depthwise_conv_bn_act`.

    Returns:
        (N, Cout, H, W) in x's memory format.
    """
    fn = "dwsep.pointwise_conv_bn_act"
    x = V.check_input(fn, x)
    if isinstance(weight, Tensor):
        x, weight = _autocast(x, weight)
    weight = V.check_weight(
        fn, weight, x, (None, x.shape[1], 1, 1), "(Cout, Cin, 1, 1) with Cin = x's channels"
    )
    cout = weight.shape[0]
    act = V.activation_code(fn, activation)
    V.check_bn(fn, x, cout, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    V.check_batch_count(fn, count, (x.shape[0], cout, x.shape[2], x.shape[3]), training)

    backend = backends.resolve(x.device, "pointwise_conv_bn_act", x.dtype)
    if backend == "torch":
        return reference.pointwise_conv_bn_act(
            x,
            weight,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            training=training,
            momentum=momentum,
            eps=eps,
            activation=activation,
        )
    keep_z = _needs_grad(x, weight, bn_weight, bn_bias)
    fmt = V.memory_format(x)
    x = x.contiguous(memory_format=fmt)
    w2d = weight.reshape(cout, x.shape[1]).contiguous()
    args = (x, w2d, bn_weight, bn_bias, running_mean, running_var, backend, training, float(eps))
    if keep_z:
        y, mean, var = PointwiseConvBNActFn.apply(*args, act, keep_z)
    else:  # no autograd.Function on the inference path (its overhead is per call)
        y, mean, var = pw_forward(*args, act, False)[:3]
    if training and running_mean is not None and count > 0:
        _update_running_stats(running_mean, running_var, mean, var, float(momentum), count)
    return y
