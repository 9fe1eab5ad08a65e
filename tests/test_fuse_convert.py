"""dwsep.nn.fuse_conv_bn_act: converting an existing model (torchvision's MobileNetV2, and
hand-built Sequentials) to the fused ops. The converted model must compute what the original
computes, in training (outputs, every gradient, running statistics) and in eval, keep its
state_dict keys and share its parameters, and leave everything it cannot fuse alone."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from op_harness import backend_params
from torch import nn

import dwsep
from dwsep.models.mobilenet_v1 import FrozenMobileNetV1
from dwsep.nn import AbsorbedBatchNorm2d, FusedConv2d, FusedSequential, fuse_conv_bn_act

CPU_KERNEL_BACKENDS = [p for p in backend_params(include_torch=True) if p.values[1] == "cpu"]


def fused_steps(model: nn.Module) -> list[tuple]:
    return [
        s
        for m in model.modules()
        if isinstance(m, FusedSequential)
        for s in m._dwsep_plan
        if s[0] == "fused"
    ]


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """BN away from the identity so a wrong fold or a skipped BN shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def check_train_then_eval(model: nn.Module, ref: nn.Module, x: torch.Tensor, backend: str) -> None:
    """Three training steps then eval, float64, model against ref (its unconverted copy):
    outputs, every gradient, running statistics."""
    with dwsep.use_backend(backend):
        for step in range(3):
            out, want = model(x + step), ref(x + step)
            torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
            out.sin().sum().backward()
            want.sin().sum().backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-9, msg=n)
        for (n, b), c in zip(model.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-10, msg=n)
        model.eval(), ref.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)


def small_sequential() -> nn.Sequential:
    """Fusable runs next to ones that are not: a conv with a bias, a dilated depthwise conv, a
    BN followed by Hardswish (fused without activation, Hardswish kept), a trailing pair."""
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, 2, 1, bias=False),  # 0 dense 3x3: not fusable
        nn.BatchNorm2d(8),  # 1
        nn.ReLU6(),  # 2
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),  # 3 depthwise  \
        nn.BatchNorm2d(8),  # 4                                      } fused, relu6
        nn.ReLU6(),  # 5                                             /
        nn.Conv2d(8, 12, 1, bias=False),  # 6 pointwise  \
        nn.BatchNorm2d(12),  # 7                          } fused, no activation
        nn.Hardswish(),  # 8 kept
        nn.Conv2d(12, 12, 3, 1, 2, dilation=2, groups=12, bias=False),  # 9 dilated: not fusable
        nn.BatchNorm2d(12),  # 10
        nn.Conv2d(12, 12, 3, 2, 1, groups=12, bias=True),  # 11 bias: not fusable
        nn.Conv2d(12, 6, 1, bias=False),  # 12 pointwise \
        nn.BatchNorm2d(6),  # 13                          } fused, relu
        nn.ReLU(),  # 14                                 /
        nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=False),  # 15 depthwise, stride 2 \
        nn.BatchNorm2d(6),  # 16                                                 } fused, none
    )


def test_plan_fuses_exactly_the_supported_runs():
    model = fuse_conv_bn_act(small_sequential())
    assert isinstance(model, FusedSequential)
    got = [(s[1], s[2], s[3], s[4], s[5]) for s in fused_steps(model)]
    assert got == [
        ("depthwise", "3", "4", "5", "relu6"),
        ("pointwise", "6", "7", None, None),
        ("pointwise", "12", "13", "14", "relu"),
        ("depthwise", "15", "16", None, None),
    ]
    kept = [s[1] for s in model._dwsep_plan if s[0] == "module"]
    assert kept == ["0", "1", "2", "8", "9", "10", "11"]


@pytest.mark.parametrize(("backend", "device"), CPU_KERNEL_BACKENDS)
def test_sequential_matches_original_train_and_eval(backend, device):
    """Three training steps then eval, float64: outputs, every gradient, running statistics."""
    torch.manual_seed(0)
    ref = small_sequential().double()
    randomize_bn(ref)
    model = fuse_conv_bn_act(copy.deepcopy(ref))
    check_train_then_eval(model, ref, torch.randn(3, 4, 13, 11, dtype=torch.float64), backend)


def test_bn_follows_its_own_training_flag():
    """Frozen BN (bn.eval() inside a model in training mode), a common fine-tuning setup."""
    ref = small_sequential().double()
    randomize_bn(ref)
    ref.train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model = fuse_conv_bn_act(copy.deepcopy(ref))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)
    for b, c in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(b, c)  # running stats untouched on both sides


def test_state_dict_parameters_and_pickling():
    """Keys unchanged, parameters shared with the original modules, the converted model
    pickles (torch.save of the whole model) and deep-copies."""
    original = small_sequential()
    randomize_bn(original)
    keys = list(original.state_dict())
    conv3 = original[3]
    model = fuse_conv_bn_act(original)
    assert list(model.state_dict()) == keys
    assert model[3] is conv3  # the same child, so the same parameters
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 4, 9, 9)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(copy.deepcopy(model)(x), model(x))
    fresh = fuse_conv_bn_act(small_sequential())
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_fused_sequential_built_directly():
    seq = small_sequential()
    direct = FusedSequential(*seq)
    assert fused_steps(direct) == fused_steps(fuse_conv_bn_act(copy.deepcopy(seq)))
    x = torch.randn(2, 4, 9, 9)
    seq.eval(), direct.eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(x), seq(x), rtol=1e-5, atol=1e-6)


def test_children_changed_after_conversion_still_run():
    """append / replace / delete on a converted Sequential: the plan follows, nothing is
    skipped or run stale."""
    ref = small_sequential().eval()
    model = fuse_conv_bn_act(copy.deepcopy(ref)).eval()
    x = torch.randn(2, 4, 9, 9)
    ref.append(nn.Hardtanh(-0.1, 0.1))
    model.append(nn.Hardtanh(-0.1, 0.1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    ref[14] = nn.Identity()  # the pointwise run 12-14 loses its ReLU
    model[14] = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    assert ("pointwise", "12", "13", None, None) in [s[1:] for s in fused_steps(model)]
    del ref[8], model[8]  # Hardswish gone
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


class _StandardizedConv(nn.Conv2d):
    """A conv that computes something else than nn.Conv2d (weight standardization, as timm's
    StdConv2d): fusing it would silently drop that."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _BatchNormWithActivation(nn.BatchNorm2d):
    """A BatchNorm2d with an activation inside (as timm's BatchNormAct2d)."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


def test_subclasses_that_compute_differently_are_not_fused():
    seq = nn.Sequential(
        _StandardizedConv(4, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU6(),
        nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False),
        _BatchNormWithActivation(4),
    )
    randomize_bn(seq)
    ref = copy.deepcopy(seq).eval()
    model = fuse_conv_bn_act(seq).eval()
    assert fused_steps(model) == []
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(TypeError, match="conv must compute what Conv2d computes"):
        dwsep.nn.PointwiseConvBNAct.from_modules(seq[0], seq[1])
    with pytest.raises(TypeError, match="bn must compute what BatchNorm2d computes"):
        dwsep.nn.DepthwiseConvBNAct.from_modules(seq[3], seq[4])


def test_children_with_forward_hooks_are_not_fused():
    """A hook does work the fused op would skip (spectral_norm updates the weight in a
    pre-hook): such a pair stays unfused, and its hooks run."""
    calls = []
    seq = small_sequential()
    seq[6].register_forward_pre_hook(lambda m, inp: calls.append("pre"))
    seq[16].register_forward_hook(lambda m, inp, out: calls.append("post"))
    model = fuse_conv_bn_act(seq).eval()
    assert [s[2] for s in fused_steps(model)] == ["3", "12"]
    with torch.no_grad():
        model(torch.randn(2, 4, 9, 9))
    assert calls == ["pre", "post"]
    with pytest.raises(TypeError, match="no forward hooks"):
        dwsep.nn.PointwiseConvBNAct.from_modules(seq[6], seq[7])


def test_idempotent_and_bad_input():
    model = fuse_conv_bn_act(small_sequential())
    steps = fused_steps(model)
    assert fused_steps(fuse_conv_bn_act(model)) == steps
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        fuse_conv_bn_act([nn.Conv2d(1, 1, 1)])


def test_torchvision_mobilenet_v2():
    """torchvision's MobileNetV2 (random weights, BN randomized): all 17 depthwise and 34
    pointwise layers fused, the stem conv and classifier untouched; same eval outputs and the
    same training-step gradients as the original (float64, cpu backend)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    ref = torchvision.models.mobilenet_v2(width_mult=0.5).double()
    randomize_bn(ref, seed=2)
    keys = list(ref.state_dict())
    model = fuse_conv_bn_act(copy.deepcopy(ref))
    kinds = [s[1] for s in fused_steps(model)]
    assert kinds.count("depthwise") == 17 and kinds.count("pointwise") == 34
    assert list(model.state_dict()) == keys
    assert type(model.features[0]) is not FusedSequential  # the stem: a dense 3x3 conv
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    model.train(), ref.train()
    for m, seed in ((model, 5), (ref, 5)):  # the same dropout mask in the classifier
        torch.manual_seed(seed)
        m(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-9, msg=n)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)


def test_fused_sequential_compiles():
    model = fuse_conv_bn_act(small_sequential()).eval()
    x = torch.randn(2, 4, 9, 9)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize(("backend", "device"), CPU_KERNEL_BACKENDS)
def test_freeze_matches_converted_model_in_eval(backend, device):
    """dwsep.nn.freeze: BN folded once per layer (FrozenConvAct), the same outputs as the
    converted model in eval on the same backend, x-gradients through PyTorch ops, a snapshot
    of the weights, the original untouched; dwsep.nn modules are frozen too."""
    torch.manual_seed(0)
    original = nn.Sequential(
        small_sequential(),
        dwsep.nn.DepthwiseConvBNAct(6, stride=1, activation="relu"),
        dwsep.nn.PointwiseConvBNAct(6, 5, activation=None),
    ).double()
    randomize_bn(original)
    converted = fuse_conv_bn_act(copy.deepcopy(original)).eval()
    frozen = dwsep.nn.freeze(original)
    assert not frozen.training and original.training  # the original is not converted
    assert not fused_steps(original)
    n_frozen = sum(isinstance(m, dwsep.frozen.FrozenConvAct) for m in frozen.modules())
    assert n_frozen == len(fused_steps(converted)) + 2
    x = torch.randn(2, 4, 13, 11, dtype=torch.float64)
    with dwsep.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(frozen(x), converted(x), rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    with dwsep.use_backend(backend):
        frozen(xg).sin().sum().backward()
        converted(xr).sin().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # a snapshot: later changes to the original do not reach it
        before = frozen(x)
        for p in original.parameters():
            p.add_(1.0)
        torch.testing.assert_close(frozen(x), before)


class _Detector(nn.Module):
    """A dwsep.MobileNetV1 used as a part: feature maps into a conv + BN + ReLU6 head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = dwsep.MobileNetV1(alpha=0.25, features_only=True, out_indices=(3, 4))
        self.head = nn.Sequential(
            nn.Conv2d(256, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)
        )

    def forward(self, x):
        small, last = self.backbone(x)
        return self.head(last).mean((2, 3)) + small.mean((1, 2, 3))[:, None]


@pytest.mark.parametrize(("backend", "device"), CPU_KERNEL_BACKENDS)
def test_freeze_turns_a_mobilenet_v1_part_into_its_frozen_model(backend, device):
    """dwsep.nn.freeze on a model holding a dwsep.MobileNetV1: that part becomes its own
    freeze() (no BatchNorm left anywhere, no per-call folding), same eval outputs."""
    torch.manual_seed(0)
    model = _Detector().double()
    randomize_bn(model, seed=2)
    frozen = dwsep.nn.freeze(model)
    assert isinstance(frozen.backbone, FrozenMobileNetV1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert isinstance(model.backbone, dwsep.MobileNetV1) and model.training  # untouched
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)
    with dwsep.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x), rtol=1e-10, atol=1e-12)
    alone = dwsep.nn.freeze(dwsep.MobileNetV1(alpha=0.25))
    assert isinstance(alone, FrozenMobileNetV1) and not alone.training


def test_freeze_refuses_bn_without_running_stats():
    seq = nn.Sequential(
        nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, track_running_stats=False)
    )
    with pytest.raises(ValueError, match="without running statistics"):
        dwsep.nn.freeze(seq)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dwsep.nn.freeze("model")


def test_freeze_torchvision_mobilenet_v2_compiles():
    """The frozen MobileNetV2: all 51 layers folded, same eval outputs as the converted model,
    and it traces whole under torch.compile(fullgraph=True)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v2(width_mult=0.35)
    randomize_bn(model, seed=3)
    converted = fuse_conv_bn_act(copy.deepcopy(model)).eval()
    frozen = dwsep.nn.freeze(model)
    assert sum(isinstance(m, dwsep.frozen.FrozenConvAct) for m in frozen.modules()) == 51
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = converted(x)
        torch.testing.assert_close(frozen(x), want, rtol=1e-6, atol=1e-7)
        compiled = torch.compile(frozen, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), want, rtol=1e-6, atol=1e-7)


# --- Modules with their own forward: pairs found by tracing (timm's blocks) -------------------


def absorbed_heads(model: nn.Module) -> list[tuple[str, str, object]]:
    return [
        (n, m._dwsep_kind, m._dwsep_activation)
        for n, m in model.named_modules()
        if isinstance(m, FusedConv2d)
    ]


class _Block(nn.Module):
    """Attribute-style block (as timm's): dw + BN + ReLU6 as attributes, a pointwise conv whose
    BN has a separate Hardswish after it, a residual; plus pairs that must not be fused."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU6()
        self.conv_pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act2 = nn.Hardswish()
        self.conv_tap = nn.Conv2d(c, c, 1, bias=False)  # its output is also used elsewhere
        self.bn3 = nn.BatchNorm2d(c)
        self.conv_twice = nn.Conv2d(c, c, 1, bias=False)  # its BN runs twice
        self.bn4 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.act1(self.bn1(self.conv_dw(x)))  # fused (the separate ReLU6 kept as it is)
        y = self.act2(self.bn2(self.conv_pw(y)))  # fused (the Hardswish kept)
        t = self.conv_tap(y)
        y = self.bn3(t) + t  # not fused: conv_tap's output is used twice
        y = self.bn4(self.conv_twice(y))
        return self.bn4(y) + x  # not fused: bn4 is called twice


class _ModeBranch(nn.Module):
    """Calls its BN only in training: tracing in both modes must find no pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) if self.training else y


class _ValueBranch(nn.Module):
    """Branches on a tensor value: cannot be traced, so nothing in it is fused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


def test_traced_pairs_fuse_exactly_the_back_to_back_ones():
    model = fuse_conv_bn_act(nn.ModuleList([_Block(), _ModeBranch(), _ValueBranch()]))
    assert absorbed_heads(model) == [
        ("0.conv_dw", "depthwise", None),
        ("0.conv_pw", "pointwise", None),
    ]
    assert isinstance(model[0].bn1, AbsorbedBatchNorm2d) and isinstance(model[0].act1, nn.ReLU6)
    assert type(model[0].bn3) is nn.BatchNorm2d and type(model[0].bn4) is nn.BatchNorm2d
    assert type(model[1].bn) is nn.BatchNorm2d and type(model[2].bn) is nn.BatchNorm2d


def test_shared_modules_are_not_absorbed():
    """A conv/BN reachable from two places (weight tying) keeps running as it is."""
    block = _Block()
    twin = _Block()
    twin.conv_dw, twin.bn1 = block.conv_dw, block.bn1
    model = fuse_conv_bn_act(nn.ModuleList([block, twin]))
    heads = [n for n, _, _ in absorbed_heads(model)]
    assert heads == ["0.conv_pw", "1.conv_pw"]


@pytest.mark.parametrize(("backend", "device"), CPU_KERNEL_BACKENDS)
def test_traced_block_matches_original_train_and_eval(backend, device):
    """Three training steps then eval, float64: outputs, every gradient, running statistics,
    with the BN's momentum=None (cumulative average) on one pair."""
    torch.manual_seed(0)
    ref = nn.Sequential(_Block(), nn.Hardtanh(-3, 3), _Block()).double()
    ref[2].bn2.momentum = None
    randomize_bn(ref)
    model = fuse_conv_bn_act(copy.deepcopy(ref))
    assert len(absorbed_heads(model)) == 4
    check_train_then_eval(model, ref, torch.randn(3, 6, 13, 11, dtype=torch.float64), backend)


def test_traced_block_state_dict_copies_and_compile():
    """Keys and parameters unchanged; deepcopy and pickling keep each conv tied to its own
    (copied) BN; a frozen BN (bn.eval() in a training model) is honoured; fullgraph compile."""
    original = _Block()
    randomize_bn(original)
    keys, weight = list(original.state_dict()), original.conv_dw.weight
    model = fuse_conv_bn_act(original)
    assert list(model.state_dict()) == keys and model.conv_dw.weight is weight
    assert model.conv_dw._dwsep_pair.norm is model.bn1
    clone = copy.deepcopy(model)
    assert clone.conv_dw._dwsep_pair.norm is clone.bn1 and clone.bn1._dwsep_pair.parent is clone
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.conv_pw._dwsep_pair.norm is loaded.bn2
    x = torch.randn(2, 6, 9, 9)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), model(x))
    ref = _Block()
    ref.load_state_dict(model.state_dict())
    ref.train(), model.train()
    ref.bn1.eval(), model.bn1.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_mean, ref.bn1.running_mean)


def test_traced_pair_replaced_or_wrapped_after_conversion():
    """A layer replaced or wrapped after conversion: the pair computes what it computed before
    fusing (the BN neither skipped nor applied twice), and converting again restores the
    original classes and fuses what is fusable now."""
    torch.manual_seed(0)
    ref = _Block().double()
    randomize_bn(ref)
    ref.eval()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    for change in ("conv", "bn", "wrap"):
        want_mod = copy.deepcopy(ref)
        model = fuse_conv_bn_act(copy.deepcopy(ref)).eval()
        for m in (want_mod, model):
            if change == "conv":  # a new depthwise conv: the BN (absorbed) must run again
                m.conv_dw = nn.Conv2d(6, 6, 3, 1, 1, groups=6, bias=False).double()
                m.conv_dw.weight.data.fill_(0.1)
            elif change == "bn":  # a new BN: the conv must stop applying the old one
                m.bn2 = nn.BatchNorm2d(6).double().eval()
                m.bn2.running_mean.fill_(0.3)
            else:  # the conv wrapped in a Sequential with a scale after it
                m.conv_pw = nn.Sequential(m.conv_pw, nn.Hardtanh(-0.5, 0.5))
        with torch.no_grad():
            torch.testing.assert_close(model(x), want_mod(x), rtol=1e-12, atol=1e-12, msg=change)
        again = fuse_conv_bn_act(model)
        assert not any(
            isinstance(m, (FusedConv2d, AbsorbedBatchNorm2d)) and not m._dwsep_pair.intact()
            for m in again.modules()
        )
        fused = [n for n, _, _ in absorbed_heads(again)]
        # wrapped: conv_pw is a Sequential now, which the parent's pair no longer matches
        assert fused == (["conv_dw"] if change == "wrap" else ["conv_dw", "conv_pw"])
        with torch.no_grad():
            torch.testing.assert_close(again(x), want_mod(x), rtol=1e-12, atol=1e-12, msg=change)
        frozen = dwsep.nn.freeze(model)
        with torch.no_grad():
            torch.testing.assert_close(frozen(x), want_mod(x), rtol=1e-12, atol=1e-12, msg=change)


TIMM_MODELS = [
    # name, depthwise, pointwise, fused activations, BNs that still run their own act
    ("mobilenetv1_100", 13, 13, {"relu6": 26}, 0),
    ("mobilenetv2_050", 17, 34, {"relu6": 34, None: 17}, 0),
    ("efficientnet_lite0", 7, 32, {"relu6": 23, None: 16}, 0),
    ("mnasnet_050", 7, 34, {"relu": 24, None: 17}, 0),
    ("efficientnet_b0", 7, 32, {None: 39}, 23),  # SiLU: conv + BN fused, SiLU kept
]


@pytest.mark.parametrize(("name", "n_dw", "n_pw", "acts", "n_post"), TIMM_MODELS)
def test_timm_models(name, n_dw, n_pw, acts, n_post):
    """timm's models (random weights, BN randomized): every fusable depthwise 3x3 and pointwise
    layer fused through its BatchNormAct2d (ReLU/ReLU6 fused, other activations kept); same
    state_dict keys, training gradients and running stats, and eval outputs as the original
    (float64, cpu backend); freeze gives the converted model's eval outputs."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    ref = timm.create_model(name, drop_rate=0.0).double()
    randomize_bn(ref, seed=2)
    keys = list(ref.state_dict())
    model = fuse_conv_bn_act(copy.deepcopy(ref))
    heads = absorbed_heads(model)
    kinds = [k for _, k, _ in heads]
    assert (kinds.count("depthwise"), kinds.count("pointwise")) == (n_dw, n_pw)
    got = {}
    for _, _, a in heads:
        got[a] = got.get(a, 0) + 1
    assert got == acts
    post = [m for m in model.modules() if isinstance(m, AbsorbedBatchNorm2d) and m._dwsep_post_ops]
    assert len(post) == n_post
    assert list(model.state_dict()) == keys
    assert absorbed_heads(fuse_conv_bn_act(model)) == heads  # converting again changes nothing
    # 64x64 (the last stage 2x2): at 32x32 its 1x1 images at batch 2 make batch statistics
    # that amplify rounding ~1e6-fold through the randomly initialized network
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model.train(), ref.train()
    model(x).sum().backward()
    ref(x).sum().backward()
    # A BN bias feeding a linear layer and then a training BN has a gradient of exactly 0 in
    # exact arithmetic (rounding noise on both sides): the bound scales with each gradient's
    # size and the model's largest.
    top = max(float(q.grad.abs().max()) for q in ref.parameters())
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        atol = 1e-9 * float(q.grad.abs().max()) + 1e-12 * top
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=atol, msg=n)
    for (n, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-10, msg=n)
    model.eval(), ref.eval()
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=1e-9, atol=1e-9)
        frozen = dwsep.nn.freeze(model)
        assert not any(isinstance(m, (FusedConv2d, AbsorbedBatchNorm2d)) for m in frozen.modules())
        n_frozen = sum(isinstance(m, dwsep.frozen.FrozenConvAct) for m in frozen.modules())
        assert n_frozen == len(heads)
        torch.testing.assert_close(frozen(x), want, rtol=1e-9, atol=1e-9)


def test_timm_model_compiles_fullgraph():
    """A converted timm model traces whole under torch.compile(fullgraph=True), in eval and in
    training (the pair checks and the absorbed BNs cause no graph break)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = fuse_conv_bn_act(timm.create_model("mobilenetv2_050")).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(model, fullgraph=True, backend="eager")(x), model(x)
        )
    model.train()
    torch.compile(model, fullgraph=True, backend="eager")(x).sum().backward()
    assert model.conv_head.weight.grad is not None
