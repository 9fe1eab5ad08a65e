"""Pointwise 1x1 conv forward as a GEMM, Y[m, co] = sum_ci X[m, ci] W[co, ci], with fused
epilogues: scale/shift + act (pw_fwd), or z plus per-program per-channel partial statistics from
the fp32 accumulator (pw_fwd_stats), merged in a fixed order.

Rows m are the pixels of an image (NCHW: one GEMM per image, batched over the grid) or of the
whole batch (channels_last, where images are contiguous in pixel order). Tensors are addressed
by (image, channel, pixel) strides; Triton specializes unit strides, so channels_last tiles are
contiguous along the channel axis and NCHW tiles along the pixel axis.
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
    dot_precision,
    finish_prune,
    layout_strides,
    merge_stats,
    needs_i64,
    next_pow2,
    pick_configs,
)


def _gemm_configs(with_bm: bool = True) -> list:
    shapes = [
        # BM, BN, BK, warps, stages
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (128, 32, 32, 4, 4),
        (64, 32, 32, 2, 5),
        (32, 64, 32, 2, 5),
        (256, 64, 32, 8, 3),
        # Hopper-sized tiles (cuBLAS picks 256x128, BK 64 for MobileNet's 512/1024-channel
        # layers on an H100); over an A100's shared memory in fp32, where the autotuner skips them
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
    ]
    gpu, seen = [], set()
    for bm, bn, bk, nw, ns in shapes:
        kw = {"BM": bm, "BN": bn, "BK": bk} if with_bm else {"BN": bn, "BK": bk}
        sig = (tuple(sorted(kw.items())), nw, ns)
        if sig not in seen:
            seen.add(sig)
            gpu.append(triton.Config(kw, num_warps=nw, num_stages=ns))
    kw = {"BM": 32, "BN": 32, "BK": 16} if with_bm else {"BN": 32, "BK": 16}
    interp = [triton.Config(kw, num_warps=4, num_stages=1)]
    return pick_configs(gpu, interp)


def _tile_volume(kw: dict) -> int:
    return kw.get("BM", 16) * kw["BN"] * kw["BK"]


# Pipeline depth for fp64: its tiles take twice the shared memory of fp32 ones, and with 4-5
# stages even the smallest tiles of the backward GEMMs (which stream grad_y and z tiles) need
# more than an A100 has (163 KB), so that small-channel fp64 launches had no config to run.
FP64_MAX_STAGES = 3


def _cap_stages(cfg, stages: int):
    return cfg if cfg.num_stages <= stages else config_with(cfg, num_stages=stages)


def prune_gemm_configs(configs, named_args, **kwargs):
    """Drops tiles much larger than the problem: BN beyond the output columns, BK beyond the
    reduction length, BM beyond the rows; caps the stages at FP64_MAX_STAGES for fp64."""
    args = {**named_args, **kwargs}
    n_max = max(16, next_pow2(args["GEMM_N"]))
    k_max = max(16, next_pow2(args["GEMM_K"]))
    m_max = max(16, next_pow2(args["GEMM_M"]))
    keep = [
        cfg
        for cfg in configs
        if cfg.kwargs["BN"] <= n_max
        and cfg.kwargs["BK"] <= k_max
        and cfg.kwargs.get("BM", 16) <= m_max
    ]
    if not keep:
        keep = [min(configs, key=lambda cfg: _tile_volume(cfg.kwargs))]
    if args.get("ACC") == tl.float64:
        keep = [_cap_stages(cfg, FP64_MAX_STAGES) for cfg in keep]
    return finish_prune(keep)


GEMM_CONFIGS = _gemm_configs(True)
GEMM_CONFIGS_NO_BM = _gemm_configs(False)
_PRUNE = {"early_config_prune": prune_gemm_configs}


def gemm_geometry(tensors: list[torch.Tensor]) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(B, P, strides): the batch of per-image GEMMs and each tensor's (image, channel, pixel)
    strides. When every tensor has its images back to back in pixel order (channels_last, or a
    single channel), the batch is folded into the rows: B = 1, P = N * H * W."""
    n, _, h, w = tensors[0].shape
    hw = h * w
    strides = [layout_strides(t) for t in tensors]
    if n > 1 and all(s[0] == hw * s[2] for s in strides):
        return 1, n * hw, [(0, s[1], s[2]) for s in strides]
    return n, hw, strides


@triton.jit
def _pw_fwd_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    B,
    P,
    Cin,
    Cout,
    x_sn,
    x_sc,
    x_sp,
    y_sn,
    y_sc,
    y_sp,
    GEMM_M,
    GEMM_N,
    GEMM_K,
    ACT: tl.constexpr,
    STATS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    I64: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """One [BM, BN] output tile: acc = X_tile @ W^T_tile. STATS=False stores
    y = act(acc * scale + shift); STATS=True stores z = acc in y's dtype (scale/shift unused).
    Returns the fp32 (fp64) accumulator and tile facts for a statistics epilogue."""
    pid = tl.program_id(0).to(tl.int64)
    n_tiles = tl.cdiv(Cout, BN)
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
    nmask = rn < Cout
    x_img = x_ptr + b * x_sn
    acc = tl.zeros([BM, BN], dtype=ACC)
    for k0 in range(0, Cin, BK):
        rk = k0 + tl.arange(0, BK)
        if I64:
            rk = rk.to(tl.int64)
        kmask = rk < Cin
        a = tl.load(
            x_img + rm[:, None] * x_sp + rk[None, :] * x_sc,
            mask=mmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr + rn[None, :] * Cin + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0
        )
        acc = tl.dot(a, wt, acc, input_precision=PREC, out_dtype=ACC)
    y_off = b * y_sn + rm[:, None] * y_sp + rn[None, :] * y_sc
    m2d = mmask[:, None] & nmask[None, :]
    if STATS:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m2d)
    else:
        s = tl.load(scale_ptr + rn, mask=nmask, other=0.0).to(ACC)
        sh = tl.load(shift_ptr + rn, mask=nmask, other=0.0).to(ACC)
        v = apply_act(acc * s[None, :] + sh[None, :], ACT)
        tl.store(y_ptr + y_off, v.to(y_ptr.dtype.element_ty), mask=m2d)
    return acc, mmask, nmask, rn, pid_m, pid_n, P - row0


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=GEMM_CONFIGS,
    key=["B", "P", "Cin", "Cout", "x_sc", "y_sc"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _pw_fwd_act_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    B,
    P,
    Cin,
    Cout,
    x_sn,
    x_sc,
    x_sp,
    y_sn,
    y_sc,
    y_sp,
    GEMM_M,
    GEMM_N,
    GEMM_K,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    I64: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    _pw_fwd_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,
        shift_ptr,
        y_ptr,
        B,
        P,
        Cin,
        Cout,
        x_sn,
        x_sc,
        x_sp,
        y_sn,
        y_sc,
        y_sp,
        GEMM_M,
        GEMM_N,
        GEMM_K,
        ACT,
        False,
        ACC,
        PREC,
        I64,
        BM,
        BN,
        BK,
    )


@triton.autotune(
    **AUTOTUNE_OPTS,
    configs=GEMM_CONFIGS_NO_BM,
    key=["B", "P", "Cin", "Cout", "x_sc", "BM"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _pw_fwd_stats_kernel(
    x_ptr,
    w_ptr,
    piv_ws,
    mean_ws,
    m2_ws,
    cnt_ws,
    z_ptr,
    B,
    P,
    Cin,
    Cout,
    x_sn,
    x_sc,
    x_sp,
    z_sn,
    z_sc,
    z_sp,
    GEMM_M,
    GEMM_N,
    GEMM_K,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    I64: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """z tile plus the tile's per-channel statistics of the accumulator: a pivot (its first
    row), the mean of acc - pivot, M2, and the row count. BM is fixed by the launcher (not
    tuned): it sets the number of partials."""
    acc, mmask, nmask, rn, pid_m, pid_n, rows_left = _pw_fwd_kernel(
        x_ptr,
        w_ptr,
        mean_ws,
        m2_ws,
        z_ptr,
        B,
        P,
        Cin,
        Cout,
        x_sn,
        x_sc,
        x_sp,
        z_sn,
        z_sc,
        z_sp,
        GEMM_M,
        GEMM_N,
        GEMM_K,
        0,
        True,
        ACC,
        PREC,
        I64,
        BM,
        BN,
        BK,
    )
    nb = tl.minimum(rows_left, BM).to(ACC)
    piv = tl.sum(tl.where((tl.arange(0, BM) == 0)[:, None], acc, 0.0), axis=0)
    acc = acc - piv[None, :]
    mb = tl.sum(tl.where(mmask[:, None], acc, 0.0), axis=0) / nb
    d = tl.where(mmask[:, None], acc - mb[None, :], 0.0)
    m2b = tl.sum(d * d, axis=0)
    q = pid_m.to(tl.int64)
    tl.store(piv_ws + q * Cout + rn, piv, mask=nmask)
    tl.store(mean_ws + q * Cout + rn, mb, mask=nmask)
    tl.store(m2_ws + q * Cout + rn, m2b, mask=nmask)
    if pid_n == 0:
        tl.store(cnt_ws + q, nb)


def pw_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    act: int,
    out: torch.Tensor,
) -> None:
    """out = act((weight @ x per pixel) * scale + shift); weight is (Cout, Cin)."""
    if out.numel() == 0:
        return
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    weight, x = weight.reshape(cout, cin).contiguous(), dense(x)
    scale, shift = scale.contiguous(), shift.contiguous()
    nb, p, (x_s, y_s) = gemm_geometry([x, out])

    def grid(meta):
        return (triton.cdiv(cout, meta["BN"]) * nb * triton.cdiv(p, meta["BM"]),)

    _pw_fwd_act_kernel[grid](
        x,
        weight,
        scale,
        shift,
        out,
        nb,
        p,
        cin,
        cout,
        *x_s,
        *y_s,
        p,
        cout,
        cin,
        ACT=int(act),
        ACC=acc_tl_dtype(x.dtype),
        PREC=dot_precision(x.dtype),
        I64=needs_i64(x, out),
    )


def stats_block_m(rows: int) -> int:
    """Rows per statistics partial in pw_fwd_stats (the GEMM's BM there, not autotuned)."""
    if len(GEMM_CONFIGS) == 1:
        return GEMM_CONFIGS[0].kwargs["BM"]
    return 128 if rows >= 4096 else 64


def pw_fwd_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    z_out: torch.Tensor,
    mean_out: torch.Tensor,
    var_out: torch.Tensor,
) -> None:
    """z = conv1x1(x) (x's dtype), and per-channel mean and biased variance of z over (N, H, W)
    computed from the fp32 accumulators, deterministically."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    if z_out.numel() == 0:
        mean_out.zero_()
        var_out.zero_()
        return
    weight, x = weight.reshape(cout, cin).contiguous(), dense(x)
    nb, p, (x_s, z_s) = gemm_geometry([x, z_out])
    bm = stats_block_m(nb * p)
    q = nb * triton.cdiv(p, bm)
    acc = mean_out.dtype
    piv_ws, mean_ws, m2_ws = torch.empty((3, q, cout), dtype=acc, device=x.device).unbind(0)
    cnt_ws = torch.empty((q,), dtype=acc, device=x.device)

    def grid(meta):
        return (triton.cdiv(cout, meta["BN"]) * q,)

    _pw_fwd_stats_kernel[grid](
        x,
        weight,
        piv_ws,
        mean_ws,
        m2_ws,
        cnt_ws,
        z_out,
        nb,
        p,
        cin,
        cout,
        *x_s,
        *z_s,
        p,
        cout,
        cin,
        ACC=acc_tl_dtype(x.dtype),
        PREC=dot_precision(x.dtype),
        I64=needs_i64(x, z_out),
        BM=bm,
    )
    merge_stats(cnt_ws, piv_ws, mean_ws, m2_ws, mean_out, var_out)
