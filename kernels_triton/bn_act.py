"""y = act(z * scale[c] + shift[c]) for NCHW or channels_last z."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import apply_act, is_nhwc


@triton.jit
def _bn_act_kernel(
    z_ptr,
    y_ptr,
    scale_ptr,
    shift_ptr,
    numel,
    C,
    HW,
    NHWC: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if NHWC:
        c = offs % C
    else:
        c = (offs // HW) % C
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    s = tl.load(scale_ptr + c, mask=mask, other=0.0)
    b = tl.load(shift_ptr + c, mask=mask, other=0.0)
    v = apply_act(z.to(s.dtype) * s + b, ACT)
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def bn_act(
    z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: int, out: torch.Tensor
) -> None:
    """Writes act(z * scale + shift) into ``out`` (same shape and memory format as z)."""
    numel = z.numel()
    if numel == 0:
        return
    n, c, h, w = z.shape
    block = 1024
    grid = (triton.cdiv(numel, block),)
    _bn_act_kernel[grid](
        z, out, scale, shift, numel, c, h * w, NHWC=is_nhwc(z), ACT=int(act), BLOCK=block
    )
