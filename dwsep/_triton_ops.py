"""Registers the Triton kernels (``kernels_triton``) as custom ops ``dwsep_triton::*`` with the
same schemas as the compiled ``dwsep::*`` ops, so the autograd Functions in ``dwsep.ops`` drive
every backend the same way. Outputs are allocated here (with the shared fake impls, which
allocate real tensors when given real ones); the launchers write into them."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor


def on_device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches a kernel on the *current* CUDA device, whatever device its tensor
    arguments are on; this makes ``t``'s device current for the launch (no-op when it already
    is, or for CPU tensors under the interpreter). Without it, tensors on cuda:1 with cuda:0
    current would run on the wrong GPU (peer reads or an illegal address)."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def register(fakes: dict) -> None:
    import kernels_triton as kt

    def define(name, fn):
        @functools.wraps(fn)  # the schema is inferred from fn's signature
        def launch_on_input_device(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()))
            with on_device_of(first):
                return fn(*args, **kwargs)

        op = torch.library.custom_op(
            f"dwsep_triton::{name}", launch_on_input_device, mutates_args=()
        )
        op.register_fake(fakes[name])

    def dw_fwd(
        x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: int, act: int
    ) -> Tensor:
        y = fakes["dw_fwd"](x, weight, scale, shift, stride, act)
        if y.numel():
            kt.dw_fwd(x, weight, scale, shift, stride, act, y)
        return y

    def dw_stats(x: Tensor, weight: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        mean, var = fakes["dw_stats"](x, weight, stride)
        kt.dw_stats(x, weight, stride, mean, var)
        return mean, var

    def dw_bwd_reduce(
        grad_y: Tensor,
        y: Tensor,
        x: Tensor,
        weight: Tensor,
        mean: Tensor,
        invstd: Tensor,
        stride: int,
        act: int,
    ) -> tuple[Tensor, Tensor]:
        s_gz, s_gzx = fakes["dw_bwd_reduce"](grad_y, y, x, weight, mean, invstd, stride, act)
        kt.dw_bwd_reduce(grad_y, y, x, weight, mean, invstd, stride, act, s_gz, s_gzx)
        return s_gz, s_gzx

    def dw_bwd(
        grad_y: Tensor,
        y: Tensor,
        x: Tensor,
        weight: Tensor,
        k: Tensor,
        b: Tensor,
        c: Tensor,
        stride: int,
        act: int,
        use_z: bool,
    ) -> tuple[Tensor, Tensor]:
        gx, gw = fakes["dw_bwd"](grad_y, y, x, weight, k, b, c, stride, act, use_z)
        kt.dw_bwd(grad_y, y, x, weight, k, b, c, stride, act, use_z, gx, gw)
        return gx, gw

    def pw_fwd(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, act: int) -> Tensor:
        y = fakes["pw_fwd"](x, weight, scale, shift, act)
        if y.numel():
            kt.pw_fwd(x, weight, scale, shift, act, y)
        return y

    def pw_fwd_stats(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, mean, var = fakes["pw_fwd_stats"](x, weight)
        kt.pw_fwd_stats(x, weight, z, mean, var)
        return z, mean, var

    def bn_act(z: Tensor, scale: Tensor, shift: Tensor, act: int) -> Tensor:
        y = fakes["bn_act"](z, scale, shift, act)
        if y.numel():
            kt.bn_act(z, scale, shift, act, y)
        return y

    def pw_bwd_reduce(
        grad_y: Tensor,
        z: Tensor,
        scale: Tensor,
        shift: Tensor,
        mean: Tensor,
        invstd: Tensor,
        act: int,
    ) -> tuple[Tensor, Tensor]:
        s_gz, s_gzx = fakes["pw_bwd_reduce"](grad_y, z, scale, shift, mean, invstd, act)
        kt.pw_bwd_reduce(grad_y, z, scale, shift, mean, invstd, act, s_gz, s_gzx)
        return s_gz, s_gzx

    def pw_bwd(
        grad_y: Tensor,
        z: Tensor,
        x: Tensor,
        weight: Tensor,
        scale: Tensor,
        shift: Tensor,
        k: Tensor,
        b: Tensor,
        c: Tensor,
        act: int,
    ) -> tuple[Tensor, Tensor]:
        gx, gw = fakes["pw_bwd"](grad_y, z, x, weight, scale, shift, k, b, c, act)
        kt.pw_bwd(grad_y, z, x, weight, scale, shift, k, b, c, act, gx, gw)
        return gx, gw

    for name, fn in [
        ("dw_fwd", dw_fwd),
        ("dw_stats", dw_stats),
        ("dw_bwd_reduce", dw_bwd_reduce),
        ("dw_bwd", dw_bwd),
        ("pw_fwd", pw_fwd),
        ("pw_fwd_stats", pw_fwd_stats),
        ("bn_act", bn_act),
        ("pw_bwd_reduce", pw_bwd_reduce),
        ("pw_bwd", pw_bwd),
    ]:
        define(name, fn)
