"""dwsep.nn modules against nn.Conv2d + nn.BatchNorm2d + activation holding the same parameters,
for each BatchNorm configuration the modules emulate (a non-default eps and momentum,
momentum=None's cumulative average, track_running_stats=False, affine=False): three training
steps, then eval. Outputs, every gradient, the running statistics and num_batches_tracked.
(The op tests all run with the default eps and momentum.)"""

from __future__ import annotations

import copy

import pytest
import torch
from op_harness import LAYOUTS, backend_params
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
