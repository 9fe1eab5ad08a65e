"""Inference-only conv + BN + activation layers with the BatchNorm folded once: the pieces of
:meth:`dwsep.MobileNetV1.freeze` and :func:`dwsep.nn.freeze`. Each call is one fused kernel
launch, with no per-call BN folding or argument checks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, ops
from ._validation import ACTIVATIONS, activation_code, memory_format
from .functional import _autocast
from .reference import apply_activation

__all__ = ["FrozenConvAct", "bn_fold", "conv_bn_act"]


def bn_fold(bn: nn.BatchNorm2d, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """BN in inference as the per-channel (scale, shift) of the fused kernels, computed by the
    fused ops' own eval-path functions (so that frozen and eval feed the kernels equal values)."""
    mean, invstd = ops._stats(False, None, None, bn.running_mean, bn.running_var, bn.eps, acc)
    scale, shift = ops._bn_affine(mean, invstd, bn.weight, bn.bias, acc)
    return scale.contiguous(), shift.contiguous()


def conv_bn_act(
    x: Tensor,
    w: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: int,
    padding,
    dilation,
    groups: int,
    act: int,
    backend: str,
) -> Tensor:
    """Any conv (no bias), then the folded BN (per-channel ``scale``, ``shift``) and the
    activation, for inference on a kernel backend. On the ``cpu`` backend in fp32: one
    convolution with the BN folded into its weights and bias, then the activation in place (a
    read and a write of the output fewer than the conv, then dwsep's fused BN + activation
    kernel; oneDNN's own activation post-ops would save one more but turn NaN into 0 or 6).
    Otherwise: the conv, then the backend's fused BN + activation kernel."""
    if backend == "cpu" and x.dtype == torch.float32:
        y = F.conv2d(x, w * scale.view(-1, 1, 1, 1), shift, stride, padding, dilation, groups)
        if act == ACTIVATIONS["relu"]:
            return y.relu_()
        return y.clamp_(0.0, 6.0) if act == ACTIVATIONS["relu6"] else y
    x = F.conv2d(x, w, None, stride, padding, dilation, groups)
    x = x.contiguous(memory_format=memory_format(x))
    return ops.op_table(backend).bn_act(x, scale, shift, act)


class FrozenConvAct(nn.Module):
    """One conv + folded BN + activation: ``kind`` is ``"dw"`` (the fused depthwise kernel),
    ``"pw"`` (the fused pointwise GEMM) or ``"stem"`` (any conv, then the fused scale/shift/
    activation kernel). Weights and the folded BN are buffers, a snapshot of ``conv`` and
    ``bn``. Under autograd (x requiring grad) or on the ``torch`` backend it runs the same math
    in PyTorch ops, differentiable with respect to x."""

    def __init__(
        self, kind: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str] = "relu6"
    ) -> None:
        super().__init__()
        if kind not in ("dw", "pw", "stem"):
            raise ValueError(f"FrozenConvAct: kind must be 'dw', 'pw' or 'stem', got {kind!r}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                "freeze: a BatchNorm2d without running statistics (track_running_stats=False) "
                "cannot be folded"
            )
        self.kind = kind
        self.activation = activation
        self.act = activation_code("FrozenConvAct", activation)
        self.stride = int(conv.stride[0])
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        w = conv.weight.detach()
        scale, shift = bn_fold(bn, ops.acc_dtype(w.dtype))
        self.register_buffer("weight", (w.flatten(1) if kind == "pw" else w).clone())
        self.register_buffer("scale", scale.detach())  # fresh tensors from bn_fold
        self.register_buffer("shift", shift.detach())

    def forward(self, x: Tensor) -> Tensor:
        x, w = _autocast(x, self.weight)  # as the fused ops and F.conv2d do under autocast
        acc = ops.acc_dtype(x.dtype)
        scale, shift = ops._as(self.scale, acc), ops._as(self.shift, acc)
        backend = backends.resolve(x.device, "frozen conv + BN + act", x.dtype)
        if backend != "torch" and not (torch.is_grad_enabled() and x.requires_grad):
            if self.kind == "stem":
                return conv_bn_act(
                    x, w, scale, shift, self.stride, self.padding, self.dilation, self.groups,
                    self.act, backend,
                )  # fmt: skip
            table = ops.op_table(backend)
            x = x.contiguous(memory_format=memory_format(x))
            if self.kind == "dw":
                return table.dw_fwd(x, w, scale, shift, self.stride, self.act)
            return table.pw_fwd(x, w, scale, shift, self.act)
        if self.kind == "stem":
            x = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        elif self.kind == "dw":
            x = F.conv2d(x, w, None, self.stride, 1, 1, x.shape[1])
        elif self.kind == "pw":
            x = F.conv2d(x, w[:, :, None, None])
        z = x.to(acc) * scale[:, None, None] + shift[:, None, None]
        return apply_activation(z, self.activation).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, stride={self.stride}, weight={tuple(self.weight.shape)}, "
            f"activation={self.activation!r}"
        )
