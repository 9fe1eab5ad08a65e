"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import math
import os
from typing import Optional

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
    """ACT: 0 none, 1 relu, 2 relu6. NaN stays NaN, as with F.relu / F.hardtanh: comparisons
    with NaN are false, so tl.where keeps v (tl.maximum/tl.minimum would return the bound)."""
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0, 0.0, tl.where(v > 6, 6.0, v))
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


def dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when dense NCHW or channels_last (what dwsep passes), else a dense copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def needs_i64(*tensors: torch.Tensor) -> bool:
    """Whether in-image offsets may pass 2^31 (then the kernels index in int64)."""
    return any(t.numel() >= I64_NUMEL for t in tensors)


def tf32_allowed() -> bool:
    """PyTorch's switch for TF32 in fp32 convolutions, the one cuDNN (and so nn.Conv2d, and
    dwsep's CUDA backend) follows: ``torch.backends.cudnn.conv.fp32_precision`` where set, else
    ``torch.backends.cudnn.allow_tf32`` (on by default in PyTorch)."""
    cudnn = torch.backends.cudnn
    for prec in (
        getattr(getattr(cudnn, "conv", None), "fp32_precision", None),
        getattr(cudnn, "fp32_precision", None),
    ):
        if prec == "tf32":
            return True
        if prec == "ieee":
            return False
    try:
        return bool(cudnn.allow_tf32)
    except RuntimeError:  # legacy and new TF32 flags mixed: PyTorch refuses to answer
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for fp32 only when PyTorch allows it, exact otherwise."""
    if dtype == torch.float32 and tf32_allowed() and not INTERPRET:
        return "tf32"
    return "ieee"


def pick_configs(gpu: list, interpreter: list) -> list:
    """Autotune configs: the full list on a GPU, one pinned small config in the interpreter
    (autotuning there is slow and its timings mean nothing)."""
    return interpreter if INTERPRET else gpu


def autotune_enabled() -> bool:
    """``DWSEP_TRITON_AUTOTUNE=0`` keeps only the first config the pruning leaves for each
    launch: no benchmarking and one compile per specialization. For test runs on a GPU (the
    test suite sets it; ``tests/test_triton_configs.py`` runs every config), never for speed."""
    return os.environ.get("DWSEP_TRITON_AUTOTUNE", "1") not in ("", "0")


def _short_bench(kernel_call, quantiles):
    """The autotuner's timing of one config: 5 ms of warm-up and 20 ms of repeats (Triton's
    default is 25 + 100 ms). Enough repeats to rank configs of these kernels (tens of
    microseconds to a few milliseconds each), and 5x less first-use tuning: a MobileNetV1
    training step tunes hundreds of (kernel, shape, config) triples."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotune_options() -> dict:
    """Keyword arguments for every ``@triton.autotune`` here, where this Triton has them:
    ``cache_results`` (the chosen config is stored in Triton's cache directory, keyed by the
    kernel source, the GPU target, the tuning key and the configs, so later processes skip the
    benchmarking; ``DWSEP_TRITON_AUTOTUNE_CACHE=0`` turns it off) and the shorter benchmark."""
    import inspect

    params = inspect.signature(triton.autotune).parameters
    opts: dict = {}
    if INTERPRET:
        return opts
    if "cache_results" in params and os.environ.get("DWSEP_TRITON_AUTOTUNE_CACHE", "1") not in (
        "",
        "0",
    ):
        opts["cache_results"] = True
    if "do_bench" in params:
        opts["do_bench"] = _short_bench
    return opts


AUTOTUNE_OPTS = autotune_options()


def config_with(cfg, meta: Optional[dict] = None, **launch):
    """A copy of autotune config ``cfg`` with meta-parameters added or replaced (``meta``) and/or
    launch options replaced (num_warps, num_stages, num_ctas, maxnreg)."""
    opts = {
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "num_ctas": cfg.num_ctas,
        "maxnreg": cfg.maxnreg,
        "pre_hook": cfg.pre_hook,
    }
    opts.update(launch)
    return triton.Config({**cfg.kwargs, **(meta or {})}, **opts)


def finish_prune(keep: list) -> list:
    """The end of every prune hook: the kept configs, or the first alone when autotuning is off."""
    return keep if autotune_enabled() else keep[:1]


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def tile_programs(tiles: int, channel_blocks: int, device: torch.device) -> int:
    """Programs along the tile axis of a grid-stride kernel with `channel_blocks` programs
    along the other: about 8 per SM in all (each program loads its channels' weights and BN
    constants once and loops over its tiles), never more than the tiles. In the interpreter 3,
    so that programs take several tiles, unevenly."""
    if INTERPRET:
        return max(1, min(tiles, 3))
    return max(1, min(tiles, triton.cdiv(8 * num_sms(device), max(1, channel_blocks))))


def pixel_chunk(images: int, pixels: int, channels: int, device: torch.device) -> int:
    """Pixels of one image per reduction partial (a program loops over them). Independent of
    the tuned tile, so the workspace size is known before launch: as long as possible (fewer
    partials) while leaving about 4 programs per SM (assuming 64-channel blocks). In the
    interpreter a short fixed chunk, so that programs loop over several tiles."""
    if INTERPRET:
        return 64
    target = 4 * num_sms(device)
    chunk = 2048
    while chunk > 128 and images * triton.cdiv(pixels, chunk) * triton.cdiv(channels, 64) < target:
        chunk //= 2
    return chunk


# --------------------------------------------------------------------------------------------
# Deterministic second-stage reductions of per-program partials (fixed order, no atomics).
# A long list of partials is reduced in two levels: groups of PER partials in parallel, then the
# group results; the partition depends only on the partial count, so results are reproducible.

_RED_BLOCK_Q = 2 if INTERPRET else 32
_RED_BLOCK_C = 32 if INTERPRET else 128
# Above this many partials, reduce in two levels (small in the interpreter, to test that path).
_RED_TWO_LEVEL = 4 if INTERPRET else 256


@triton.jit
def _sum_partials_kernel(ws_ptr, out_ptr, Q, C, PER, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[g, c] = sum of ws[q, c] over the partials q of group g (q in [g*PER, g*PER + PER)),
    in a fixed order for a fixed (BLOCK_Q, BLOCK_C)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = tl.program_id(1).to(tl.int64)
    q_begin = g * PER
    q_end = tl.minimum(q_begin + PER, Q)
    cmask = c < C
    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=ws_ptr.dtype.element_ty)
    for q0 in range(q_begin, q_end, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        m = (q < q_end)[:, None] & cmask[None, :]
        acc += tl.load(ws_ptr + q[:, None] * C + c[None, :], mask=m, other=0.0)
    out = tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + g * C + c, out, mask=cmask)


@triton.jit
def _merge_stats_kernel(
    cnt_ptr,
    piv_ws,
    mean_ws,
    m2_ws,
    cnt_out,
    piv_out,
    mean_out,
    m2_out,
    Q,
    C,
    PER,
    FINAL: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merges the partials of group g (q in [g*PER, g*PER + PER)): count n_q, pivot p_q, mean
    d_q of z - p_q, M2_q. Each partial's mean is re-expressed against the group's first pivot
    P0 (e_q = (p_q - P0) + d_q, small numbers), so fp32 rounding scales with the spread of z,
    not its magnitude. Blocks of BLOCK_Q partials merge with the exact parallel formula (no
    E[z^2] - E[z]^2 cancellation), blocks one after another with Chan's update, in a fixed
    order. FINAL: writes mean (into mean_out) and biased variance (into m2_out), 0 and 0 for
    count 0; else the group's (count, P0, mean, M2) as a partial for the next level."""
    ACC = mean_ws.dtype.element_ty
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = tl.program_id(1).to(tl.int64)
    q_begin = g * PER
    q_end = tl.minimum(q_begin + PER, Q)
    cmask = c < C
    p0 = tl.load(piv_ws + q_begin * C + c, mask=cmask, other=0.0)
    cnt = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for q0 in range(q_begin, q_end, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        qmask = q < q_end
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
    if FINAL:
        var = tl.where(cnt > 0, m2 / tl.maximum(cnt, 1.0), 0.0)
        mean = tl.where(cnt > 0, p0 + mean, 0.0)
        tl.store(mean_out + c, mean.to(mean_out.dtype.element_ty), mask=cmask)
        tl.store(m2_out + c, var.to(m2_out.dtype.element_ty), mask=cmask)
    else:
        tl.store(piv_out + g * C + c, p0, mask=cmask)
        tl.store(mean_out + g * C + c, mean, mask=cmask)
        tl.store(m2_out + g * C + c, m2, mask=cmask)
        if tl.program_id(0) == 0:
            tl.store(cnt_out + g, tl.max(cnt, axis=0))


def _group_size(q: int) -> int:
    """Partials per first-level group: about sqrt(q), a multiple of the block."""
    per = max(_RED_BLOCK_Q, int(math.isqrt(q - 1)) + 1)
    return triton.cdiv(per, _RED_BLOCK_Q) * _RED_BLOCK_Q


def sum_partials(ws: torch.Tensor, out: torch.Tensor) -> None:
    """out (any shape, C elements, contiguous) = ws (Q, C).sum(0), deterministically."""
    q, c = ws.shape
    assert out.is_contiguous() and out.numel() == c
    if c == 0:
        return
    if q == 0:
        out.zero_()
        return
    cb = triton.cdiv(c, _RED_BLOCK_C)
    kw = {"BLOCK_Q": _RED_BLOCK_Q, "BLOCK_C": _RED_BLOCK_C}
    if q > _RED_TWO_LEVEL:
        per = _group_size(q)
        groups = triton.cdiv(q, per)
        ws2 = torch.empty((groups, c), dtype=ws.dtype, device=ws.device)
        _sum_partials_kernel[(cb, groups)](ws, ws2, q, c, per, **kw)
        ws, q = ws2, groups
    _sum_partials_kernel[(cb, 1)](ws, out, q, c, q, **kw)


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
    cb = triton.cdiv(c, _RED_BLOCK_C)
    kw = {"BLOCK_Q": _RED_BLOCK_Q, "BLOCK_C": _RED_BLOCK_C}
    if q > _RED_TWO_LEVEL:
        per = _group_size(q)
        groups = triton.cdiv(q, per)
        cnt2 = torch.empty((groups,), dtype=mean_ws.dtype, device=mean_ws.device)
        piv2, mean2, m22 = torch.empty(
            (3, groups, c), dtype=mean_ws.dtype, device=mean_ws.device
        ).unbind(0)
        _merge_stats_kernel[(cb, groups)](
            cnt, piv_ws, mean_ws, m2_ws, cnt2, piv2, mean2, m22, q, c, per, FINAL=False, **kw
        )
        cnt, piv_ws, mean_ws, m2_ws, q = cnt2, piv2, mean2, m22, groups
    _merge_stats_kernel[(cb, 1)](
        cnt, piv_ws, mean_ws, m2_ws, cnt, piv_ws, mean_out, var_out, q, c, q, FINAL=True, **kw
    )
