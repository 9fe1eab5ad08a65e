"""dwsep.nn modules against nn.Conv2d + nn.BatchNorm2d + activation holding the same parameters,
for each BatchNorm configuration the modules emulate (a non-default eps and momentum,
momentum=None's cumulative average, track_running_stats=False, affine=False): three training
steps, then eval. Outputs, every gradient, the running statistics and num_batches_tracked.
(The op tests all run with the default eps and momentum.)"""

from __future__ import annotations

import copy

import pytest
import torch
from op_harness import LAYOUTS, CallCounter, backend_params, to_layout
from torch import nn

import dwsep

BN_CONFIGS = {
    "eps-momentum": {"eps": 0.3, "momentum": 0.37},
    "cumulative": {"momentum": None},
    "no-running-stats": {"track_running_stats": False},
    "no-affine": {"affine": False},
}


def make_pair(kind: str, bn_kw: dict, stride: int, device: str):
    """(reference nn.Sequential, fused module) over equal copies of one conv + BN pair, ReLU6."""
    g = torch.Generator().manual_seed(3)
    cin, cout = 6, 5
    if kind == "dw":
        conv = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        bn = nn.BatchNorm2d(cin, **bn_kw)
        cls = dwsep.nn.DepthwiseConvBNAct
    else:
        conv = nn.Conv2d(cin, cout, 1, bias=False)
        bn = nn.BatchNorm2d(cout, **bn_kw)
        cls = dwsep.nn.PointwiseConvBNAct
    with torch.no_grad():  # away from the identity BN, outputs on both sides of ReLU6's kinks
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / 2)
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) * 4 + 2)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) + 2)
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    conv, bn = conv.double().to(device), bn.double().to(device)
    ref = nn.Sequential(conv, bn, nn.ReLU6())
    fused = cls.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), "relu6")
    return ref, fused


def assert_same(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, f"{what}: {a is None} vs {b is None}"
        return
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(("backend", "device"), backend_params(include_torch=True))
@pytest.mark.parametrize("config", list(BN_CONFIGS))
@pytest.mark.parametrize(("kind", "stride"), [("dw", 1), ("dw", 2), ("pw", 1)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_matches_conv_bn_act(backend, device, config, kind, stride, layout):
    ref, fused = make_pair(kind, BN_CONFIGS[config], stride, device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(11)
    for step in range(3):
        ref.train(), fused.train()
        x = (torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64) * 2).to(device)
        x = x.contiguous(memory_format=fmt)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref = ref(xr)
        with dwsep.use_backend(backend):
            y = fused(xf)
        what = f"{backend}/{config}/{kind}-s{stride}/{layout}/step {step}"
        if fused.bn.affine:
            above = (y_ref >= 6).double().mean().item()
            assert 0.05 < above < 0.6, f"{what}: {above:.0%} of the outputs at 6"
        assert_same(y, y_ref, f"{what}: output")
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)
        y_ref.backward(gy)
        y.backward(gy)
        assert_same(xf.grad, xr.grad, f"{what}: grad x")
        params = {
            "conv.weight": (fused.conv.weight, ref[0].weight),
            "bn.weight": (fused.bn.weight, ref[1].weight),
            "bn.bias": (fused.bn.bias, ref[1].bias),
        }
        for name, (pf, pr) in params.items():
            assert (pf is None) == (pr is None), f"{what}: {name}"
            if pf is not None:
                assert_same(pf.grad, pr.grad, f"{what}: grad {name}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert_same(getattr(fused.bn, name), getattr(ref[1], name), f"{what}: {name}")
    ref.eval(), fused.eval()
    x = torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64).to(device)
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        y_ref = ref(x)
        with dwsep.use_backend(backend):
            y = fused(x)
    assert_same(y, y_ref, f"{backend}/{config}/{kind}-s{stride}/{layout}/eval: output")


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize(("kind", "stride"), [("dw", 1), ("dw", 2), ("pw", 1)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_without_grad_calls_the_kernel_directly(backend, device, kind, stride, layout,
                                                     monkeypatch):  # fmt: skip
    """In eval with grad mode off, the modules (and converted pairs) fold the BN and call the
    backend's kernel without the functional op: the same result as the functional op (same
    kernel, same fold), in float64, float32 and under CPU bf16 autocast; with grad mode on or
    with BN buffers in another dtype they go through the functional op, which also raises the
    errors for a bad input."""
    ref, fused = make_pair(kind, {"eps": 0.3}, stride, device)
    ref.eval(), fused.eval()
    seq = dwsep.nn.fuse_conv_bn_act(copy.deepcopy(ref)).eval()
    assert isinstance(seq, dwsep.nn.FusedSequential)
    names = ("depthwise_conv_bn_act", "pointwise_conv_bn_act")
    count = CallCounter(monkeypatch, [(dwsep.nn.DF, n) for n in names])  # the functional ops
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64) * 2).to(device)
    x = to_layout(x, layout)
    op = (
        dwsep.functional.depthwise_conv_bn_act
        if kind == "dw"
        else (dwsep.functional.pointwise_conv_bn_act)
    )
    extra = {"stride": stride} if kind == "dw" else {}
    bn = fused.bn
    args = (bn.running_mean, bn.running_var, bn.weight, bn.bias)

    def functional(m, x):
        return op(x, m.conv.weight, *args, eps=0.3, **extra)

    with dwsep.use_backend(backend):
        for dtype in (torch.float64, torch.float32):
            f, s, xd = copy.deepcopy(fused).to(dtype), copy.deepcopy(seq).to(dtype), x.to(dtype)
            args = (f.bn.running_mean, f.bn.running_var, f.bn.weight, f.bn.bias)
            with torch.no_grad():
                y, ys = f(xd), s(xd)
                assert count.calls == 0, "the direct path was not taken"
                want = functional(f, xd)
            torch.testing.assert_close(y, want, rtol=0, atol=0)
            torch.testing.assert_close(ys, want, rtol=0, atol=0)
            assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
            assert (y - ref.to(dtype)(xd)).abs().max() < (1e-10 if dtype == torch.float64 else 1e-4)
            count.calls = 0
        if device == "cpu" and backend == "cpu":
            f = copy.deepcopy(fused).float()
            args = (f.bn.running_mean, f.bn.running_var, f.bn.weight, f.bn.bias)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                y = f(x.float())
                assert count.calls == 0 and y.dtype == torch.bfloat16
                want = functional(f, x.float())
            torch.testing.assert_close(y, want, rtol=0, atol=0)
            count.calls = 0
        fused(x)  # grad mode on: the functional op (for the parameters' gradients)
        assert count.calls == 1
        with torch.no_grad():
            f = copy.deepcopy(fused).half()  # BN buffers in float16, not the kernels' float32
            f(x.half())
            assert count.calls == 2
            f = copy.deepcopy(fused).float()
            f.bn.running_mean.data = f.bn.running_mean.half()
            with pytest.raises(
                TypeError,
                match=r"running_mean must have dtype torch.float32 for x of dtype torch.float32, got torch.float16",
            ):
                f(x.float())  # the functional op's error
            with pytest.raises(ValueError, match="weight must be"):
                fused(x[:, :5])  # wrong channel count: the functional op's error
