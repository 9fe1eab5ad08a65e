"""MobileNetV1 on dwsep's fused kernels, a drop-in for timm's ``mobilenetv1_100`` family.

Architecture (Howard et al. 2017, Table 1, with ReLU6 as in TF-slim, Keras and timm): a 3x3
stride-2 stem conv with ``int(32*alpha)`` channels + BN + ReLU6; 13 depthwise-separable blocks
(depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN + ReLU6) from :mod:`dwsep.shapes`, in stages of
1, 2, 2, 6 and 2 blocks; global average pooling, dropout and a linear classifier.

Parameter and buffer names are timm's: ``conv_stem``, ``bn1``,
``blocks.{stage}.{i}.conv_dw|bn1|conv_pw|bn2`` and ``classifier``, so a timm checkpoint loads with
``strict=True``. Every depthwise and pointwise layer runs through
:class:`dwsep.nn.DepthwiseConvBNAct` / :class:`dwsep.nn.PointwiseConvBNAct` (the fused ops of the
active backend). Those wrappers share the block's own ``conv_*``/``bn*`` modules and are kept
outside the module tree, so they add no state-dict keys, parameters or modules.

:class:`ReferenceMobileNetV1` is the same network in plain PyTorch (``nn.Conv2d``,
``nn.BatchNorm2d``, ReLU6) with identical state-dict keys: the oracle for the tests and the
eager/``torch.compile`` baseline for the benchmarks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, ops
from .._validation import memory_format
from ..frozen import FrozenConvAct, bn_fold, conv_bn_act
from ..functional import _autocast, _autocast_dtype
from ..nn import DepthwiseConvBNAct, PointwiseConvBNAct
from ..shapes import BLOCKS, STAGE_SIZES, STEM_CHANNELS, channels, conv_out, mobilenet_v1_layers

__all__ = [
    "FrozenMobileNetV1",
    "MIN_RESOLUTION",
    "MobileNetV1",
    "ReferenceMobileNetV1",
    "mobilenet_v1",
    "model_complexity",
    "model_summary",
]

# Smallest input side: at 32 the last stage is 1x1 (output stride 32).
MIN_RESOLUTION = 32
NUM_STAGES = len(STAGE_SIZES)


# --------------------------------------------------------------------------------------------
# Architecture bookkeeping (from dwsep.shapes; nothing here repeats the table)


def _stage_of_block() -> list[int]:
    out = []
    for stage, size in enumerate(STAGE_SIZES):
        out += [stage] * size
    if len(out) != len(BLOCKS):  # pragma: no cover - guards an edit of dwsep.shapes
        raise AssertionError("dwsep.shapes: STAGE_SIZES must add up to len(BLOCKS)")
    return out


def _check_alpha(fn: str, alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"{fn}: alpha must be a float, got {alpha!r}")
    if channels(STEM_CHANNELS, alpha) < 1:
        raise ValueError(
            f"{fn}: alpha must be at least 1/{STEM_CHANNELS} (so that every layer keeps at least "
            f"one channel, int(c * alpha) >= 1), got {alpha!r}"
        )
    return float(alpha)


def _check_int(fn: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def _stage_channels(alpha: float) -> list[int]:
    """Output channels of each stage (the last block of each)."""
    outs = [channels(c, alpha) for _, c in BLOCKS]
    ends = [sum(STAGE_SIZES[: i + 1]) - 1 for i in range(NUM_STAGES)]
    return [outs[e] for e in ends]


def _stage_reductions() -> list[int]:
    """Output stride of each stage (the stem has stride 2)."""
    red, out, b = 2, [], 0
    for size in STAGE_SIZES:
        for stride, _ in BLOCKS[b : b + size]:
            red *= stride
        b += size
        out.append(red)
    return out


def _init_weights(model: nn.Module) -> None:
    """Convs: normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out_channels/groups; BN: 1, 0;
    classifier: normal(0, 0.01), bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Blocks


def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has forward (pre-)hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _BlockBase(nn.Module):
    """Depthwise 3x3 + BN + ReLU6, then pointwise 1x1 + BN + ReLU6; timm's attribute names."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)


class FusedDepthwiseSeparable(_BlockBase):
    """The block on dwsep's fused ops.

    ``conv_dw``/``bn1`` and ``conv_pw``/``bn2`` are registered here (timm's names); the fused
    :class:`~dwsep.nn.DepthwiseConvBNAct` and :class:`~dwsep.nn.PointwiseConvBNAct` that run
    them wrap the very same module objects and are held in a plain tuple attribute, outside the
    module tree: no extra state-dict keys or parameters, and ``.to()``, ``deepcopy``, DDP and
    ``load_state_dict(assign=True)`` all act on the shared modules. :meth:`train` keeps their
    mode in step; if a submodule is replaced, the wrappers are rebuilt on the next forward.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__(in_chs, out_chs, stride)
        self._bind()

    def _bind(self) -> None:
        dw = DepthwiseConvBNAct.from_modules(self.conv_dw, self.bn1, activation="relu6")
        pw = PointwiseConvBNAct.from_modules(self.conv_pw, self.bn2, activation="relu6")
        dw.train(self.training)
        pw.train(self.training)
        self._fused = (dw, pw)  # a tuple, so nn.Module does not register them

    def train(self, mode: bool = True) -> FusedDepthwiseSeparable:
        super().train(mode)
        for m in self._fused:
            m.train(mode)
        return self

    def _bound(self) -> bool:
        """Whether the fused wrappers still hold this block's own conv / BN modules."""
        dw, pw = self._fused
        return (
            dw.conv is self.conv_dw
            and dw.bn is self.bn1
            and pw.conv is self.conv_pw
            and pw.bn is self.bn2
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self._bound():
            self._bind()
        dw, pw = self._fused
        return pw(dw(x))

    def extra_repr(self) -> str:
        return "fused=(DepthwiseConvBNAct, PointwiseConvBNAct), activation='relu6'"


class ReferenceDepthwiseSeparable(_BlockBase):
    """The block in plain PyTorch: conv, BN and ReLU6 as separate ops (what eager runs)."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self.bn1(self.conv_dw(x)), inplace=True)
        return F.relu6(self.bn2(self.conv_pw(x)), inplace=True)


# --------------------------------------------------------------------------------------------
# Models


class _InferencePlan(NamedTuple):
    """What the direct inference path runs (_run_plan): the backend; the stem conv's (weight,
    stride, padding, dilation, groups) and activation code; per block (dw weight (C, 1, 3, 3),
    dw stride, dw activation, pw weight (Cout, Cin), pw activation); the folded BN as
    per-channel ``scales`` / ``shifts`` (stem first, then dw and pw of each block); and, per
    stage, the number of blocks up to its end."""

    backend: str
    stem: tuple
    stem_act: int
    layers: list
    scales: list
    shifts: list
    stage_ends: list


def _plain_blocks(blocks: nn.Module) -> Optional[tuple[list[nn.Module], list[int]]]:
    """Every block of ``blocks`` (the stages) in order and, per stage, the number of blocks up
    to its end, when nothing there needs the module-by-module path: no global forward hooks,
    no torch.compile tracing (which keeps the path it was tested with), and ``blocks`` and each
    stage a plain ``nn.Sequential`` without hooks. Else None."""
    mm = nn.modules.module
    if mm._global_forward_hooks or mm._global_forward_pre_hooks or _has_hooks(blocks):
        return None
    if torch.compiler.is_compiling():
        return None
    flat, ends = [], []
    for stage in blocks:
        if type(stage) is not nn.Sequential or _has_hooks(stage):
            return None
        flat += list(stage)
        ends.append(len(flat))
    return flat, ends


def _run_plan(x: Tensor, plan: _InferencePlan, stages: Sequence[int]) -> list[Tensor]:
    """The stem and the blocks straight through the backend's inference kernels, no autograd
    (x: the body input): the outputs of the stages in ``stages``, up to the last of them.
    Autocast is applied per layer as the fused ops apply it."""
    backend, scales, shifts = plan.backend, plan.scales, plan.shifts
    table = ops.op_table(backend)
    w, stride, padding, dilation, groups = plan.stem
    x, w = _autocast(x, w)
    y = conv_bn_act(
        x, w, scales[0], shifts[0], stride, padding, dilation, groups, plan.stem_act, backend
    )
    y = y.contiguous(memory_format=memory_format(y))
    outs, last, stage = [], max(stages), 0
    for i, (w_dw, stride, act_dw, w_pw, act_pw) in enumerate(plan.layers):
        y, w = _autocast(y, w_dw)
        y = table.dw_fwd(y, w.contiguous(), scales[2 * i + 1], shifts[2 * i + 1], stride, act_dw)
        y, w = _autocast(y, w_pw)
        y = table.pw_fwd(y, w.contiguous(), scales[2 * i + 2], shifts[2 * i + 2], act_pw)
        while stage < len(plan.stage_ends) and plan.stage_ends[stage] == i + 1:
            if stage in stages:
                outs.append(y)
            if stage == last:
                return outs
            stage += 1
    return outs


class _DirectInference:
    """``_features`` and ``forward_stages`` that take the direct inference path when the
    model's ``_inference_plan(x)`` gives a plan, and the model's module-by-module path
    otherwise."""

    # The module-by-module fallbacks take xb, so the input is converted to the body's layout
    # once (forward_stem's own _body_input then finds it converted).
    def _features(self, x: Tensor) -> Tensor:
        xb = self._body_input(x)
        plan = self._inference_plan(xb)
        if plan is None:
            return _MobileNetV1Base._features(self, xb)
        return _run_plan(xb, plan, (len(plan.stage_ends) - 1,))[0]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        xb = self._body_input(x)
        fmt = memory_format(x)  # the caller's layout, not the body's
        plan = self._inference_plan(xb)
        if plan is None:
            return _MobileNetV1Base._stages(self, xb, fmt)
        return [y.contiguous(memory_format=fmt) for y in _run_plan(xb, plan, self.out_indices)]


class _MobileNetV1Base(nn.Module):
    _block_cls: type[_BlockBase]
    # Run the body in channels_last for NCHW inputs on the CPU (see _body_input).
    _channels_last_body_on_cpu: bool = False

    def __init__(
        self,
        alpha: float = 1.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
    ) -> None:
        super().__init__()
        fn = type(self).__name__
        self.alpha = _check_alpha(fn, alpha)
        self.num_classes = _check_int(fn, "num_classes", num_classes, 0)
        self.in_chans = _check_int(fn, "in_chans", in_chans, 1)
        if (
            isinstance(drop_rate, bool)
            or not isinstance(drop_rate, (int, float))
            or not 0.0 <= drop_rate < 1.0
        ):
            raise ValueError(f"{fn}: drop_rate must be a float in [0, 1), got {drop_rate!r}")
        self.drop_rate = float(drop_rate)
        if not isinstance(features_only, bool):
            raise TypeError(f"{fn}: features_only must be a bool, got {features_only!r}")
        self.features_only = features_only
        try:
            idx = tuple(out_indices)
        except TypeError:
            idx = None
        if (
            not idx
            or any(isinstance(i, bool) or not isinstance(i, int) for i in idx)
            or any(not 0 <= i < NUM_STAGES for i in idx)
            or len(set(idx)) != len(idx)
        ):
            raise ValueError(
                f"{fn}: out_indices must be a non-empty sequence of distinct stage indices in "
                f"0..{NUM_STAGES - 1}, got {out_indices!r}"
            )
        self.out_indices = idx

        stem = channels(STEM_CHANNELS, self.alpha)
        self.conv_stem = nn.Conv2d(self.in_chans, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages: list[list[nn.Module]] = [[] for _ in STAGE_SIZES]
        cin = stem
        for stage, (stride, cout) in zip(_stage_of_block(), BLOCKS):
            c = channels(cout, self.alpha)
            stages[stage].append(self._block_cls(cin, c, stride))
            cin = c
        self.blocks = nn.Sequential(*(nn.Sequential(*s) for s in stages))
        self.num_features = cin
        self.head_hidden_size = cin
        chs, reds = _stage_channels(self.alpha), _stage_reductions()
        self.feature_info = [
            {"stage": s + 1, "num_chs": chs[s], "reduction": reds[s], "module": f"blocks.{s}"}
            for s in range(NUM_STAGES)
        ]
        if features_only:
            self.feature_info = [self.feature_info[i] for i in self.out_indices]
            self.register_module("classifier", None)
        else:
            self.classifier = self._make_classifier(self.num_classes)
        _init_weights(self)

    # -- head ------------------------------------------------------------------------------

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> Optional[nn.Module]:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a freshly initialized one for ``num_classes`` classes
        (0: no classifier, ``forward`` returns the pooled features). Only average pooling is
        supported (``global_pool`` None or ``"avg"``)."""
        fn = f"{type(self).__name__}.reset_classifier"
        if self.features_only:
            raise RuntimeError(f"{fn}: the model was built with features_only=True (no head)")
        num_classes = _check_int(fn, "num_classes", num_classes, 0)
        if global_pool not in (None, "avg"):
            raise ValueError(f"{fn}: global_pool must be 'avg' or None, got {global_pool!r}")
        ref = self.conv_stem.weight
        self.num_classes = num_classes
        head = self._make_classifier(num_classes)
        if isinstance(head, nn.Linear):
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        self.classifier = head.to(device=ref.device, dtype=ref.dtype).train(self.training)

    # -- forward ---------------------------------------------------------------------------

    def _check_input(self, x: object) -> Tensor:
        fn = f"{type(self).__name__}.forward"
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{fn}: x must be a 4-D (N, C, H, W) image batch, got a {x.dim()}-D tensor of "
                f"shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"{fn}: x must have in_chans={self.in_chans} channels (dim 1 of (N, C, H, W)), "
                f"got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if x.shape[2] < MIN_RESOLUTION or x.shape[3] < MIN_RESOLUTION:
            raise ValueError(
                f"{fn}: x must be at least {MIN_RESOLUTION}x{MIN_RESOLUTION} (H x W), got "
                f"{x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
        return x

    def _stem_bn_act(self, x: Tensor) -> Tensor:
        return F.relu6(self.bn1(x), inplace=True)

    def _body_input(self, x: Tensor) -> Tensor:
        """The checked input, in channels_last where the model runs its body in that layout: on
        the CPU, for the dwsep models (not the reference), whatever the input's layout. Every
        CPU host measured runs the fused kernels and oneDNN's convs faster in channels_last
        (model inference ~10% on the session-16 Intel host, training 5-10%; bench/NOTES.md),
        as torch.compile's layout optimization also converts NCHW convs; the outputs of
        forward_features and forward_stages are handed back in the input's layout."""
        x = self._check_input(x)
        if self._channels_last_body_on_cpu and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_stem(self, x: Tensor) -> Tensor:
        return self._stem_bn_act(self.conv_stem(self._body_input(x)))

    def _features(self, x: Tensor) -> Tensor:
        return self.blocks(self.forward_stem(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and all 13 blocks: (N, num_features, ceil(H/32), ceil(W/32)), in the input's
        memory format."""
        return self._features(x).contiguous(memory_format=memory_format(x))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The outputs of the stages in ``out_indices`` (output strides 2, 4, 8, 16, 32), in the
        input's memory format."""
        xb = self._body_input(x)
        return self._stages(xb, memory_format(x))

    def _stages(self, xb: Tensor, fmt: torch.memory_format) -> list[Tensor]:
        y = self.forward_stem(xb)
        last = max(self.out_indices)
        feats = []
        for i, stage in enumerate(self.blocks):
            y = stage(y)
            if i in self.out_indices:
                feats.append(y.contiguous(memory_format=fmt))
            if i == last:
                break
        return feats

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool, dropout and the classifier (skipped with ``pre_logits``)."""
        if self.classifier is None:
            raise RuntimeError(
                f"{type(self).__name__}.forward_head: the model was built with "
                "features_only=True (no head)"
            )
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Union[Tensor, list[Tensor]]:
        if self.features_only:
            return self.forward_stages(x)
        return self.forward_head(self._features(x))  # pooled: the layout does not matter

    # -- export ----------------------------------------------------------------------------

    @torch.no_grad()
    def freeze(self) -> FrozenMobileNetV1:
        """An inference-only copy on dwsep's fused kernels with every BatchNorm folded, once,
        into the per-channel (scale, shift) the kernels take: each layer is then one kernel
        launch with no per-call folding (the eval model folds every BN on every call: under
        no_grad in four multi-tensor ops for the whole network, with autograd recording a few
        small ops per layer). A snapshot: later changes to ``self`` do not reach it. Same
        outputs as ``self.eval()`` on the same backend."""
        return FrozenMobileNetV1(self)

    @torch.no_grad()
    def fuse(self) -> FoldedMobileNetV1:
        """An inference-only copy in plain PyTorch with every BatchNorm folded into its conv
        (conv with bias + ReLU6): no dwsep ops inside, so it goes through ``torch.export`` and
        ``torch.jit.script`` (and from there to other runtimes). ``self`` is not changed. Equal
        to ``self.eval()`` up to rounding (the folding is done in float64)."""
        return FoldedMobileNetV1(self)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class MobileNetV1(_MobileNetV1Base):
    """MobileNetV1 on dwsep's fused depthwise and pointwise kernels.

    Args:
        alpha: width multiplier; every layer has ``int(c * alpha)`` channels.
        num_classes: classifier outputs (0: ``forward`` returns the pooled features).
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        features_only: ``forward`` returns the outputs of the stages in ``out_indices`` instead
            of logits (output strides 2, 4, 8, 16, 32; at alpha=1, 64/128/256/512/1024
            channels), and there is no classifier.
        out_indices: stages returned with ``features_only``.

    Inputs are (N, in_chans, H, W) with H, W >= 32, NCHW or channels_last, any float dtype or
    autocast. ``train()``/``eval()`` follow BatchNorm semantics: batch statistics and running
    stat updates in training; in eval the running statistics are folded into the fused kernels.
    State-dict keys and shapes are those of timm's ``mobilenetv1_100`` family. On the CPU the
    body runs in channels_last whatever the input's layout (the faster layout there); feature
    maps come back in the input's layout.
    """

    _block_cls = FusedDepthwiseSeparable
    _channels_last_body_on_cpu = True

    def forward_stem(self, x: Tensor) -> Tensor:
        # Inference on a kernel backend: cuDNN's (or the CPU's) conv, then dwsep's fused BN +
        # ReLU6 kernel; on the cpu backend in fp32 the BN folded into the conv's weights and
        # bias, then ReLU6 in place (frozen.conv_bn_act). Training, or eval with autograd
        # recording, use BatchNorm2d.
        x = self._body_input(x)
        conv, bn = self.conv_stem, self.bn1
        if not (
            self.training
            or bn.running_mean is None
            or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
        ):
            x, w = _autocast(x, conv.weight)
            backend = backends.resolve(x.device, "bn_act", x.dtype)
            if backend != "torch":
                scale, shift = bn_fold(bn, ops.acc_dtype(x.dtype))
                return conv_bn_act(
                    x, w, scale, shift, conv.stride, conv.padding, conv.dilation, conv.groups,
                    2, backend,
                )  # fmt: skip
        return self._stem_bn_act(conv(x))

    # -- inference: every BN folded in one batch of multi-tensor ops -------------------------

    def _inference_plan(self, x: Tensor) -> Optional[_InferencePlan]:
        """The plan of the direct inference path (see :class:`_InferencePlan`) when this
        forward is pure inference on a kernel backend, else None (the forward then runs layer
        by layer through dwsep's fused ops, as in training).

        Pure inference here: the model and every block in eval, no autograd recording (grad
        mode off), not being traced by torch.compile, no forward hooks on the blocks or stages
        (nor global ones: this path does not call the block modules), the blocks as built
        (each a FusedDepthwiseSeparable bound to its own conv / BN children), every BN with
        running statistics and affine parameters in the kernels' per-channel dtype on x's
        device. The folds are computed on every call (nothing cached, so changes to any weight
        or statistic take effect at once) with four multi-tensor ops for all 27 BNs instead of
        four small ops per layer: the same arithmetic as the fused ops' eval path
        (``ops._stats`` and ``ops._bn_affine``), a fraction of the host work and launches."""
        if self.training or torch.is_grad_enabled():
            return None
        found = _plain_blocks(self.blocks)
        if found is None:
            return None
        blocks, ends = found
        for block in blocks:
            if type(block) is not FusedDepthwiseSeparable or block.training:
                return None
            if _has_hooks(block) or not block._bound():
                return None
        conv = self.conv_stem
        dtype = _autocast_dtype(x, conv.weight) or x.dtype
        acc = ops.acc_dtype(dtype)
        backend = backends.resolve(x.device, "MobileNetV1", dtype)
        if backend == "torch":
            return None
        bns = [self.bn1] + [bn for b in blocks for bn in (b.bn1, b.bn2)]
        for bn in bns:
            for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias):
                if t is None or t.dtype != acc or t.device != x.device:
                    return None
        invstd = torch._foreach_add([bn.running_var for bn in bns], [float(bn.eps) for bn in bns])
        torch._foreach_rsqrt_(invstd)
        scales = torch._foreach_mul(invstd, [bn.weight for bn in bns])
        means = [bn.running_mean for bn in bns]
        shifts = torch._foreach_addcmul([bn.bias for bn in bns], means, scales, value=-1)
        stem = (conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
        layers = [
            (b.conv_dw.weight, b.conv_dw.stride[0], 2, b.conv_pw.weight.flatten(1), 2)
            for b in blocks
        ]
        return _InferencePlan(backend, stem, 2, layers, scales, shifts, ends)

    _features = _DirectInference._features
    forward_stages = _DirectInference.forward_stages


class ReferenceMobileNetV1(_MobileNetV1Base):
    """The same network in plain PyTorch (``nn.Conv2d`` + ``nn.BatchNorm2d`` + ReLU6), with the
    same constructor, methods and state-dict keys as :class:`MobileNetV1`: the oracle for the
    tests and the eager / ``torch.compile`` baseline for the benchmarks."""

    _block_cls = ReferenceDepthwiseSeparable


def mobilenet_v1(alpha: float = 1.0, **kwargs) -> MobileNetV1:
    """``MobileNetV1(alpha=alpha, **kwargs)``."""
    return MobileNetV1(alpha=alpha, **kwargs)


# --------------------------------------------------------------------------------------------
# Export: BN folded into the convs, plain PyTorch


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    w = conv.weight.detach()
    acc = torch.float64
    invstd = torch.rsqrt(bn.running_var.detach().to(acc) + bn.eps)
    scale = invstd * (bn.weight.detach().to(acc) if bn.weight is not None else 1.0)
    shift = -bn.running_mean.detach().to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(acc)
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        groups=conv.groups,
        bias=True,
        device=w.device,
        dtype=w.dtype,
    )
    out.weight.copy_((w.to(acc) * scale.view(-1, 1, 1, 1)).to(w.dtype))
    out.bias.copy_(shift.to(w.dtype))
    return out


class _ConvReLU6(nn.Sequential):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv, nn.ReLU6(inplace=True))


class FoldedMobileNetV1(nn.Module):
    """Inference-only MobileNetV1 with BN folded into the convs (from :meth:`MobileNetV1.fuse`).

    Plain ``nn.Conv2d`` (with bias) + ``nn.ReLU6`` layers and the same classifier, with no dwsep
    ops: works with ``torch.export`` and ``torch.jit.script``. Same outputs as the model in eval.
    """

    def __init__(self, model: _MobileNetV1Base) -> None:
        super().__init__()
        if model.bn1.running_mean is None:
            raise ValueError("fuse: BatchNorm layers without running statistics cannot be folded")
        self.alpha = model.alpha
        self.in_chans = model.in_chans
        self.features_only = model.features_only
        self.out_indices = model.out_indices
        self.drop_rate = model.drop_rate
        self.stem = _ConvReLU6(_fold(model.conv_stem, model.bn1))
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    *(
                        nn.Sequential(
                            _ConvReLU6(_fold(b.conv_dw, b.bn1)),
                            _ConvReLU6(_fold(b.conv_pw, b.bn2)),
                        )
                        for b in stage
                    )
                )
                for stage in model.blocks
            )
        )
        self.classifier = None if model.classifier is None else copy.deepcopy(model.classifier)
        self.eval()

    def forward(self, x: Tensor) -> Union[Tensor, list[Tensor]]:
        x = self.stem(x)
        if self.features_only:
            feats = []
            for i, stage in enumerate(self.blocks):
                x = stage(x)
                if i in self.out_indices:
                    feats.append(x)
            return feats
        x = self.blocks(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FrozenMobileNetV1(nn.Module):
    """Inference-only MobileNetV1 on dwsep's fused kernels with the BatchNorms folded once
    (from :meth:`MobileNetV1.freeze`): one kernel launch per depthwise and pointwise layer.

    The same ``forward``, ``forward_features``, ``forward_stages`` and ``forward_head`` as the
    model, and the same outputs as the model in eval on the same backend. Weights and folded
    BN are buffers (nothing to train); ``train()`` only switches the classifier's dropout.
    Works with ``torch.compile(fullgraph=True)``, CUDA-graph capture and autocast like the model.
    """

    def __init__(self, model: _MobileNetV1Base) -> None:
        super().__init__()
        if model.bn1.running_mean is None:
            raise ValueError("freeze: BatchNorm layers without running statistics cannot be folded")
        for name in ("alpha", "in_chans", "num_classes", "num_features", "drop_rate"):
            setattr(self, name, getattr(model, name))
        self.features_only = model.features_only
        self.out_indices = model.out_indices
        self.feature_info = copy.deepcopy(model.feature_info)
        self.stem = FrozenConvAct("stem", model.conv_stem, model.bn1)
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    *(
                        nn.Sequential(
                            FrozenConvAct("dw", b.conv_dw, b.bn1),
                            FrozenConvAct("pw", b.conv_pw, b.bn2),
                        )
                        for b in stage
                    )
                )
                for stage in model.blocks
            )
        )
        self.classifier = None if model.classifier is None else copy.deepcopy(model.classifier)
        self.eval()

    _channels_last_body_on_cpu = True

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(self._body_input(x))

    def _inference_plan(self, x: Tensor) -> Optional[_InferencePlan]:
        """The direct inference path's plan (every layer's folded buffers, no per-layer module
        calls) when nothing needs the module-by-module path: no x-gradient, no torch.compile
        tracing, no forward hooks on the layers (or global ones), the layers as built, a kernel
        backend. Else None."""
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        found = _plain_blocks(self.blocks)
        if found is None or _has_hooks(self.stem):
            return None
        stem, layers, frozen = self.stem, [], []
        for block in found[0]:
            if type(block) is not nn.Sequential or _has_hooks(block) or len(block) != 2:
                return None
            dw, pw = block
            for m, kind in ((dw, "dw"), (pw, "pw")):
                if type(m) is not FrozenConvAct or m.kind != kind or _has_hooks(m):
                    return None
            layers.append((dw.weight, dw.stride, dw.act, pw.weight, pw.act))
            frozen += [dw, pw]
        if type(stem) is not FrozenConvAct or stem.kind != "stem":
            return None
        dtype = _autocast_dtype(x, stem.weight) or x.dtype
        backend = backends.resolve(x.device, "frozen MobileNetV1", dtype)
        if backend == "torch":
            return None
        acc = ops.acc_dtype(dtype)
        scales = [ops._as(m.scale, acc) for m in [stem] + frozen]
        shifts = [ops._as(m.shift, acc) for m in [stem] + frozen]
        conv = (stem.weight, stem.stride, stem.padding, stem.dilation, stem.groups)
        return _InferencePlan(backend, conv, stem.act, layers, scales, shifts, found[1])

    # The rest is the model's own code (it reads only the attributes set above).
    _check_input = _MobileNetV1Base._check_input
    _body_input = _MobileNetV1Base._body_input
    _features = _DirectInference._features
    forward_features = _MobileNetV1Base.forward_features
    forward_stages = _DirectInference.forward_stages
    forward_head = _MobileNetV1Base.forward_head
    forward = _MobileNetV1Base.forward


# --------------------------------------------------------------------------------------------
# Parameters, MACs and a summary


def _check_resolution(fn: str, resolution: object) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"{fn}: resolution must be an int, got {resolution!r}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"{fn}: resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    return resolution


def model_complexity(
    alpha: float = 1.0, resolution: int = 224, num_classes: int = 1000, in_chans: int = 3
) -> dict:
    """Trainable parameters and multiply-accumulates of MobileNetV1 for one image.

    MACs count the convolutions and the classifier, as the paper does (BatchNorm, activations
    and pooling are not counted; BN folds into the convs at inference). At alpha=1, 224x224 that
    is 568.7M MACs and 4,231,976 parameters (the paper: 569M, 4.2M).

    Returns a dict with ``params``, ``macs``, the per-kind breakdowns ``params_by_kind`` and
    ``macs_by_kind`` (``stem``, ``depthwise``, ``pointwise``, ``classifier``), ``num_features``
    and ``feature_hw`` (the last feature map's H and W), plus the arguments.
    """
    fn = "dwsep.models.model_complexity"
    alpha = _check_alpha(fn, alpha)
    resolution = _check_resolution(fn, resolution)
    num_classes = _check_int(fn, "num_classes", num_classes, 0)
    in_chans = _check_int(fn, "in_chans", in_chans, 1)
    dws, pws = mobilenet_v1_layers(alpha, resolution, 1)
    stem = channels(STEM_CHANNELS, alpha)
    s = conv_out(resolution, 2)
    params = {
        "stem": in_chans * 9 * stem + 2 * stem,
        "depthwise": sum(9 * d.channels + 2 * d.channels for d in dws),
        "pointwise": sum(p.in_channels * p.out_channels + 2 * p.out_channels for p in pws),
    }
    macs = {
        "stem": in_chans * 9 * stem * s * s,
        "depthwise": sum(9 * d.channels * d.out_hw[0] * d.out_hw[1] for d in dws),
        "pointwise": sum(p.in_channels * p.out_channels * p.height * p.width for p in pws),
    }
    nf = pws[-1].out_channels
    params["classifier"] = nf * num_classes + num_classes
    macs["classifier"] = nf * num_classes
    return {
        "alpha": alpha,
        "resolution": resolution,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "params": sum(params.values()),
        "macs": sum(macs.values()),
        "params_by_kind": params,
        "macs_by_kind": macs,
        "num_features": nf,
        "feature_hw": (pws[-1].height, pws[-1].width),
    }


def model_summary(alpha: float = 1.0, resolution: int = 224) -> str:
    """A per-layer table of MobileNetV1 at (alpha, resolution): shapes, parameters and MACs."""
    fn = "dwsep.models.model_summary"
    alpha = _check_alpha(fn, alpha)
    resolution = _check_resolution(fn, resolution)
    info = model_complexity(alpha, resolution)
    dws, pws = mobilenet_v1_layers(alpha, resolution, 1)
    stem = channels(STEM_CHANNELS, alpha)
    s = conv_out(resolution, 2)
    rows = [
        (
            "conv_stem+bn1",
            "conv3x3 s2",
            f"3x{resolution}x{resolution}",
            f"{stem}x{s}x{s}",
            info["params_by_kind"]["stem"],
            info["macs_by_kind"]["stem"],
        )
    ]
    stage_of = _stage_of_block()
    counts = [0] * NUM_STAGES
    for d, p, st in zip(dws, pws, stage_of):
        name = f"blocks.{st}.{counts[st]}"
        counts[st] += 1
        ho, wo = d.out_hw
        rows.append(
            (
                f"{name}.conv_dw+bn1",
                f"dw3x3 s{d.stride}",
                f"{d.channels}x{d.height}x{d.width}",
                f"{d.channels}x{ho}x{wo}",
                11 * d.channels,
                9 * d.channels * ho * wo,
            )
        )
        rows.append(
            (
                f"{name}.conv_pw+bn2",
                "pw1x1",
                f"{p.in_channels}x{p.height}x{p.width}",
                f"{p.out_channels}x{p.height}x{p.width}",
                p.in_channels * p.out_channels + 2 * p.out_channels,
                p.in_channels * p.out_channels * p.height * p.width,
            )
        )
    nf = info["num_features"]
    rows.append(
        (
            "pool+classifier",
            "avg, linear",
            f"{nf}x{pws[-1].height}x{pws[-1].width}",
            f"{info['num_classes']}",
            info["params_by_kind"]["classifier"],
            info["macs_by_kind"]["classifier"],
        )
    )
    head = ("layer", "op", "input CxHxW", "output", "params", "MACs")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    lines = [
        f"MobileNetV1 alpha={alpha:g} resolution={resolution} (dwsep.MobileNetV1; timm "
        f"mobilenetv1_100 layout)",
        "  ".join(h.ljust(w) for h, w in zip(head[:4], widths)) + f"  {'params':>10}  {'MACs':>13}",
    ]
    for r in rows:
        lines.append(
            "  ".join(str(v).ljust(w) for v, w in zip(r[:4], widths))
            + f"  {r[4]:>10,}  {r[5]:>13,}"
        )
    mk = info["macs_by_kind"]
    total = info["macs"]
    lines.append(
        f"total: {info['params']:,} trainable parameters, {total:,} MACs "
        f"({total / 1e6:.1f}M; pointwise {100 * mk['pointwise'] / total:.1f}%, depthwise "
        f"{100 * mk['depthwise'] / total:.1f}%, stem {100 * mk['stem'] / total:.1f}%, "
        f"classifier {100 * mk['classifier'] / total:.1f}%)"
    )
    return "\n".join(lines)
