"""Depthwise 3x3 conv (padding 1, stride 1 or 2) forward: the fused conv + BN + act kernel and
the batch-statistics kernel.

Each program computes a [BLOCK_P output pixels x BLOCK_C channels] tile of one image with nine
masked shifted loads (the overlap between taps and between neighbouring tiles is served by
L1/L2), accumulating in fp32 (fp64 for fp64). Tensors are addressed by (image, channel, pixel)
strides, so NCHW and channels_last take the same code; a unit stride is specialized by Triton,
which makes channels_last loads contiguous along the channel axis.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    AUTOTUNE_OPTS,
    acc_tl_dtype,
    apply_act,
    config_with,
    dense,
    finish_prune,
    layout_strides,
    merge_stats,
    needs_i64,
    next_pow2,
    pick_configs,
    pixel_chunk,
    tile_programs,
)


def _tile_configs() -> list:
    gpu = [
        triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=nw)
        for bp, bc, nw in [
            (32, 64, 4),
            (64, 32, 4),
            (16, 128, 4),
            (64, 64, 8),
            (128, 32, 8),
            (128, 16, 4),
            (256, 8, 4),
            (512, 4, 4),
            (256, 16, 8),
        ]
    ]
    interp = [triton.Config({"BLOCK_P": 32, "BLOCK_C": 16}, num_warps=4)]
    return pick_configs(gpu, interp)


def prune_tile_configs(configs, named_args, **kwargs):
    """Channels_last (unit channel stride) wants wide channel blocks, NCHW long pixel blocks;
    no block much wider than the channel count."""
    args = {**named_args, **kwargs}
    nhwc = args["x_sc"] == 1 and args["C"] > 1
    cmax = max(4, next_pow2(args["C"]))
    keep = [
        cfg
        for cfg in configs
        if cfg.kwargs["BLOCK_C"] <= cmax
        and ((cfg.kwargs["BLOCK_C"] >= 16) if nhwc else (cfg.kwargs["BLOCK_C"] <= 16))
    ]
    return finish_prune(keep or [min(configs, key=lambda cfg: cfg.kwargs["BLOCK_C"])])


TILE_CONFIGS = _tile_configs()
# Pixels of one image per statistics / reduction partial. Independent of the tuned tile, so
# the workspace size is known before launch.


@triton.jit
def load_taps(w_ptr, c, cmask, ACC: tl.constexpr):
    """The nine taps w[c, 0, i, j] (tap i * 3 + j) of channels c as a tuple of [BLOCK_C]
    vectors in ACC. Every kernel loads them once, before its pixel loop: they are loop
    invariants, but Triton re-issues a load in a loop body on every iteration, and with the
    (C, 9) weight layout each is a stride-9 scalar load per channel a thread holds (72 per
    thread and tile for 8 bf16 channels, against 9 vector loads of x)."""
    return (
        tl.load(w_ptr + c * 9 + 0, mask=cmask, other=0.0).to(ACC),
        tl.load(w_ptr + c * 9 + 1, mask=cmask, other=0.0).to(ACC),
        tl.load(w_ptr + c * 9 + 2, mask=cmask, other=0.0).to(ACC),
        tl.load(w_ptr + c * 9 + 3, mask=cmask, other=0.0).to(ACC),
        tl.load(w_ptr + c * 9 + 4, mask=cmask, other=0.0).to(ACC),
        tl.load(w_ptr + c * 9 + 5, mask=cmask, other=0.0).to(ACC),
        tl.load(w_ptr + c * 9 + 6, mask=cmask, other=0.0).to(ACC),
        tl.load(w_ptr + c * 9 + 7, mask=cmask, other=0.0).to(ACC),
        tl.load(w_ptr + c * 9 + 8, mask=cmask, other=0.0).to(ACC),
    )


@triton.jit
def x_tap(
    x_img,
    ho,
    wo,
    pmask,
    c_off,
    cmask,
    H,
    W,
    x_sp,
    S: tl.constexpr,
    I: tl.constexpr,
    J: tl.constexpr,
):
    """x[ho*S + I-1, wo*S + J-1, c] on a tile of output pixels, in x's dtype (0 in the
    padding and outside the masks); c_off = c * x_sc."""
    hi = ho * S + (I - 1)
    wi = wo * S + (J - 1)
    ok = pmask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    off = (hi * W + wi) * x_sp
    return tl.load(
        x_img + off[:, None] + c_off[None, :], mask=ok[:, None] & cmask[None, :], other=0.0
    )


@triton.jit
def tile_count(N, HW, BLOCK_P: tl.constexpr):
    """(tiles, p_tiles): the N * p_tiles (image, pixel tile) tiles of the grid-stride kernels,
    in int64 even where Triton specialized N or HW to a constant."""
    p_tiles = tl.cdiv(HW, BLOCK_P)
    return (tl.zeros([], tl.int64) + N) * p_tiles, p_tiles


@triton.jit
def tile_pixels(t, p_tiles, I64: tl.constexpr, BLOCK_P: tl.constexpr):
    """(image n, pixel indices p) of tile t (int64); p in int32 unless I64."""
    n = t // p_tiles
    p0 = (t - n * p_tiles) * BLOCK_P
    if not I64:
        p0 = p0.to(tl.int32)
    return n, p0 + tl.arange(0, BLOCK_P)


@triton.jit
def conv_tile(
    x_img,
    wts,
    ho,
    wo,
    pmask,
    c,
    cmask,
    H,
    W,
    x_sc,
    x_sp,
    S: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """z[p, c] = sum_{i,j} x[ho*S+i-1, wo*S+j-1, c] * w[c, i, j] for a tile of output pixels
    (ho, wo) and channels c of one image (x_img points at the image); zero padding. wts: the
    taps from load_taps."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    c_off = c * x_sc
    for i in tl.static_range(3):
        for j in tl.static_range(3):
            xv = x_tap(x_img, ho, wo, pmask, c_off, cmask, H, W, x_sp, S, i, j)
            acc += xv.to(ACC) * wts[i * 3 + j][None, :]
    return acc


@triton.jit
def conv_pixel(
    x_img,
    wts,
    ho,
    wo,
    c,
    cmask,
    H,
    W,
    x_sc,
    x_sp,
    S: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """z at one output pixel (ho, wo) for channels c: a [BLOCK_C] vector."""
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    for i in tl.static_range(3):
        hi = ho * S + (i - 1)
        for j in tl.static_range(3):
            wi = wo * S + (j - 1)
            ok = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            xv = tl.load(x_img + (hi * W + wi) * x_sp + c * x_sc, mask=cmask & ok, other=0.0)
            acc += xv.to(ACC) * wts[i * 3 + j]
    return acc


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=TILE_CONFIGS,
    key=["C", "H", "W", "x_sc", "y_sc"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)
@triton.jit
def _dw_fwd_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    N,
    C,
    H,
    W,
    Wo,
    HWo,
    x_sn,
    x_sc,
    x_sp,
    y_sn,
    y_sc,
    y_sp,
    S: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (q, cb) computes the tiles t = q, q + num_programs(0), ... of the N * p_tiles
    (image, pixel tile) tiles, for channel block cb: the taps, scale and shift are loaded once
    per program (see load_taps) and serve all its tiles."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        c = c.to(tl.int64)
    cmask = c < C
    wts = load_taps(w_ptr, c, cmask, ACC)
    s = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC)
    b = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC)
    tiles, p_tiles = tile_count(N, HWo, BLOCK_P)
    for t in range(tl.program_id(0).to(tl.int64), tiles, tl.num_programs(0)):
        n, p = tile_pixels(t, p_tiles, I64, BLOCK_P)
        pmask = p < HWo
        ho = p // Wo
        wo = p % Wo
        acc = conv_tile(x_ptr + n * x_sn, wts, ho, wo, pmask, c, cmask, H, W, x_sc, x_sp, S, ACC, BLOCK_P, BLOCK_C)  # fmt: skip
        v = apply_act(acc * s[None, :] + b[None, :], ACT)
        y_off = p[:, None] * y_sp + c[None, :] * y_sc
        y_t = y_ptr.dtype.element_ty
        tl.store(y_ptr + n * y_sn + y_off, v.to(y_t), mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _centered_tile(
    x_img,
    wts,
    piv,
    p0,
    pmask,
    c,
    cmask,
    H,
    W,
    Wo,
    x_sc,
    x_sp,
    S: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """z - pivot on the tile of output pixels p0 .. p0 + BLOCK_P of one image."""
    p = p0 + tl.arange(0, BLOCK_P)
    z = conv_tile(
        x_img, wts, p // Wo, p % Wo, pmask, c, cmask, H, W, x_sc, x_sp, S, ACC, BLOCK_P, BLOCK_C
    )
    return z - piv[None, :]


def _stats_configs() -> list:
    """Every tile twice: LANE_STATS False merges each tile's statistics into the chunk's (two
    cross-warp reductions per tile), True keeps a running mean and M2 per element lane and merges
    the lanes once per chunk; the autotuner picks per shape."""
    gpu = [
        config_with(cfg, {"LANE_STATS": lanes}) for lanes in (False, True) for cfg in TILE_CONFIGS
    ]
    interp = [triton.Config({"BLOCK_P": 32, "BLOCK_C": 16, "LANE_STATS": True}, num_warps=4)]
    return pick_configs(gpu, interp)


STATS_CONFIGS = _stats_configs()


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=STATS_CONFIGS,
    key=["C", "H", "W", "x_sc", "CHUNK"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)
@triton.jit
def _dw_stats_kernel(
    x_ptr,
    w_ptr,
    piv_ws,
    mean_ws,
    m2_ws,
    cnt_ws,
    C,
    H,
    W,
    Wo,
    HWo,
    CHUNK,
    n_chunks,
    x_sn,
    x_sc,
    x_sp,
    S: tl.constexpr,
    ACC: tl.constexpr,
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LANE_STATS: tl.constexpr,
):
    """Partial q = (image, chunk of CHUNK output pixels): per channel the count, a pivot (z at
    the chunk's first pixel), the mean of z - pivot and M2. LANE_STATS False: merged tile by
    tile with Chan's formula; True: Welford per element lane (pixel row of the tile, channel),
    the lanes merged with Chan's formula once at the end."""
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
    x_img = x_ptr + n * x_sn
    wts = load_taps(w_ptr, c, cmask, ACC)
    piv = conv_pixel(
        x_img, wts, p_begin // Wo, p_begin % Wo, c, cmask, H, W, x_sc, x_sp, S, ACC, BLOCK_C
    )
    if LANE_STATS:
        lm = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        lm2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        lc = tl.zeros([BLOCK_P], dtype=ACC)
        for p0 in range(p_begin, p_end, BLOCK_P):
            pmask = (p0 + tl.arange(0, BLOCK_P)) < p_end
            z = _centered_tile(x_img, wts, piv, p0, pmask, c, cmask, H, W, Wo, x_sc, x_sp, S, ACC, BLOCK_P, BLOCK_C)  # fmt: skip
            lc = lc + pmask.to(ACC)
            inv = tl.where(pmask, 1.0 / tl.maximum(lc, 1.0), 0.0)
            d = z - lm
            lm = lm + d * inv[:, None]
            lm2 = lm2 + tl.where(pmask[:, None], d * (z - lm), 0.0)
        total = tl.maximum(tl.sum(lc, axis=0), 1.0)
        mean = tl.sum(lc[:, None] * lm, axis=0) / total
        dm = lm - mean[None, :]
        m2 = tl.sum(lm2, axis=0) + tl.sum(lc[:, None] * dm * dm, axis=0)
    else:
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        for p0 in range(p_begin, p_end, BLOCK_P):
            pmask = (p0 + tl.arange(0, BLOCK_P)) < p_end
            z = _centered_tile(x_img, wts, piv, p0, pmask, c, cmask, H, W, Wo, x_sc, x_sp, S, ACC, BLOCK_P, BLOCK_C)  # fmt: skip
            nb = tl.minimum(p_end - p0, BLOCK_P).to(ACC)
            cnt = (p0 - p_begin).to(ACC)
            mb = tl.sum(tl.where(pmask[:, None], z, 0.0), axis=0) / nb
            d = tl.where(pmask[:, None], z - mb[None, :], 0.0)
            m2b = tl.sum(d * d, axis=0)
            tot = cnt + nb
            delta = mb - mean
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta * delta * (cnt * nb / tot)
    tl.store(piv_ws + q * C + c, piv, mask=cmask)
    tl.store(mean_ws + q * C + c, mean, mask=cmask)
    tl.store(m2_ws + q * C + c, m2, mask=cmask)
    if tl.program_id(1) == 0:
        tl.store(cnt_ws + q, (p_end - p_begin).to(ACC))


def _out_hw(h: int, w: int, stride: int) -> tuple[int, int]:
    return (h - 1) // stride + 1, (w - 1) // stride + 1


def dw_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    stride: int,
    act: int,
    out: torch.Tensor,
) -> None:
    """out = act(conv_dw3x3(x, weight, stride) * scale[c] + shift[c]), out preallocated."""
    if out.numel() == 0:
        return
    n, c, h, w = x.shape
    ho, wo = _out_hw(h, w, stride)
    assert out.shape == (n, c, ho, wo), (out.shape, (n, c, ho, wo))
    x, weight = dense(x), weight.contiguous()
    scale, shift = scale.contiguous(), shift.contiguous()
    x_s = layout_strides(x)
    y_s = layout_strides(out)

    def grid(meta):
        cb = triton.cdiv(c, meta["BLOCK_C"])
        return (tile_programs(n * triton.cdiv(ho * wo, meta["BLOCK_P"]), cb, x.device), cb)

    _dw_fwd_kernel[grid](
        x,
        weight,
        scale,
        shift,
        out,
        n,
        c,
        h,
        w,
        wo,
        ho * wo,
        *x_s,
        *y_s,
        S=int(stride),
        ACT=int(act),
        ACC=acc_tl_dtype(x.dtype),
        I64=needs_i64(x, out),
    )


def dw_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    mean_out: torch.Tensor,
    var_out: torch.Tensor,
) -> None:
    """Per-channel mean and biased variance of z = conv_dw3x3(x, weight, stride) over
    (N, Ho, Wo), deterministic (fixed-order two-stage reduction)."""
    n, c, h, w = x.shape
    ho, wo = _out_hw(h, w, stride)
    hwo = ho * wo
    chunk = pixel_chunk(n, hwo, c, x.device)
    n_chunks = triton.cdiv(hwo, chunk) if hwo > 0 else 0
    q = n * n_chunks
    if q == 0:
        mean_out.zero_()
        var_out.zero_()
        return
    x, weight = dense(x), weight.contiguous()
    acc = mean_out.dtype
    piv_ws, mean_ws, m2_ws = torch.empty((3, q, c), dtype=acc, device=x.device).unbind(0)
    cnt_ws = torch.empty((q,), dtype=acc, device=x.device)

    def grid(meta):
        return (q, triton.cdiv(c, meta["BLOCK_C"]))

    _dw_stats_kernel[grid](
        x,
        weight,
        piv_ws,
        mean_ws,
        m2_ws,
        cnt_ws,
        c,
        h,
        w,
        wo,
        hwo,
        chunk,
        n_chunks,
        *layout_strides(x),
        S=int(stride),
        ACC=acc_tl_dtype(x.dtype),
        I64=needs_i64(x),
    )
    merge_stats(cnt_ws, piv_ws, mean_ws, m2_ws, mean_out, var_out)
