"""Depthwise 3x3 conv + BN + act backward.

dw_bwd_reduce: per-channel sums of g_z and g_z * xhat, with z = conv(x) recomputed (never
stored), as per-program partials reduced in a fixed order.

dw_bwd, in three launches:
  1. g_conv = k * g_z (+ b * z + c when use_z) for a chunk of output pixels, stored as a
     temporary in the input dtype (eager holds this gradient in it too), and the chunk's
     partial weight gradient from the unrounded values: for each of the 9 taps, sum over
     pixels of g_conv * x[shifted] (per channel).
  2. grad_x as the transposed conv of g_conv: every input pixel gathers from the (up to 9,
     for stride 2 up to 4) output pixels whose window covered it.
  3. grad_weight = fixed-order sum of the per-program partials (no float atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    AUTOTUNE_OPTS,
    acc_tl_dtype,
    act_pass,
    config_with,
    dense,
    layout_strides,
    needs_i64,
    pick_configs,
    pixel_chunk,
    sum_partials,
    tile_programs,
)
from .depthwise_fwd import (
    TILE_CONFIGS,
    conv_tile,
    load_taps,
    prune_tile_configs,
    tile_count,
    tile_pixels,
    x_tap,
)


@triton.jit
def _grad_z(
    gy_img, y_img, p, c, m2d, gy_sc, gy_sp, y_sc, y_sp, ACT: tl.constexpr, ACC: tl.constexpr
):
    """g_z = grad_y * act'(y) on a [pixels, channels] tile (0 outside the mask)."""
    gy = tl.load(gy_img + p[:, None] * gy_sp + c[None, :] * gy_sc, mask=m2d, other=0.0).to(ACC)
    if ACT != 0:
        yv = tl.load(y_img + p[:, None] * y_sp + c[None, :] * y_sc, mask=m2d, other=0.0)
        gz = tl.where(m2d & act_pass(yv.to(ACC), ACT), gy, 0.0)
    else:
        gz = gy
    return gz


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=TILE_CONFIGS,
    key=["C", "H", "W", "x_sc", "CHUNK"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)
@triton.jit
def _dw_bwd_reduce_kernel(
    gy_ptr,
    y_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    invstd_ptr,
    ws_gz,
    ws_gzx,
    C,
    H,
    W,
    Wo,
    HWo,
    CHUNK,
    n_chunks,
    gy_sn,
    gy_sc,
    gy_sp,
    y_sn,
    y_sc,
    y_sp,
    x_sn,
    x_sc,
    x_sp,
    S: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    n = q // n_chunks
    p_begin = (q % n_chunks) * CHUNK
    if not I64:
        p_begin = p_begin.to(tl.int32)
    p_end = tl.minimum(p_begin + CHUNK, HWo)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        c = c.to(tl.int64)
    cmask = c < C
    mu = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    istd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(ACC)
    gy_img = gy_ptr + n * gy_sn
    y_img = y_ptr + n * y_sn
    x_img = x_ptr + n * x_sn
    wts = load_taps(w_ptr, c, cmask, ACC)
    acc_gz = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    acc_gzx = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < p_end
        m2d = pmask[:, None] & cmask[None, :]
        gz = _grad_z(gy_img, y_img, p, c, m2d, gy_sc, gy_sp, y_sc, y_sp, ACT, ACC)
        z = conv_tile(
            x_img,
            wts,
            p // Wo,
            p % Wo,
            pmask,
            c,
            cmask,
            H,
            W,
            x_sc,
            x_sp,
            S,
            ACC,
            BLOCK_P,
            BLOCK_C,
        )
        acc_gz += gz
        acc_gzx += gz * ((z - mu[None, :]) * istd[None, :])
    tl.store(ws_gz + q * C + c, tl.sum(acc_gz, axis=0), mask=cmask)
    tl.store(ws_gzx + q * C + c, tl.sum(acc_gzx, axis=0), mask=cmask)


def _gconv_configs() -> list:
    """The shared tile configs with the per-tile reduction, plus tiles of at most 8 elements
    per thread with per-tap accumulators (nine accumulators of 16 per thread spill on sm_90);
    the autotuner picks between them per shape."""
    small = [
        (16, 64, 4),
        (32, 32, 4),
        (8, 128, 4),
        (32, 64, 8),
        (64, 32, 8),
        (64, 16, 4),
        (128, 8, 4),
        (256, 4, 4),
        (256, 8, 8),
    ]
    gpu = [config_with(cfg, {"TAP_ACC": False}) for cfg in TILE_CONFIGS]
    gpu += [
        triton.Config({"BLOCK_P": bp, "BLOCK_C": bc, "TAP_ACC": True}, num_warps=nw)
        for bp, bc, nw in small
    ]
    interp = [triton.Config({"BLOCK_P": 32, "BLOCK_C": 16, "TAP_ACC": True}, num_warps=4)]
    return pick_configs(gpu, interp)


GCONV_CONFIGS = _gconv_configs()


@triton.jit
def _x_taps(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S: tl.constexpr):
    """The nine shifted x tiles of a tile of output pixels (x_tap, tap i * 3 + j), loaded once
    for both the conv (z) and the weight-gradient products."""
    return (
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 0, 0),
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 0, 1),
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 0, 2),
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 1, 0),
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 1, 1),
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 1, 2),
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 2, 0),
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 2, 1),
        x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, 2, 2),
    )


@triton.jit
def _gconv_tile(
    gy_img,
    y_img,
    gc_img,
    xt,
    wts,
    p,
    pmask,
    c,
    cmask,
    kk,
    bb,
    cc,
    gy_sc,
    gy_sp,
    y_sc,
    y_sp,
    gc_sc,
    gc_sp,
    ACT: tl.constexpr,
    USE_Z: tl.constexpr,
    ACC: tl.constexpr,
):
    """g_conv = k * g_z (+ b * z + c) on a tile of output pixels, stored to the temporary and
    returned (0 outside the tile's mask); z from the tile's x taps xt (_x_taps) and the
    weights wts (load_taps), summed in conv_tile's order."""
    m2d = pmask[:, None] & cmask[None, :]
    g = kk[None, :] * _grad_z(gy_img, y_img, p, c, m2d, gy_sc, gy_sp, y_sc, y_sp, ACT, ACC)
    if USE_Z:
        z = tl.zeros(g.shape, dtype=ACC)
        for k in tl.static_range(9):
            z += xt[k].to(ACC) * wts[k][None, :]
        g += tl.where(m2d, bb[None, :] * z + cc[None, :], 0.0)
    gc_t = gc_img.dtype.element_ty
    tl.store(gc_img + p[:, None] * gc_sp + c[None, :] * gc_sc, g.to(gc_t), mask=m2d)
    return g


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=GCONV_CONFIGS,
    key=["C", "H", "W", "x_sc", "CHUNK"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)
@triton.jit
def _dw_bwd_gconv_kernel(
    gy_ptr,
    y_ptr,
    x_ptr,
    w_ptr,
    k_ptr,
    b_ptr,
    c_ptr,
    gc_ptr,
    ws_gw,
    C,
    H,
    W,
    Wo,
    HWo,
    CHUNK,
    n_chunks,
    gy_sn,
    gy_sc,
    gy_sp,
    y_sn,
    y_sc,
    y_sp,
    x_sn,
    x_sc,
    x_sp,
    gc_sn,
    gc_sc,
    gc_sp,
    S: tl.constexpr,
    ACT: tl.constexpr,
    USE_Z: tl.constexpr,
    ACC: tl.constexpr,
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TAP_ACC: tl.constexpr,
):
    """Writes g_conv for a chunk of output pixels and the chunk's 9 per-channel weight-gradient
    partials ws_gw[q, c * 9 + tap]. TAP_ACC (a tuning choice, from the configs) picks how the
    weight-gradient products are summed over pixels."""
    q = tl.program_id(0).to(tl.int64)
    n = q // n_chunks
    p_begin = (q % n_chunks) * CHUNK
    if not I64:
        p_begin = p_begin.to(tl.int32)
    p_end = tl.minimum(p_begin + CHUNK, HWo)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        c = c.to(tl.int64)
    cmask = c < C
    kk = tl.load(k_ptr + c, mask=cmask, other=0.0).to(ACC)
    bb = kk
    cc = kk
    if USE_Z:
        bb = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
        cc = tl.load(c_ptr + c, mask=cmask, other=0.0).to(ACC)
    gy_img = gy_ptr + n * gy_sn
    y_img = y_ptr + n * y_sn
    x_img = x_ptr + n * x_sn
    gc_img = gc_ptr + n * gc_sn
    wts = load_taps(w_ptr, c, cmask, ACC)
    taps = tl.arange(0, 16)
    c_off = c * x_sc
    if TAP_ACC:
        # One elementwise accumulator per tap, reduced over the pixels once per chunk: no
        # cross-warp exchange inside the loop (small tiles: nine accumulators live in registers).
        a0 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a3 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a4 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a5 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a6 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a7 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a8 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for p0 in range(p_begin, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pmask = p < p_end
            xt = _x_taps(x_img, p // Wo, p % Wo, pmask, c_off, cmask, H, W, x_sp, S)
            g = _gconv_tile(gy_img, y_img, gc_img, xt, wts, p, pmask, c, cmask, kk, bb, cc, gy_sc, gy_sp, y_sc, y_sp, gc_sc, gc_sp, ACT, USE_Z, ACC)  # fmt: skip
            a0 += g * xt[0].to(ACC)
            a1 += g * xt[1].to(ACC)
            a2 += g * xt[2].to(ACC)
            a3 += g * xt[3].to(ACC)
            a4 += g * xt[4].to(ACC)
            a5 += g * xt[5].to(ACC)
            a6 += g * xt[6].to(ACC)
            a7 += g * xt[7].to(ACC)
            a8 += g * xt[8].to(ACC)
        t = taps[:, None]
        gw = tl.where(t == 0, tl.sum(a0, axis=0)[None, :], 0.0)
        gw += tl.where(t == 1, tl.sum(a1, axis=0)[None, :], 0.0)
        gw += tl.where(t == 2, tl.sum(a2, axis=0)[None, :], 0.0)
        gw += tl.where(t == 3, tl.sum(a3, axis=0)[None, :], 0.0)
        gw += tl.where(t == 4, tl.sum(a4, axis=0)[None, :], 0.0)
        gw += tl.where(t == 5, tl.sum(a5, axis=0)[None, :], 0.0)
        gw += tl.where(t == 6, tl.sum(a6, axis=0)[None, :], 0.0)
        gw += tl.where(t == 7, tl.sum(a7, axis=0)[None, :], 0.0)
        gw += tl.where(t == 8, tl.sum(a8, axis=0)[None, :], 0.0)
    else:
        # Per tile and tap: a reduction over the tile's pixels (large tiles, few registers).
        gw = tl.zeros([16, BLOCK_C], dtype=ACC)
        for p0 in range(p_begin, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pmask = p < p_end
            xt = _x_taps(x_img, p // Wo, p % Wo, pmask, c_off, cmask, H, W, x_sp, S)
            g = _gconv_tile(gy_img, y_img, gc_img, xt, wts, p, pmask, c, cmask, kk, bb, cc, gy_sc, gy_sp, y_sc, y_sp, gc_sc, gc_sp, ACT, USE_Z, ACC)  # fmt: skip
            for k in tl.static_range(9):
                part = tl.sum(g * xt[k].to(ACC), axis=0)
                gw += tl.where(taps[:, None] == k, part[None, :], 0.0)
    gw_off = q * (C * 9) + c[None, :] * 9 + taps[:, None]
    tl.store(ws_gw + gw_off, gw, mask=(taps[:, None] < 9) & cmask[None, :])


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=TILE_CONFIGS,
    key=["C", "H", "W", "x_sc"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)
@triton.jit
def _dw_bwd_dx_kernel(
    gc_ptr,
    w_ptr,
    gx_ptr,
    N,
    C,
    H,
    W,
    Ho,
    Wo,
    HW,
    gc_sn,
    gc_sc,
    gc_sp,
    x_sn,
    x_sc,
    x_sp,
    S: tl.constexpr,
    ACC: tl.constexpr,
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_x[h, w] = sum over taps (i, j) with h = ho*S + i - 1, w = wo*S + j - 1 of
    g_conv[ho, wo] * w[i, j] (the transposed depthwise conv). x_s* are grad_x's strides.
    Program (q, cb) takes the tiles q, q + num_programs(0), ... of the N * p_tiles (image,
    pixel tile) tiles for channel block cb, with the taps loaded once (load_taps)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        c = c.to(tl.int64)
    cmask = c < C
    wts = load_taps(w_ptr, c, cmask, ACC)
    c_off = c * gc_sc
    tiles, p_tiles = tile_count(N, HW, BLOCK_P)
    for t in range(tl.program_id(0).to(tl.int64), tiles, tl.num_programs(0)):
        n, p = tile_pixels(t, p_tiles, I64, BLOCK_P)
        pmask = p < HW
        h = p // W
        w = p % W
        gc_img = gc_ptr + n * gc_sn
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for i in tl.static_range(3):
            hn = h + (1 - i)
            hok = pmask & (hn >= 0)
            hn = tl.where(hok, hn, 0)  # no division of negatives
            if S == 2:
                hok = hok & ((hn % 2) == 0)
            ho = hn // S
            hok = hok & (ho < Ho)
            for j in tl.static_range(3):
                wn = w + (1 - j)
                ok = hok & (wn >= 0)
                wn = tl.where(ok, wn, 0)
                if S == 2:
                    ok = ok & ((wn % 2) == 0)
                wo = wn // S
                ok = ok & (wo < Wo)
                gv = tl.load(
                    gc_img + ((ho * Wo + wo) * gc_sp)[:, None] + c_off[None, :],
                    mask=ok[:, None] & cmask[None, :],
                    other=0.0,
                )
                acc += gv.to(ACC) * wts[i * 3 + j][None, :]
        x_off = p[:, None] * x_sp + c[None, :] * x_sc
        gx_t = gx_ptr.dtype.element_ty
        tl.store(gx_ptr + n * x_sn + x_off, acc.to(gx_t), mask=pmask[:, None] & cmask[None, :])


def _chunks(n: int, c: int, ho: int, wo: int, device) -> tuple[int, int]:
    """(pixels per partial, partials per image)."""
    hwo = ho * wo
    chunk = pixel_chunk(n, hwo, c, device)
    return chunk, (triton.cdiv(hwo, chunk) if hwo > 0 else 0)


def dw_bwd_reduce(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    stride: int,
    act: int,
    sum_gz_out: torch.Tensor,
    sum_gzxh_out: torch.Tensor,
) -> None:
    """sum_gz[c] = sum g_z, sum_gzxh[c] = sum g_z * (conv(x) - mean) * invstd over (N, Ho, Wo),
    with g_z = grad_y * act'(y)."""
    n, c, h, w = x.shape
    _, _, ho, wo = y.shape
    chunk, n_chunks = _chunks(n, c, ho, wo, x.device)
    q = n * n_chunks
    if q == 0:
        sum_gz_out.zero_()
        sum_gzxh_out.zero_()
        return
    grad_y, y, x, weight = dense(grad_y), dense(y), dense(x), weight.contiguous()
    mean, invstd = mean.contiguous(), invstd.contiguous()
    acc = sum_gz_out.dtype
    ws_gz = torch.empty((q, c), dtype=acc, device=x.device)
    ws_gzx = torch.empty((q, c), dtype=acc, device=x.device)

    def grid(meta):
        return (q, triton.cdiv(c, meta["BLOCK_C"]))

    _dw_bwd_reduce_kernel[grid](
        grad_y,
        y,
        x,
        weight,
        mean,
        invstd,
        ws_gz,
        ws_gzx,
        c,
        h,
        w,
        wo,
        ho * wo,
        chunk,
        n_chunks,
        *layout_strides(grad_y),
        *layout_strides(y),
        *layout_strides(x),
        S=int(stride),
        ACT=int(act),
        ACC=acc_tl_dtype(x.dtype),
        I64=needs_i64(x, y, grad_y),
    )
    sum_partials(ws_gz, sum_gz_out)
    sum_partials(ws_gzx, sum_gzxh_out)


def dw_bwd(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    k: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    stride: int,
    act: int,
    use_z: bool,
    grad_x_out: torch.Tensor,
    grad_w_out: torch.Tensor,
) -> None:
    """grad_x and grad_weight of the depthwise conv for g_conv = k*g_z (+ b*conv(x) + c)."""
    n, ch, h, w = x.shape
    _, _, ho, wo = y.shape
    chunk, n_chunks = _chunks(n, ch, ho, wo, x.device)
    q = n * n_chunks
    if q == 0:
        grad_x_out.zero_()
        grad_w_out.zero_()
        return
    grad_y, y, x, weight = dense(grad_y), dense(y), dense(x), weight.contiguous()
    k, b, c = k.contiguous(), b.contiguous(), c.contiguous()
    acc_t = k.dtype
    acc = acc_tl_dtype(x.dtype)
    i64 = needs_i64(x, y, grad_y)
    # g_conv temporary in y's layout and dtype: the gradient at the conv output, which eager
    # PyTorch also holds in the input dtype. (The weight gradient is taken from the unrounded
    # value in registers; only grad_x sees the rounding.) Half the bytes of an fp32 temporary
    # for fp16/bf16.
    if layout_strides(y)[1] == 1 and ch > 1:
        gc = torch.empty(
            (n, ch, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )
    else:
        gc = torch.empty((n, ch, ho, wo), dtype=x.dtype, device=x.device)
    ws_gw = torch.empty((q, ch * 9), dtype=acc_t, device=x.device)
    gc_s = layout_strides(gc)

    def grid(meta):
        return (q, triton.cdiv(ch, meta["BLOCK_C"]))

    _dw_bwd_gconv_kernel[grid](
        grad_y,
        y,
        x,
        weight,
        k,
        b,
        c,
        gc,
        ws_gw,
        ch,
        h,
        w,
        wo,
        ho * wo,
        chunk,
        n_chunks,
        *layout_strides(grad_y),
        *layout_strides(y),
        *layout_strides(x),
        *gc_s,
        S=int(stride),
        ACT=int(act),
        USE_Z=bool(use_z),
        ACC=acc,
        I64=i64,
    )

    def grid_dx(meta):
        cb = triton.cdiv(ch, meta["BLOCK_C"])
        return (tile_programs(n * triton.cdiv(h * w, meta["BLOCK_P"]), cb, x.device), cb)

    _dw_bwd_dx_kernel[grid_dx](
        gc,
        weight,
        grad_x_out,
        n,
        ch,
        h,
        w,
        ho,
        wo,
        h * w,
        *gc_s,
        *layout_strides(grad_x_out),
        S=int(stride),
        ACC=acc,
        I64=i64 or needs_i64(grad_x_out),
    )
    sum_partials(ws_gw, grad_w_out.view(ch * 9))
