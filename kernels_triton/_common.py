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


# --------------------------------------------------------------------------------------------
# Layout, precision and launch helpers shared by the launchers.

# Tensors at or above this many elements get 64-bit index math inside a program (image bases
# and program ids are always 64-bit).
I64_NUMEL = 2**31 - 1


def layout_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(image, channel, pixel) strides of a dense NCHW or channels_last 4-D tensor, with
    pixel = h * W + w. A tensor dense in both formats (C == 1 or H * W == 1) has the same
    offsets under either, and is described as NCHW."""
    n, c, h, w = t.shape
    if is_nhwc(t):
        return h * w * c, 1, c
    if not t.is_contiguous():
        raise ValueError(
            f"kernels_triton: expected a dense NCHW or channels_last tensor, got shape "
            f"{tuple(t.shape)} with strides {t.stride()}"
        )
    return c * h * w, h * w, 1


def needs_i64(*tensors: torch.Tensor) -> bool:
    """Whether in-image offsets may pass 2^31 (then the kernels index in int64)."""
    return any(t.numel() >= I64_NUMEL for t in tensors)


def tf32_allowed() -> bool:
    """PyTorch's switch for TF32 in fp32 matmuls (off by default)."""
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec == "tf32":
        return True
    if prec == "ieee":
        return False
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for fp32 only when PyTorch allows it, exact otherwise."""
    if dtype == torch.float32 and tf32_allowed() and not INTERPRET:
        return "tf32"
    return "ieee"


def pick_configs(gpu: list, interpreter: list) -> list:
    """Autotune configs: the full list on a GPU, one pinned small config in the interpreter
    (autotuning there is slow and its timings mean nothing)."""
    return interpreter if INTERPRET else gpu


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# --------------------------------------------------------------------------------------------
# Deterministic second-stage reductions of per-program partials (fixed order, no atomics).


@triton.jit
def _sum_partials_kernel(ws_ptr, out_ptr, Q, C, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum over q of ws[q, c], in a fixed order for a fixed (BLOCK_Q, BLOCK_C)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=ws_ptr.dtype.element_ty)
    for q0 in range(0, Q, BLOCK_Q):
        q = (q0 + tl.arange(0, BLOCK_Q)).to(tl.int64)
        m = (q < Q)[:, None] & cmask[None, :]
        acc += tl.load(ws_ptr + q[:, None] * C + c[None, :], mask=m, other=0.0)
    tl.store(out_ptr + c, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _merge_stats_kernel(
    cnt_ptr,
    piv_ws,
    mean_ws,
    m2_ws,
    mean_ptr,
    var_ptr,
    Q,
    C,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merges per-program partials (count n_q, pivot p_q, mean d_q of z - p_q, M2_q) into the
    mean and biased variance of z. Each partial's mean is re-expressed against the first
    partial's pivot P0 (e_q = (p_q - P0) + d_q, small numbers), so its fp32 rounding scales with
    the spread of z, not its magnitude. Blocks of BLOCK_Q partials merge with the exact parallel
    formula (no E[z^2] - E[z]^2 cancellation), blocks one after another with Chan's update, in a
    fixed order. Count 0 gives mean 0 and var 0."""
    ACC = mean_ws.dtype.element_ty
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    p0 = tl.load(piv_ws + c, mask=cmask, other=0.0)
    cnt = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for q0 in range(0, Q, BLOCK_Q):
        q = (q0 + tl.arange(0, BLOCK_Q)).to(tl.int64)
        qmask = q < Q
        m = qmask[:, None] & cmask[None, :]
        nq = tl.load(cnt_ptr + q, mask=qmask, other=0.0).to(ACC)
        off = q[:, None] * C + c[None, :]
        pq = tl.load(piv_ws + off, mask=m, other=0.0)
        dq = tl.load(mean_ws + off, mask=m, other=0.0)
        m2q = tl.load(m2_ws + off, mask=m, other=0.0)
        eq = tl.where(m, (pq - p0[None, :]) + dq, 0.0)
        nb = tl.sum(nq, axis=0)
        mb = tl.sum(nq[:, None] * eq, axis=0) / tl.maximum(nb, 1.0)
        de = tl.where(m, eq - mb[None, :], 0.0)
        m2b = tl.sum(m2q + nq[:, None] * de * de, axis=0)
        tot = cnt + nb
        frac = nb / tl.maximum(tot, 1.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * cnt * frac
        cnt = tot
    var = tl.where(cnt > 0, m2 / tl.maximum(cnt, 1.0), 0.0)
    mean = tl.where(cnt > 0, p0 + mean, 0.0)
    tl.store(mean_ptr + c, mean.to(mean_ptr.dtype.element_ty), mask=cmask)
    tl.store(var_ptr + c, var.to(var_ptr.dtype.element_ty), mask=cmask)


_RED_BLOCK_Q = 8 if INTERPRET else 32
_RED_BLOCK_C = 32 if INTERPRET else 128


def sum_partials(ws: torch.Tensor, out: torch.Tensor) -> None:
    """out (any shape, C elements, contiguous) = ws (Q, C).sum(0), deterministically."""
    q, c = ws.shape
    assert out.is_contiguous() and out.numel() == c
    if c == 0:
        return
    if q == 0:
        out.zero_()
        return
    grid = (triton.cdiv(c, _RED_BLOCK_C),)
    _sum_partials_kernel[grid](ws, out, q, c, BLOCK_Q=_RED_BLOCK_Q, BLOCK_C=_RED_BLOCK_C)


def merge_stats(
    cnt: torch.Tensor,
    piv_ws: torch.Tensor,
    mean_ws: torch.Tensor,
    m2_ws: torch.Tensor,
    mean_out: torch.Tensor,
    var_out: torch.Tensor,
) -> None:
    """mean_out, var_out (C,) from per-program counts (Q,) and (pivot, shifted mean, M2)
    partials (Q, C) each; see _merge_stats_kernel."""
    q, c = mean_ws.shape
    if q == 0:
        mean_out.zero_()
        var_out.zero_()
        return
    grid = (triton.cdiv(c, _RED_BLOCK_C),)
    _merge_stats_kernel[grid](
        cnt,
        piv_ws,
        mean_ws,
        m2_ws,
        mean_out,
        var_out,
        q,
        c,
        BLOCK_Q=_RED_BLOCK_Q,
        BLOCK_C=_RED_BLOCK_C,
    )
