"""Shared harness for the fused-op tests: builds inputs, runs an op on a backend, and compares
output, running statistics and every gradient with the float64 reference."""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dwsep
from dwsep.testing import (
    GRAD_TOLERANCES,
    TOLERANCES,
    assert_close,
    dtypes_for,
    kernel_cases,
    reference_f64,
    skip_reason,
)

ACTIVATIONS = ["relu6", "relu", None]
LAYOUTS = ["contiguous", "channels_last"]
FUNCS = {
    "depthwise": dwsep.functional.depthwise_conv_bn_act,
    "pointwise": dwsep.functional.pointwise_conv_bn_act,
}


def backend_params(include_torch: bool = False):
    """pytest params over (backend, device), skipped with the reason when unavailable."""
    out = []
    for backend, device in kernel_cases(include_torch):
        why = skip_reason(backend, device)
        marks = [pytest.mark.skip(reason=f"{backend} on {device}: {why}")] if why else []
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return out


def backend_dtype_params(include_torch: bool = False):
    out = []
    for p in backend_params(include_torch):
        backend, device = p.values
        for dt in dtypes_for(backend, device):
            out.append(pytest.param(backend, device, dt, marks=p.marks, id=f"{p.id}-{str(dt)[6:]}"))
    return out


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def make_inputs(
    op, x_shape, dtype, device, *, cout=None, seed=0, affine=True, bn_dtype=None, wide=False
):
    """x ~ N(0,1), weights scaled to keep activations O(1), BN stats away from degenerate.
    ``wide``: BN gamma x4 and beta +2, so that the outputs cover both kinks of ReLU6 (about a
    sixth of the pre-activations above 6, a third below 0) instead of staying below 6."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x_shape
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    if op == "depthwise":
        weight = torch.randn((c, 1, 3, 3), generator=g, dtype=torch.float64) / 3.0
        cb = c
    else:
        weight = torch.randn((cout, c, 1, 1), generator=g, dtype=torch.float64) / math.sqrt(c)
        cb = cout
    bn_dtype = bn_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    bn = {
        "running_mean": torch.randn(cb, generator=g, dtype=torch.float64) * 0.2,
        "running_var": torch.rand(cb, generator=g, dtype=torch.float64) + 0.5,
        "bn_weight": (torch.rand(cb, generator=g, dtype=torch.float64) + 0.5) if affine else None,
        "bn_bias": (torch.randn(cb, generator=g, dtype=torch.float64) * 0.5) if affine else None,
    }
    if wide and affine:
        bn["bn_weight"] = bn["bn_weight"] * 4.0
        bn["bn_bias"] = bn["bn_bias"] + 2.0
    x = x.to(dtype=dtype, device=device)
    weight = weight.to(dtype=dtype, device=device)
    bn = {k: (None if v is None else v.to(dtype=bn_dtype, device=device)) for k, v in bn.items()}
    return x, weight, bn


def run_and_compare(
    op: str,
    backend: str,
    device: str,
    dtype: torch.dtype,
    x_shape,
    *,
    cout: Optional[int] = None,
    stride: int = 1,
    layout: str = "contiguous",
    training: bool = False,
    activation: Optional[str] = "relu6",
    grads: bool = True,
    affine: bool = True,
    seed: int = 0,
    x_transform=None,
    wide: bool = False,
):
    """Forward (+ running stats) and, with ``grads``, every gradient vs the float64 oracle.
    ``wide``: outputs spread over both kinks of ReLU6 (see ``make_inputs``)."""
    x, weight, bn = make_inputs(
        op, x_shape, dtype, device, cout=cout, seed=seed, affine=affine, wide=wide
    )
    x = to_layout(x, layout)
    if x_transform is not None:
        x = x_transform(x)
    leaves = [x, weight] + [bn["bn_weight"], bn["bn_bias"]]
    for t in leaves:
        if t is not None:
            t.requires_grad_(grads)
    kwargs = {"training": training, "momentum": 0.1, "eps": 1e-5, "activation": activation}
    if op == "depthwise":
        kwargs["stride"] = stride

    # oracle on float64 copies of the same (rounded) inputs
    x64 = x.detach().double().requires_grad_(grads)
    w64 = weight.detach().double().requires_grad_(grads)
    y_ref, bn64 = reference_f64(op, x64, w64, bn, requires_grad=grads, **kwargs)

    with dwsep.use_backend(backend):
        y = FUNCS[op](x, weight, **bn, **kwargs)

    tol, gtol = TOLERANCES[dtype], GRAD_TOLERANCES[dtype]
    case = f"{op}/{backend}/{device}/{dtype}/{tuple(x_shape)}/s{stride}/{layout}/train={training}/{activation}"
    assert y.dtype == dtype and y.device == x.device, case
    assert y.shape == y_ref.shape, f"{case}: shape {tuple(y.shape)} != {tuple(y_ref.shape)}"
    if x_transform is None:
        # x is dense; where its strides are ambiguous (C = 1 or H = W = 1) either format is right
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        ambiguous = x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        assert y.is_contiguous(memory_format=fmt) or (
            ambiguous and (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last))
        ), f"{case}: layout not kept (strides {y.stride()})"
    assert_close(y, y_ref, tol, f"{case}: output")
    if training:
        stat_tol = 1e-10 if dtype == torch.float64 else 1e-5
        for key in ("running_mean", "running_var"):
            assert_close(bn[key], bn64[key], stat_tol, f"{case}: {key}")
    if not grads or y.numel() == 0:
        return
    gy = torch.randn(
        y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    ).to(device)
    gy[_near_kink(op, x64, w64, bn, kwargs, dtype)] = 0.0
    y.backward(gy.to(dtype=dtype, device=device))
    y_ref.backward(gy.to(device))
    scale_x, scale_w = _grad_scales(op, x64, w64, gy, bn64, training, kwargs.get("stride", 1))
    assert_close(x.grad, x64.grad, gtol, f"{case}: grad x", scale=scale_x)
    assert_close(weight.grad, w64.grad, gtol, f"{case}: grad weight", scale=scale_w)
    if affine:
        assert_close(bn["bn_weight"].grad, bn64["bn_weight"].grad, gtol, f"{case}: grad bn_weight")
        assert_close(bn["bn_bias"].grad, bn64["bn_bias"].grad, gtol, f"{case}: grad bn_bias")


# Unit roundoff of each storage dtype.
_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def _near_kink(op, x64, w64, bn, kwargs, dtype) -> torch.Tensor:
    """Output elements whose pre-activation lies within rounding distance of a kink of the
    activation (0 for relu; 0 and 6 for relu6). Whether the gradient passes there depends on
    the rounding of the stored pre-BN tensor, in PyTorch's own low-precision kernels as in
    ours, so the tests give those elements no upstream gradient. Everywhere else the mask
    is checked exactly."""
    act = kwargs["activation"]
    with torch.no_grad():
        pre, _ = reference_f64(op, x64.detach(), w64.detach(), bn, **{**kwargs, "activation": None})
    if act is None:
        return torch.zeros_like(pre, dtype=torch.bool)
    delta = 4 * _UNIT_ROUNDOFF[dtype] * (1.0 + pre.abs())
    near = pre.abs() < delta
    if act == "relu6":
        near |= (pre - 6.0).abs() < delta
    return near


def _grad_scales(op, x64, w64, gy, bn64, training, stride) -> tuple[float, float]:
    """Typical norms of the input and weight gradients as random-walk sums of their terms
    (k * g_y * w and k * g_y * x, k = gamma / std of the BN input): the size of the rounding of
    their operands. Under train-mode BN a gradient can cancel far below that (2 values per
    channel, or a 1-input-channel pointwise weight), so the checks are floored there."""
    with torch.no_grad():
        groups = x64.shape[1] if op == "depthwise" else 1
        pad = 1 if op == "depthwise" else 0
        z = torch.nn.functional.conv2d(x64, w64, None, stride, pad, 1, groups)
        n, c, h, w = z.shape
        m = max(n * h * w, 1)
        if training:
            var = z.var(dim=(0, 2, 3), unbiased=False)
        else:
            var = bn64["running_var"].detach().double()
        gamma = bn64["bn_weight"]
        gamma = gamma.detach().double().abs() if gamma is not None else torch.ones_like(var)
        k = (gamma / torch.sqrt(var + 1e-5)).max().item()
        ngy = torch.linalg.vector_norm(gy).item()
        nx = torch.linalg.vector_norm(x64).item()
        nw = torch.linalg.vector_norm(w64).item()
        if op == "depthwise":
            return k * ngy * nw / c**0.5, 3.0 * k * ngy * nx / (c * m) ** 0.5
        return k * ngy * nw / c**0.5, k * ngy * nx / m**0.5


@contextlib.contextmanager
def pinned_triton_configs(pins: dict):
    """Inside the block each Triton autotuner in ``pins`` ({autotuner: triton.Config}) runs only
    its pinned config; configs and tuning caches are restored afterwards."""
    saved = [(t, t.configs, dict(t.cache)) for t in pins]
    try:
        for t, cfg in pins.items():
            t.configs = [cfg]
            t.cache.clear()
        yield
    finally:
        for t, configs, cache in saved:
            t.configs = configs
            t.cache.clear()
            t.cache.update(cache)


class OpRecorder(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher (``str(func)``, e.g.
    ``"dwsep.dw_fwd.default"``); ``count`` matches a prefix, so end an op's name with ``"."``
    to exclude longer names that start with it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, prefix: str) -> int:
        return sum(n.startswith(prefix) for n in self.names)


class CallCounter:
    """Counts the calls of the functions or methods ``targets`` names (``(owner, attribute)``
    pairs), patched through pytest's ``monkeypatch`` for the test's duration."""

    def __init__(self, monkeypatch, targets):
        self.calls = 0
        for owner, name in targets:
            monkeypatch.setattr(owner, name, self._counting(getattr(owner, name)))

    def _counting(self, fn):
        def wrapped(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return wrapped
