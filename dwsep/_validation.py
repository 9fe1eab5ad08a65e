"""Argument validation for the public ops: one place, with messages that name the argument,
what was expected and what was given."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Largest element count the kernels index; they use 64-bit offsets, this bounds int64 math.
MAX_NUMEL = 2**62


def activation_code(fn: str, activation: Optional[str]) -> int:
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ValueError(
            f"{fn}: activation must be one of 'relu6', 'relu' or None, got {activation!r}"
        )
    return ACTIVATIONS[activation]


def _check_tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_input(fn: str, x: object) -> Tensor:
    x = _check_tensor(fn, "x", x)
    if x.dim() != 4:
        raise ValueError(
            f"{fn}: x must be a 4-D (N, C, H, W) tensor, got a {x.dim()}-D tensor of shape "
            f"{tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{fn}: x must have at least one channel, got shape {tuple(x.shape)}")
    if x.numel() > MAX_NUMEL:
        raise ValueError(f"{fn}: x has {x.numel()} elements, more than the supported {MAX_NUMEL}")
    return x


def check_weight(fn: str, weight: object, x: Tensor, expected: tuple, what: str) -> Tensor:
    """``expected`` is the required shape; a None entry accepts any positive size."""
    weight = _check_tensor(fn, "weight", weight)
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight must be on {x.device} like x, got {weight.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{fn}: weight must have dtype {x.dtype} like x, got {weight.dtype}")
    shape = tuple(weight.shape)
    if len(shape) != len(expected) or any(
        (e is None and s < 1) or (e is not None and s != e) for s, e in zip(shape, expected)
    ):
        want = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{fn}: weight must be {what} = {want}, got {shape}")
    return weight


def check_bn(
    fn: str,
    x: Tensor,
    channels: int,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> None:
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
    ):
        if t is None:
            continue
        _check_tensor(fn, name, t)
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on {x.device} like x, got {t.device}")
        allowed = {x.dtype, torch.float32} if x.dtype != torch.float64 else {torch.float64}
        if t.dtype not in allowed:
            raise TypeError(
                f"{fn}: {name} must have dtype {x.dtype}"
                + (" or torch.float32" if x.dtype not in (torch.float32, torch.float64) else "")
                + f" for x of dtype {x.dtype}, got {t.dtype}"
            )
        if tuple(t.shape) != (channels,):
            raise ValueError(
                f"{fn}: {name} must have shape ({channels},) to match the {channels} channels, "
                f"got {tuple(t.shape)}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{fn}: running_mean and running_var must both be tensors or both be None, got "
            f"running_mean={'None' if running_mean is None else 'Tensor'}, "
            f"running_var={'None' if running_var is None else 'Tensor'}"
        )
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError(
            f"{fn}: training=False needs running_mean and running_var (the statistics to "
            "normalize with), got None"
        )
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError(f"{fn}: momentum must be a float, got {type(momentum).__name__}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{fn}: eps must be a positive float, got {eps!r}")


def check_stride(fn: str, stride: object) -> int:
    if isinstance(stride, (tuple, list)):
        if len(stride) != 2 or stride[0] != stride[1]:
            raise ValueError(f"{fn}: stride must be 1 or 2 (equal in H and W), got {stride!r}")
        stride = stride[0]
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in (1, 2):
        raise ValueError(f"{fn}: stride must be 1 or 2, got {stride!r}")
    return int(stride)


def check_batch_count(fn: str, count: int, shape: tuple, training: bool) -> None:
    """Mirrors F.batch_norm: training needs more than one value per channel."""
    if training and count == 1:
        raise ValueError(
            f"{fn}: expected more than 1 value per channel when training, got an output of "
            f"shape {shape}"
        )


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if x's strides put C innermost, else contiguous (NCHW)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    # Non-dense (sliced/permuted): follow the stride order, as PyTorch's own convs do.
    s = x.stride()
    if s[1] < s[3] and s[1] < s[2] and x.shape[1] > 1:
        return torch.channels_last
    return torch.contiguous_format
