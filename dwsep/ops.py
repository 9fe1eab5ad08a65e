"""Custom-op glue: fake (meta) implementations, the Triton op registrations, and the
``torch.autograd.Function`` s that drive the forward and backward ops of each backend.

The compiled ops live in the ``dwsep`` namespace (schemas in ``csrc/registration.cpp``, CPU and
CUDA kernels attached per device). The Triton backend registers the same schemas under
``dwsep_triton`` (see :func:`_register_triton_ops`). Both share the fake implementations here,
so ``torch.compile(fullgraph=True)`` traces either without graph breaks.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ext
from ._validation import memory_format

# --------------------------------------------------------------------------------------------
# Output allocation, shared by the fake impls and the Triton ops.

_POISON = False  # see dwsep._debug.poison_outputs


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-channel vectors (scale, shift, statistics): fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new(shape, like: Tensor, dtype: Optional[torch.dtype] = None, fmt=None) -> Tensor:
    out = torch.empty(
        shape,
        dtype=dtype or like.dtype,
        device=like.device,
        memory_format=fmt or torch.contiguous_format,
    )
    if _POISON and out.numel() > 0 and not isinstance(out, torch._subclasses.FakeTensor):
        out.fill_(float("nan"))
    return out


def _vec(like: Tensor, n: int) -> Tensor:
    return _new((n,), like, acc_dtype(like.dtype))


def conv_out_hw(h: int, w: int, stride: int) -> tuple[int, int]:
    """Output size of a 3x3, padding-1 conv: floor((H - 1) / s) + 1."""
    return (h - 1) // stride + 1, (w - 1) // stride + 1


def alloc_dw_fwd(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    n, c, h, w = x.shape
    ho, wo = conv_out_hw(h, w, stride)
    return _new((n, c, ho, wo), x, fmt=memory_format(x))


def alloc_pw_out(x: Tensor, weight: Tensor) -> Tensor:
    n, _, h, w = x.shape
    return _new((n, weight.shape[0], h, w), x, fmt=memory_format(x))


def _fake_dw_fwd(x, weight, scale, shift, stride, act):
    return alloc_dw_fwd(x, weight, stride)


def _fake_dw_stats(x, weight, stride):
    return _vec(x, x.shape[1]), _vec(x, x.shape[1])


def _fake_dw_fwd_stats(x, weight, stride):
    return alloc_dw_fwd(x, weight, stride), _vec(x, x.shape[1]), _vec(x, x.shape[1])


def _fake_dw_bwd_reduce(grad_y, y, x, weight, mean, invstd, stride, act):
    return _vec(x, x.shape[1]), _vec(x, x.shape[1])


def _fake_dw_bwd(grad_y, y, x, weight, k, b, c, stride, act, use_z):
    return _new(x.shape, x, fmt=memory_format(x)), _new(weight.shape, weight)


def _fake_pw_fwd(x, weight, scale, shift, act):
    return alloc_pw_out(x, weight)


def _fake_pw_fwd_stats(x, weight):
    return alloc_pw_out(x, weight), _vec(x, weight.shape[0]), _vec(x, weight.shape[0])


def _fake_bn_act(z, scale, shift, act):
    return _new(z.shape, z, fmt=memory_format(z))


def _fake_pw_bwd_reduce(grad_y, z, scale, shift, mean, invstd, act):
    return _vec(z, z.shape[1]), _vec(z, z.shape[1])


def _fake_pw_bwd(grad_y, z, x, weight, scale, shift, k, b, c, act):
    return _new(x.shape, x, fmt=memory_format(x)), _new(weight.shape, weight)


FAKES = {
    "dw_fwd": _fake_dw_fwd,
    "dw_stats": _fake_dw_stats,
    "dw_fwd_stats": _fake_dw_fwd_stats,
    "dw_bwd_reduce": _fake_dw_bwd_reduce,
    "dw_bwd": _fake_dw_bwd,
    "pw_fwd": _fake_pw_fwd,
    "pw_fwd_stats": _fake_pw_fwd_stats,
    "bn_act": _fake_bn_act,
    "pw_bwd_reduce": _fake_pw_bwd_reduce,
    "pw_bwd": _fake_pw_bwd,
}
OP_NAMES = tuple(FAKES)

if _ext.HAS_C:
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"dwsep::{_name}")(_fake)


# --------------------------------------------------------------------------------------------
# Triton ops: the same schemas in the dwsep_triton namespace, registered on first use so that
# triton (and TRITON_INTERPRET) is only looked at when the triton backend is asked for.

_triton_lock = threading.Lock()
_triton_registered = False


def _register_triton_ops() -> None:
    global _triton_registered
    with _triton_lock:
        if _triton_registered:
            return
        from ._triton_ops import register

        register(FAKES)
        _triton_registered = True


def _register_triton_ops_at_import() -> None:
    """Register the Triton ops up front where they can run, so that torch.compile never has to
    trace the (lazy) registration itself."""
    from . import backends

    if backends.triton_version() is None:
        return
    if not (torch.cuda.is_available() or backends.triton_interpret()):
        return
    try:
        _register_triton_ops()
    except Exception as exc:  # a broken triton install must not break `import dwsep`
        import warnings

        warnings.warn(
            f"dwsep: the Triton kernels could not be registered ({type(exc).__name__}: {exc})",
            RuntimeWarning,
            stacklevel=2,
        )


def op_table(backend: str):
    """The op namespace that implements ``backend``: ``torch.ops.dwsep`` for the compiled
    cpu/cuda kernels (the dispatcher picks the device), ``torch.ops.dwsep_triton`` for Triton."""
    if backend == "triton":
        if not _triton_registered:
            _register_triton_ops()
        return torch.ops.dwsep_triton
    return torch.ops.dwsep


# --------------------------------------------------------------------------------------------
# Autograd


def _as(t, dtype):
    """t in dtype; t itself when it already is (skips a dispatcher round trip per call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _bn_affine(mean, invstd, bn_weight, bn_bias, acc):
    """Fold BN into scale = gamma * invstd and shift = beta - mean * scale (acc dtype), in as
    few small-tensor ops as possible (each is a kernel launch on a GPU)."""
    scale = invstd * _as(bn_weight, acc) if bn_weight is not None else invstd
    if bn_bias is not None:
        shift = torch.addcmul(_as(bn_bias, acc), mean, scale, value=-1)
    else:
        shift = torch.mul(mean, scale).neg_()
    return scale.contiguous(), shift.contiguous()


def _grad_coefficients(training, scale, invstd, mean, sum_gz, sum_gzxh, count):
    """g_conv = k * g_z + b * z + c (train); g_conv = scale * g_z (eval)."""
    if not training:
        zero = torch.zeros_like(scale)
        return scale, zero, zero
    inv_n = 1.0 / max(count, 1)
    k = scale
    b = -k * invstd * (sum_gzxh * inv_n)
    c = -k * (sum_gz * inv_n) - b * mean
    return k.contiguous(), b.contiguous(), c.contiguous()


def _stats(training, batch_mean, batch_var, running_mean, running_var, eps, acc):
    if training:
        return batch_mean, torch.rsqrt(batch_var + eps)
    return _as(running_mean, acc), torch.rsqrt(_as(running_var, acc) + eps)


# The CPU depthwise training forward takes one conv pass that keeps z (dw_fwd_stats, then
# bn_act) or two (dw_stats, then dw_fwd; the GPU backends' way). Measured on a 2-core Xeon (fp32,
# batch 8, MobileNetV1 shapes; bench/NOTES.md, session 18): one pass is 1.3-1.8x faster at
# stride 2 and on planes up to 28x28, and 1.1-1.4x on larger NCHW planes, but 0.8x on larger
# channels_last planes at stride 1, where the conv reads its rows in place and is cheap, so z's
# extra write and read cost more than the second conv. When a backward follows (keep_z), z is
# kept for it on every plane: the backward's reduction then reads z (pw_bwd_reduce) instead of
# convolving x again, which saves more than the forward's second conv costs (session 19).
CPU_DW_ONE_PASS_MAX_NHWC_S1_PLANE = 32 * 32


def _cpu_dw_one_pass(x: Tensor, stride: int, keep_z: bool) -> bool:
    if keep_z or stride != 1 or x.shape[2] * x.shape[3] <= CPU_DW_ONE_PASS_MAX_NHWC_S1_PLANE:
        return True
    return memory_format(x) != torch.channels_last


def dw_forward(
    x, weight, bn_weight, bn_bias, running_mean, running_var, backend, stride, training, eps, act,
    keep_z=False,
):  # fmt: skip
    """The depthwise forward on a kernel backend, with no autograd: (y, batch_mean, batch_var,
    z, mean, invstd, scale, shift); the batch statistics are None in eval, z (the conv output)
    None unless the CPU training forward made it in one pass (keep_z: a backward follows, so
    make it wherever it can be made). Called directly when no gradient is needed (no
    autograd.Function overhead), and by the Function otherwise."""
    ops = op_table(backend)
    acc = acc_dtype(x.dtype)
    z = batch_mean = batch_var = None
    if training and backend == "cpu" and x.dtype == acc and _cpu_dw_one_pass(x, stride, keep_z):
        # One conv pass that keeps z, then normalize + activate (see above). fp16/bf16 keep
        # the two passes, so that z is never rounded before the BN.
        z, batch_mean, batch_var = ops.dw_fwd_stats(x, weight, stride)
    elif training:
        batch_mean, batch_var = ops.dw_stats(x, weight, stride)
    mean, invstd = _stats(training, batch_mean, batch_var, running_mean, running_var, eps, acc)
    scale, shift = _bn_affine(mean, invstd, bn_weight, bn_bias, acc)
    if z is not None:
        y = ops.bn_act(z, scale, shift, act)
    else:
        y = ops.dw_fwd(x, weight, scale, shift, stride, act)
    return y, batch_mean, batch_var, z, mean, invstd, scale, shift


def pw_forward(
    x, weight, bn_weight, bn_bias, running_mean, running_var, backend, training, eps, act, keep_z
):
    """The pointwise forward on a kernel backend, with no autograd: (y, batch_mean, batch_var,
    z, mean, invstd, scale, shift); z is None unless training or keep_z (then the GEMM keeps the
    pre-BN output for the backward), the batch statistics None in eval."""
    ops = op_table(backend)
    acc = acc_dtype(x.dtype)
    z = batch_mean = batch_var = None
    if training or keep_z:
        z, batch_mean, batch_var = ops.pw_fwd_stats(x, weight)
        if not training:
            batch_mean = batch_var = None
    mean, invstd = _stats(training, batch_mean, batch_var, running_mean, running_var, eps, acc)
    scale, shift = _bn_affine(mean, invstd, bn_weight, bn_bias, acc)
    if z is None:
        y = ops.pw_fwd(x, weight, scale, shift, act)
    else:
        y = ops.bn_act(z, scale, shift, act)
    return y, batch_mean, batch_var, z, mean, invstd, scale, shift


def _no_stats(x):
    """Placeholder batch statistics (an autograd.Function must return tensors)."""
    e = x.new_empty((0,), dtype=acc_dtype(x.dtype))
    return e, e.clone()


class DepthwiseConvBNActFn(torch.autograd.Function):
    """Forward/backward of the fused depthwise op on a kernel backend (cuda/cpu/triton).

    Returns ``(y, batch_mean, batch_var)``; the two statistics are non-differentiable and are
    used by the caller for the running-stat update (training mode only).
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        backend,
        stride,
        training,
        eps,
        act,
    ):
        y, batch_mean, batch_var, z, mean, invstd, scale, shift = dw_forward(
            x, weight, bn_weight, bn_bias, running_mean, running_var, backend, stride, training, eps, act, True
        )  # fmt: skip
        if batch_mean is None:
            batch_mean, batch_var = _no_stats(x)
        # z (CPU training only): the reduction reads it instead of convolving x again. It costs
        # one output-sized tensor, as eager's BN saves its input.
        ctx.save_for_backward(x, weight, y, z, mean, invstd, scale, shift, bn_weight)
        ctx.cfg = (backend, stride, training, act)
        ctx.beta_dtype = bn_bias.dtype if bn_bias is not None else None
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return y, batch_mean, batch_var

    @staticmethod
    @once_differentiable  # the kernels have no derivative: a second backward raises
    def backward(ctx, grad_y, _gm, _gv):
        x, weight, y, z, mean, invstd, scale, shift, bn_weight = ctx.saved_tensors
        backend, stride, training, act = ctx.cfg
        ops = op_table(backend)
        need = ctx.needs_input_grad
        grad_y = grad_y.contiguous(memory_format=memory_format(y))
        gx = gw = g_gamma = g_beta = None
        sum_gz = sum_gzxh = None
        if z is not None:  # the same sums from the kept conv output, no conv
            sum_gz, sum_gzxh = ops.pw_bwd_reduce(grad_y, z, scale, shift, mean, invstd, act)
        elif training or need[2] or need[3]:
            sum_gz, sum_gzxh = ops.dw_bwd_reduce(grad_y, y, x, weight, mean, invstd, stride, act)
        if need[0] or need[1]:
            count = y.shape[0] * y.shape[2] * y.shape[3]
            k, b, c = _grad_coefficients(training, scale, invstd, mean, sum_gz, sum_gzxh, count)
            gx, gw = ops.dw_bwd(grad_y, y, x, weight, k, b, c, stride, act, training)
        if need[2]:
            g_gamma = sum_gzxh.to(bn_weight.dtype)
        if need[3]:
            g_beta = sum_gz.to(ctx.beta_dtype)
        return gx, gw, g_gamma, g_beta, None, None, None, None, None, None, None


class PointwiseConvBNActFn(torch.autograd.Function):
    """Forward/backward of the fused pointwise op on a kernel backend (cuda/cpu/triton).

    ``weight`` is the 2-D (Cout, Cin) view. When no gradient is needed the forward is the single
    fused GEMM + BN + act kernel; otherwise it keeps the pre-BN output z for the backward.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        backend,
        training,
        eps,
        act,
        keep_z,
    ):
        y, batch_mean, batch_var, z, mean, invstd, scale, shift = pw_forward(
            x, weight, bn_weight, bn_bias, running_mean, running_var, backend, training, eps, act, keep_z
        )  # fmt: skip
        if batch_mean is None:
            batch_mean, batch_var = _no_stats(x)
        ctx.save_for_backward(x, weight, z, mean, invstd, scale, shift, bn_weight)
        ctx.cfg = (backend, training, act)
        ctx.beta_dtype = bn_bias.dtype if bn_bias is not None else None
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return y, batch_mean, batch_var

    @staticmethod
    @once_differentiable  # the kernels have no derivative: a second backward raises
    def backward(ctx, grad_y, _gm, _gv):
        x, weight, z, mean, invstd, scale, shift, bn_weight = ctx.saved_tensors
        backend, training, act = ctx.cfg
        if z is None:
            raise RuntimeError(
                "dwsep.pointwise_conv_bn_act: backward called on an output computed without "
                "autograd tracking (no input required grad in the forward)"
            )
        ops = op_table(backend)
        need = ctx.needs_input_grad
        grad_y = grad_y.contiguous(memory_format=memory_format(z))
        gx = gw = g_gamma = g_beta = None
        sum_gz = sum_gzxh = None
        if training or need[2] or need[3]:
            sum_gz, sum_gzxh = ops.pw_bwd_reduce(grad_y, z, scale, shift, mean, invstd, act)
        if need[0] or need[1]:
            count = z.shape[0] * z.shape[2] * z.shape[3]
            k, b, c = _grad_coefficients(training, scale, invstd, mean, sum_gz, sum_gzxh, count)
            gx, gw = ops.pw_bwd(grad_y, z, x, weight, scale, shift, k, b, c, act)
        if need[2]:
            g_gamma = sum_gzxh.to(bn_weight.dtype)
        if need[3]:
            g_beta = sum_gz.to(ctx.beta_dtype)
        return gx, gw, g_gamma, g_beta, None, None, None, None, None, None, None


_register_triton_ops_at_import()
