"""Pointwise 1x1 conv + BN + act backward.

pw_bwd_reduce: per-channel sums of g_z and g_z * xhat with g_z = grad_y * act'(z*scale+shift)
and xhat = (z - mean) * invstd, as per-program partials reduced in a fixed order.

pw_bwd: two GEMMs over g_conv = k*g_z + b*z + c:
  grad_x = g_conv · W        ([M, Cout] x [Cout, Cin], per image for NCHW)
  grad_w = g_convᵀ · X       ([Cout, M] x [M, Cin], split over M into SPLIT fp32 partials that
                              are summed in a fixed order: deterministic, no atomics)
Two ways to feed them (DWSEP_TRITON_PW_BWD, or pw_bwd's g_mode):
  "materialize" (default): one elementwise pass writes g_conv (input dtype), then both GEMMs
      load it as a plain operand, so Triton pipelines the loads straight into the tensor cores.
  "fused": each GEMM rebuilds g_conv from grad_y and z in its K loop (no g_conv tensor, but
      two loads and the BN/act arithmetic per operand element, in every output tile column).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    AUTOTUNE_OPTS,
    INTERPRET,
    acc_tl_dtype,
    act_pass,
    dense,
    dot_precision,
    needs_i64,
    num_sms,
    pixel_chunk,
    sum_partials,
)
from .depthwise_fwd import TILE_CONFIGS, prune_tile_configs
from .pointwise_fwd import GEMM_CONFIGS, gemm_geometry, prune_gemm_configs

_PRUNE = {"early_config_prune": prune_gemm_configs}


@triton.jit
def _g_conv(gy, zv, kk, bb, cc, sc, sh, m2d, ACT: tl.constexpr):
    """g_conv = k*g_z + b*z + c with g_z = gy * act'(z*scale + shift); 0 outside the mask.
    Operands broadcast to the tile (per-channel vectors already expanded by the caller)."""
    if ACT != 0:
        gz = tl.where(act_pass(zv * sc + sh, ACT), gy, 0.0)
    else:
        gz = gy
    return tl.where(m2d, kk * gz + bb * zv + cc, 0.0)


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=TILE_CONFIGS,
    key=["C", "P", "x_sc", "gy_sc", "g_sc"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)
@triton.jit
def _pw_bwd_g_kernel(
    gy_ptr,
    z_ptr,
    scale_ptr,
    shift_ptr,
    k_ptr,
    b_ptr,
    c_ptr,
    g_ptr,
    C,
    P,
    gy_sn,
    gy_sc,
    gy_sp,
    x_sn,
    x_sc,
    x_sp,
    g_sn,
    g_sc,
    g_sp,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """g_conv for one [BLOCK_P, BLOCK_C] tile of one image, in g's dtype; x_s* are z's strides
    (named for the shared config pruning). Grid: (images * pixel tiles, channel blocks)."""
    q = tl.program_id(0).to(tl.int64)
    p_tiles = tl.cdiv(P, BLOCK_P)
    n = q // p_tiles
    p = (q % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        c = c.to(tl.int64)
    else:
        p = p.to(tl.int32)
    cmask = c < C
    m2d = (p < P)[:, None] & cmask[None, :]
    gy = tl.load(gy_ptr + n * gy_sn + p[:, None] * gy_sp + c[None, :] * gy_sc, mask=m2d, other=0.0)
    zv = tl.load(z_ptr + n * x_sn + p[:, None] * x_sp + c[None, :] * x_sc, mask=m2d, other=0.0)
    kk = tl.load(k_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    bb = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    cc = tl.load(c_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    sc = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    sh = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    g = _g_conv(gy.to(ACC), zv.to(ACC), kk, bb, cc, sc, sh, m2d, ACT)
    g_off = n * g_sn + p[:, None] * g_sp + c[None, :] * g_sc
    tl.store(g_ptr + g_off, g.to(g_ptr.dtype.element_ty), mask=m2d)


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=TILE_CONFIGS,
    key=["C", "P", "x_sc", "CHUNK"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)
@triton.jit
def _pw_bwd_reduce_kernel(
    gy_ptr,
    z_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    invstd_ptr,
    ws_gz,
    ws_gzx,
    C,
    P,
    CHUNK,
    n_chunks,
    gy_sn,
    gy_sc,
    gy_sp,
    x_sn,
    x_sc,
    x_sp,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """x_s* are z's strides (named for the shared config pruning)."""
    q = tl.program_id(0).to(tl.int64)
    n = q // n_chunks
    p_begin = (q % n_chunks) * CHUNK
    if not I64:
        p_begin = p_begin.to(tl.int32)
    p_end = tl.minimum(p_begin + CHUNK, P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        c = c.to(tl.int64)
    cmask = c < C
    mu = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    istd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(ACC)
    if ACT != 0:
        sc = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC)
        sh = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC)
    gy_img = gy_ptr + n * gy_sn
    z_img = z_ptr + n * x_sn
    acc_gz = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    acc_gzx = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m2d = (p < p_end)[:, None] & cmask[None, :]
        gy = tl.load(gy_img + p[:, None] * gy_sp + c[None, :] * gy_sc, mask=m2d, other=0.0)
        zv = tl.load(z_img + p[:, None] * x_sp + c[None, :] * x_sc, mask=m2d, other=0.0)
        gy = gy.to(ACC)
        zv = zv.to(ACC)
        if ACT != 0:
            gz = tl.where(m2d & act_pass(zv * sc[None, :] + sh[None, :], ACT), gy, 0.0)
        else:
            gz = gy
        acc_gz += gz
        acc_gzx += gz * ((zv - mu[None, :]) * istd[None, :])
    tl.store(ws_gz + q * C + c, tl.sum(acc_gz, axis=0), mask=cmask)
    tl.store(ws_gzx + q * C + c, tl.sum(acc_gzx, axis=0), mask=cmask)


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=GEMM_CONFIGS,
    key=["B", "P", "Cin", "Cout", "x_sc", "G_READY"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _pw_bwd_dx_kernel(
    gy_ptr,
    z_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    k_ptr,
    b_ptr,
    c_ptr,
    gx_ptr,
    B,
    P,
    Cin,
    Cout,
    gy_sn,
    gy_sc,
    gy_sp,
    z_sn,
    z_sc,
    z_sp,
    x_sn,
    x_sc,
    x_sp,
    GEMM_M,
    GEMM_N,
    GEMM_K,
    ACT: tl.constexpr,
    G_READY: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    I64: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """grad_x[m, ci] = sum_co g_conv[m, co] W[co, ci]; x_s* are grad_x's strides. G_READY:
    gy_ptr holds g_conv itself (z and the vectors unused)."""
    pid = tl.program_id(0).to(tl.int64)
    n_tiles = tl.cdiv(Cin, BN)
    m_tiles = tl.cdiv(P, BM)
    pid_n = pid % n_tiles
    pid_m = pid // n_tiles
    b = pid_m // m_tiles
    row0 = (pid_m % m_tiles) * BM
    rm = row0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    if not I64:
        rm = rm.to(tl.int32)
        rn = rn.to(tl.int32)
    mmask = rm < P
    nmask = rn < Cin
    gy_img = gy_ptr + b * gy_sn
    z_img = z_ptr + b * z_sn
    acc = tl.zeros([BM, BN], dtype=ACC)
    for k0 in range(0, Cout, BK):
        rk = k0 + tl.arange(0, BK)
        if I64:
            rk = rk.to(tl.int64)
        kmask = rk < Cout
        m2d = mmask[:, None] & kmask[None, :]
        gy = tl.load(gy_img + rm[:, None] * gy_sp + rk[None, :] * gy_sc, mask=m2d, other=0.0)
        if G_READY:
            g = gy
        else:
            zv = tl.load(z_img + rm[:, None] * z_sp + rk[None, :] * z_sc, mask=m2d, other=0.0)
            kk = tl.load(k_ptr + rk, mask=kmask, other=0.0).to(ACC)
            bb = tl.load(b_ptr + rk, mask=kmask, other=0.0).to(ACC)
            cc = tl.load(c_ptr + rk, mask=kmask, other=0.0).to(ACC)
            sc = tl.load(scale_ptr + rk, mask=kmask, other=0.0).to(ACC)
            sh = tl.load(shift_ptr + rk, mask=kmask, other=0.0).to(ACC)
            g = _g_conv(
                gy.to(ACC),
                zv.to(ACC),
                kk[None, :],
                bb[None, :],
                cc[None, :],
                sc[None, :],
                sh[None, :],
                m2d,
                ACT,
            ).to(w_ptr.dtype.element_ty)
        wt = tl.load(
            w_ptr + rk[:, None] * Cin + rn[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0
        )
        acc = tl.dot(g, wt, acc, input_precision=PREC, out_dtype=ACC)
    x_off = b * x_sn + rm[:, None] * x_sp + rn[None, :] * x_sc
    tl.store(gx_ptr + x_off, acc.to(gx_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=GEMM_CONFIGS,
    key=["B", "P", "Cin", "Cout", "x_sc", "SPLIT", "G_READY"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _pw_bwd_dw_kernel(
    gy_ptr,
    z_ptr,
    x_ptr,
    scale_ptr,
    shift_ptr,
    k_ptr,
    b_ptr,
    c_ptr,
    ws_ptr,
    B,
    P,
    Cin,
    Cout,
    SPLIT,
    gy_sn,
    gy_sc,
    gy_sp,
    z_sn,
    z_sc,
    z_sp,
    x_sn,
    x_sc,
    x_sp,
    GEMM_M,
    GEMM_N,
    GEMM_K,
    ACT: tl.constexpr,
    G_READY: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    I64: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """ws[s, co, ci] = sum over the rows m of split s of g_conv[m, co] * x[m, ci]. The rows are
    BK-pixel tiles of the images (t = image * tiles_per_image + tile), split s taking a
    contiguous run of them. G_READY: gy_ptr holds g_conv itself (z and the vectors unused)."""
    pid = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    n_tiles = tl.cdiv(Cin, BN)
    pid_n = pid % n_tiles
    pid_m = pid // n_tiles
    rco = pid_m * BM + tl.arange(0, BM)
    rci = pid_n * BN + tl.arange(0, BN)
    if not I64:
        rco = rco.to(tl.int32)
        rci = rci.to(tl.int32)
    comask = rco < Cout
    cimask = rci < Cin
    if not G_READY:
        kk = tl.load(k_ptr + rco, mask=comask, other=0.0).to(ACC)[:, None]
        bb = tl.load(b_ptr + rco, mask=comask, other=0.0).to(ACC)[:, None]
        cc = tl.load(c_ptr + rco, mask=comask, other=0.0).to(ACC)[:, None]
        sc = tl.load(scale_ptr + rco, mask=comask, other=0.0).to(ACC)[:, None]
        sh = tl.load(shift_ptr + rco, mask=comask, other=0.0).to(ACC)[:, None]
    k_tiles = tl.cdiv(P, BK)
    total = B * k_tiles
    per = tl.cdiv(total, SPLIT)
    t0 = s * per
    t1 = tl.minimum(t0 + per, total)
    acc = tl.zeros([BM, BN], dtype=ACC)
    for t in range(t0, t1):
        b = t // k_tiles
        pk = (t % k_tiles) * BK + tl.arange(0, BK)
        if not I64:
            pk = pk.to(tl.int32)
        pkmask = pk < P
        m2d = comask[:, None] & pkmask[None, :]
        g_off = rco[:, None] * gy_sc + pk[None, :] * gy_sp
        gy = tl.load(gy_ptr + b * gy_sn + g_off, mask=m2d, other=0.0)
        if G_READY:
            g = gy
        else:
            z_off = rco[:, None] * z_sc + pk[None, :] * z_sp
            zv = tl.load(z_ptr + b * z_sn + z_off, mask=m2d, other=0.0)
            g = _g_conv(gy.to(ACC), zv.to(ACC), kk, bb, cc, sc, sh, m2d, ACT)
            g = g.to(x_ptr.dtype.element_ty)
        xt = tl.load(
            x_ptr + b * x_sn + pk[:, None] * x_sp + rci[None, :] * x_sc,
            mask=pkmask[:, None] & cimask[None, :],
            other=0.0,
        )
        acc = tl.dot(g, xt, acc, input_precision=PREC, out_dtype=ACC)
    ws_off = s * Cout * Cin + rco[:, None] * Cin + rci[None, :]
    tl.store(ws_ptr + ws_off, acc, mask=comask[:, None] & cimask[None, :])


def pw_bwd_reduce(
    grad_y: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    act: int,
    sum_gz_out: torch.Tensor,
    sum_gzxh_out: torch.Tensor,
) -> None:
    """sum_gz[c] = sum g_z, sum_gzxh[c] = sum g_z * (z - mean) * invstd over (N, H, W), with
    g_z = grad_y * act'(z * scale + shift)."""
    n, c, h, w = z.shape
    if z.numel() == 0:
        sum_gz_out.zero_()
        sum_gzxh_out.zero_()
        return
    grad_y, z = dense(grad_y), dense(z)
    scale, shift = scale.contiguous(), shift.contiguous()
    mean, invstd = mean.contiguous(), invstd.contiguous()
    nb, p, (gy_s, z_s) = gemm_geometry([grad_y, z])
    chunk = pixel_chunk(nb, p, c, z.device)
    n_chunks = triton.cdiv(p, chunk)
    q = nb * n_chunks
    acc = sum_gz_out.dtype
    ws_gz = torch.empty((q, c), dtype=acc, device=z.device)
    ws_gzx = torch.empty((q, c), dtype=acc, device=z.device)

    def grid(meta):
        return (q, triton.cdiv(c, meta["BLOCK_C"]))

    _pw_bwd_reduce_kernel[grid](
        grad_y,
        z,
        scale,
        shift,
        mean,
        invstd,
        ws_gz,
        ws_gzx,
        c,
        p,
        chunk,
        n_chunks,
        *gy_s,
        *z_s,
        ACT=int(act),
        ACC=acc_tl_dtype(z.dtype),
        I64=needs_i64(z, grad_y),
    )
    sum_partials(ws_gz, sum_gz_out)
    sum_partials(ws_gzx, sum_gzxh_out)


def _split_count(m: int, cout: int, cin: int, device: torch.device) -> int:
    """Number of M splits for the weight-gradient GEMM: enough programs to fill the GPU, each
    with at least a few hundred rows, and a bounded workspace."""
    if INTERPRET:
        return max(1, min(3, triton.cdiv(m, 48)))
    tiles = triton.cdiv(cout, 128) * triton.cdiv(cin, 128)
    split = min(triton.cdiv(m, 512), triton.cdiv(4 * num_sms(device), tiles), 64)
    split = min(split, max(1, (64 << 20) // (4 * cout * cin)))
    return max(1, split)


PW_BWD_MODES = ("materialize", "fused")


def pw_bwd_mode(g_mode: Optional[str] = None) -> str:
    """How pw_bwd feeds its GEMMs: g_mode, else $DWSEP_TRITON_PW_BWD, else "materialize"."""
    mode = g_mode or os.environ.get("DWSEP_TRITON_PW_BWD") or "materialize"
    if mode not in PW_BWD_MODES:
        raise ValueError(
            f"DWSEP_TRITON_PW_BWD (or g_mode) must be one of {PW_BWD_MODES}, got {mode!r}"
        )
    return mode


def _materialize_g(grad_y, z, scale, shift, k, b, c, act, g, nb, p, strides, i64) -> None:
    """g = g_conv(grad_y, z) in one elementwise pass (strides: grad_y's, z's, g's)."""
    cout = z.shape[1]

    def grid(meta):
        return (nb * triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_C"]))

    _pw_bwd_g_kernel[grid](
        grad_y,
        z,
        scale,
        shift,
        k,
        b,
        c,
        g,
        cout,
        p,
        *strides[0],
        *strides[1],
        *strides[2],
        ACT=int(act),
        ACC=acc_tl_dtype(z.dtype),
        I64=i64,
    )


def pw_bwd(
    grad_y: torch.Tensor,
    z: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    k: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    act: int,
    grad_x_out: torch.Tensor,
    grad_w_out: torch.Tensor,
    g_mode: Optional[str] = None,
) -> None:
    """grad_x = g_conv · W and grad_w = g_convᵀ · X for g_conv = k*g_z + b*z + c; g_mode is
    "materialize" or "fused" (see the module docstring; default from pw_bwd_mode())."""
    materialize = pw_bwd_mode(g_mode) == "materialize"
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    if x.numel() == 0:
        grad_w_out.zero_()
        return
    weight = weight.reshape(cout, cin).contiguous()
    grad_y, z, x = dense(grad_y), dense(z), dense(x)
    scale, shift = scale.contiguous(), shift.contiguous()
    k, b, c = k.contiguous(), b.contiguous(), c.contiguous()
    g = torch.empty_like(z) if materialize else z  # z is dense: g gets its layout
    nb, p, (gy_s, z_s, x_s, gx_s, g_s) = gemm_geometry([grad_y, z, x, grad_x_out, g])
    acc = acc_tl_dtype(x.dtype)
    prec = dot_precision(x.dtype)
    i64 = needs_i64(grad_y, z, x, grad_x_out)
    if materialize:
        _materialize_g(grad_y, z, scale, shift, k, b, c, act, g, nb, p, (gy_s, z_s, g_s), i64)
        grad_y, gy_s = g, g_s

    def grid_dx(meta):
        return (triton.cdiv(cin, meta["BN"]) * nb * triton.cdiv(p, meta["BM"]),)

    _pw_bwd_dx_kernel[grid_dx](
        grad_y,
        z,
        weight,
        scale,
        shift,
        k,
        b,
        c,
        grad_x_out,
        nb,
        p,
        cin,
        cout,
        *gy_s,
        *z_s,
        *gx_s,
        p,
        cin,
        cout,
        ACT=int(act),
        G_READY=materialize,
        ACC=acc,
        PREC=prec,
        I64=i64,
    )
    split = _split_count(nb * p, cout, cin, x.device)
    ws = torch.empty((split, cout * cin), dtype=k.dtype, device=x.device)

    def grid_dw(meta):
        return (triton.cdiv(cout, meta["BM"]) * triton.cdiv(cin, meta["BN"]), split)

    _pw_bwd_dw_kernel[grid_dw](
        grad_y,
        z,
        x,
        scale,
        shift,
        k,
        b,
        c,
        ws,
        nb,
        p,
        cin,
        cout,
        split,
        *gy_s,
        *z_s,
        *x_s,
        cout,
        cin,
        nb * p,
        ACT=int(act),
        G_READY=materialize,
        ACC=acc,
        PREC=prec,
        I64=i64,
    )
    sum_partials(ws, grad_w_out.view(cout * cin))
