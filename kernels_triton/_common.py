"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_nhwc(x: torch.Tensor) -> bool:
    """Dense channels_last (and not also dense NCHW)."""
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


def acc_tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def apply_act(v, ACT: tl.constexpr):
    """ACT: 0 none, 1 relu, 2 relu6."""
    if ACT == 1:
        v = tl.where(v > 0, v, 0.0)
    elif ACT == 2:
        v = tl.minimum(tl.maximum(v, 0.0), 6.0)
    return v


@triton.jit
def act_pass(v, ACT: tl.constexpr):
    """Gradient mask of the activation judged from its input or output (NaN passes)."""
    if ACT == 1:
        m = ~(v <= 0)
    elif ACT == 2:
        m = ~((v <= 0) | (v >= 6))
    else:
        m = v == v
        m = m | (v != v)
    return m
