"""Existing models converted by ``dwsep.nn.fuse_conv_bn_act`` (every depthwise 3x3 and
pointwise 1x1 conv + BN (+ ReLU6 / ReLU) on dwsep's fused ops), and frozen by
``dwsep.nn.freeze`` (inference), against the unconverted model, in inference and for a training
step (forward, cross-entropy, backward, SGD step; dropout set to 0 in both so the first steps'
losses can be compared): images/s, the speedup over the original measured in the same session,
and the percent of a roofline floor counted like MobileNetV1's (a sequence of separately fused
ops: each conv + BN + act reads its input and weights and writes its output once; the residual
adds read two tensors and write one; the classifier reads the pooled features; squeeze-excite
and activations that are not fused, as efficientnet_b0's SiLU, are not counted, so the floor
is low for such a model). The models: torchvision's MobileNetV2 (skips without torchvision),
and with ``--full`` timm's mobilenetv2_100 and efficientnet_b0 (skip without timm)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dwsep
from dwsep import report as R
from dwsep import roofline as RL
from dwsep.shapes import DepthwiseLayer, PointwiseLayer


def _has_residual(m: nn.Module) -> bool:
    """Whether m is a block that adds its input to its output (torchvision's InvertedResidual,
    timm's InvertedResidual and DepthwiseSeparableConv)."""
    return bool(getattr(m, "use_res_connect", False) or getattr(m, "has_skip", False))


def model_floor(
    model: nn.Module, x: torch.Tensor, dtype: torch.dtype, mode: str = "inference"
) -> RL.Cost:
    """The floor of ``model`` (unconverted) on input ``x``, in inference or (``fwd_bwd``) a
    forward and backward."""
    e, a = RL.element_size(dtype), RL.acc_size(dtype)
    total = RL.ZERO
    hooks = []

    def on_conv(m, inp, out):
        nonlocal total
        n, c, h, w = inp[0].shape
        k = m.kernel_size
        if m.groups == c == m.out_channels and k == (3, 3):
            total += RL.depthwise_cost(DepthwiseLayer(0, n, c, h, w, m.stride[0]), mode, dtype)
        elif k == (1, 1) and m.groups == 1:
            total += RL.pointwise_cost(PointwiseLayer(0, n, c, m.out_channels, h, w), mode, dtype)
        else:  # the dense stem conv, counted as a fused conv + BN + act
            y = out.numel()
            flops = 2.0 * y * c * k[0] * k[1] // m.groups
            total += RL._cost(
                "store_z", mode, inp[0].numel(), y, m.weight.numel(), m.out_channels, flops, e, a
            )  # fmt: skip

    train = mode == "fwd_bwd"

    def on_block(m, inp, out):
        nonlocal total
        if _has_residual(m):  # backward: the gradient passes to both inputs as is
            b = 3.0 * out.numel() * e
            total += RL.Cost(0.0, b, b, b)

    def on_linear(m, inp, out):
        nonlocal total
        act, fc, logits = inp[0].numel(), m.weight.numel() + m.out_features, out.numel()
        # backward: read grad_logits and W, write grad_act; read grad_logits and act, write grad_W
        elems = act + fc + logits + ((logits + fc + act) + (logits + act + fc) if train else 0)
        b = float(elems * e)
        total += RL.Cost((3.0 if train else 1.0) * 2.0 * logits * m.in_features, b, b, b)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif _has_residual(m):
            hooks.append(m.register_forward_hook(on_block))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(on_linear))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def build_model(name: str) -> nn.Module:
    """A CONVERT_MODELS model with random weights and dropout 0; skips without its package."""
    torch.manual_seed(0)
    if name == "tv-mobilenetv2":
        torchvision = pytest.importorskip("torchvision")
        return torchvision.models.mobilenet_v2(dropout=0.0)
    timm = pytest.importorskip("timm")
    return timm.create_model(name.removeprefix("timm-"), drop_rate=0.0, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def convert_setup(bench_session):
    """(model name, impl, dtype, layout, mode) -> (step, nsets, cost, info) for the session's
    device; models built once per (name, dtype, layout)."""
    s = bench_session.s
    built = {}

    def setup(name, impl, dtype, layout, mode):
        key = (name, dtype, layout)
        if key not in built:
            built.clear()  # one model's copies at a time
            ref = build_model(name).eval()
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # BN away from the identity, as a trained model has
                for m in ref.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                        m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            ref = ref.to(device=s.device, dtype=dtype, memory_format=fmt)
            res, batch = s.model_resolution, s.model_batch
            nsets = 2 if s.device.type == "cpu" else 4
            images = [
                torch.randn(batch, 3, res, res, device=s.device, dtype=dtype).contiguous(
                    memory_format=fmt
                )
                for _ in range(nsets)
            ]
            labels = [
                torch.randint(0, 1000, (batch,), generator=g).to(s.device) for _ in range(nsets)
            ]
            costs = {
                m: model_floor(ref, images[0], dtype, "inference" if m == "inference" else "fwd_bwd")
                for m in R.MODEL_MODES
            }  # fmt: skip
            fused = dwsep.nn.fuse_conv_bn_act(copy.deepcopy(ref))
            built[key] = (ref, fused, dwsep.nn.freeze(ref), images, labels, costs)
        ref, fused, frozen, images, labels, costs = built[key]
        model = ref if impl == "eager" else frozen if impl.endswith(R.FROZEN_SUFFIX) else fused
        # eager: the original runs no dwsep op
        backend = "torch" if impl == "eager" else R.model_impl_base(impl)
        if mode == "inference":

            def step(i):
                with torch.no_grad(), dwsep.use_backend(backend):
                    return model(images[i])
        else:
            model = copy.deepcopy(model).train()  # every setup starts from the same weights
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step(i):
                with dwsep.use_backend(backend):
                    loss = F.cross_entropy(model(images[i]).float(), labels[i])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return loss.detach()

        info = {"model": f"{name} (dropout 0)", "batch": s.model_batch}
        info["resolution"] = s.model_resolution
        return step, len(images), costs[mode], info

    return setup


def test_converted_model(benchmark, bench_session, convert_case, convert_setup):
    case = convert_case
    benchmark.group = f"{case.model}-{case.mode}"
    bench_session.run_convert(
        benchmark,
        case,
        lambda impl: convert_setup(case.model, impl, case.dtype, case.layout, case.mode),
    )
