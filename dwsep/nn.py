"""Modules over the fused ops. Each keeps ``conv`` and ``bn`` submodules shaped like
``nn.Conv2d`` / ``nn.BatchNorm2d``, so existing state dicts load unchanged."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn

from . import backends, ops
from . import functional as DF
from ._validation import FLOAT_DTYPES, activation_code, memory_format
from .frozen import FrozenConvAct, bn_fold

__all__ = [
    "AbsorbedBatchNorm2d",
    "DepthwiseConvBNAct",
    "FusedConv2d",
    "FusedSequential",
    "PointwiseConvBNAct",
    "freeze",
    "fuse_conv_bn_act",
]


def _bn_forward_args(module: nn.Module, bn: nn.BatchNorm2d) -> dict:
    """The batch_norm arguments that nn.BatchNorm2d.forward would use (momentum=None means a
    cumulative average; num_batches_tracked is advanced here)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if module.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    training = module.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not module.training or bn.track_running_stats
    return {
        "running_mean": bn.running_mean if use_running else None,
        "running_var": bn.running_var if use_running else None,
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
        "training": training,
        "momentum": momentum,
        "eps": bn.eps,
    }


def _computes_like(module: nn.Module, base: type) -> bool:
    """Whether ``module`` is a ``base`` whose forward is ``base``'s own and that has no forward
    hooks: a subclass that changes what it computes (timm's ``BatchNormAct2d`` with its
    activation inside, a weight-standardized or dynamically padded conv), or a module whose
    hooks do work, must not be replaced by the fused math."""
    if not isinstance(module, base):
        return False
    if module._forward_pre_hooks or module._forward_hooks:
        return False  # e.g. spectral_norm's weight update: the fused op would skip the hooks
    cls = type(module)
    return cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(
        base, "_conv_forward", None
    )


def _inference_call(
    kind: str,
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    activation: Optional[str],
    training: bool,
) -> Optional[Tensor]:
    """The fused op's inference kernel called straight, for a module that holds (conv, bn):
    the BN folded as the eval path folds it (``frozen.bn_fold``), then
    one kernel call, skipping the functional op's per-call validation and dispatch. Only for
    pure inference (BN in eval with running statistics, grad mode off, no torch.compile
    tracing, a kernel backend) with every argument as the kernels take it; otherwise None, and
    the caller goes through the functional op, which checks everything and raises its errors.
    ``kind`` is "depthwise" or "pointwise"."""
    if training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    rm, rv, g, b = bn.running_mean, bn.running_var, bn.weight, bn.bias
    if rm is None or rv is None or g is None or b is None:
        return None
    if type(x) is not Tensor or x.dim() != 4 or x.shape[1] != conv.in_channels or x.numel() == 0:
        return None
    x, w = DF._autocast(x, conv.weight)
    if x.dtype != w.dtype or x.dtype not in FLOAT_DTYPES or x.device != w.device:
        return None
    acc = ops.acc_dtype(x.dtype)
    for t in (rm, rv, g, b):
        if t.dtype != acc or t.device != x.device:
            return None
    backend = backends.resolve(x.device, f"{kind}_conv_bn_act", x.dtype)
    if backend == "torch":
        return None
    scale, shift = bn_fold(bn, acc)
    x = x.contiguous(memory_format=memory_format(x))
    table, act = ops.op_table(backend), activation_code("dwsep.nn", activation)
    if kind == "depthwise":
        return table.dw_fwd(x, w.contiguous(), scale, shift, int(conv.stride[0]), act)
    return table.pw_fwd(x, w.flatten(1).contiguous(), scale, shift, act)


class _ConvBNAct(nn.Module):
    conv: nn.Conv2d
    bn: nn.BatchNorm2d

    def __init__(self, activation: Optional[str]) -> None:
        super().__init__()
        activation_code(type(self).__name__, activation)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    @staticmethod
    def _check_pair(cls_name: str, conv: nn.Module, bn: nn.Module) -> None:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                f"{cls_name}.from_modules: conv must be nn.Conv2d, got {type(conv).__name__}"
            )
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(
                f"{cls_name}.from_modules: bn must be nn.BatchNorm2d, got {type(bn).__name__}"
            )
        for what, m, base in (("conv", conv, nn.Conv2d), ("bn", bn, nn.BatchNorm2d)):
            if not _computes_like(m, base):
                raise TypeError(
                    f"{cls_name}.from_modules: {what} must compute what {base.__name__} computes "
                    f"(its own forward, no forward hooks), got a {type(m).__name__} that does not"
                )
        if conv.bias is not None:
            raise ValueError(
                f"{cls_name}.from_modules: conv must have bias=False (BN follows it), got a bias"
            )
        if bn.num_features != conv.out_channels:
            raise ValueError(
                f"{cls_name}.from_modules: bn.num_features must equal conv.out_channels="
                f"{conv.out_channels}, got {bn.num_features}"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{cls_name}.from_modules: conv.padding_mode must be 'zeros', got {conv.padding_mode!r}"
            )


class DepthwiseConvBNAct(_ConvBNAct):
    """Depthwise 3x3 conv (padding 1, stride 1 or 2) + BatchNorm + activation, fused.

    Follows ``train()``/``eval()`` like ``nn.BatchNorm2d``: batch statistics and running-stat
    updates in training, the folded running statistics in eval.
    """

    def __init__(
        self,
        channels: int,
        stride: int = 1,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        activation: Optional[str] = "relu6",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(activation)
        if stride not in (1, 2):
            raise ValueError(f"DepthwiseConvBNAct: stride must be 1 or 2, got {stride!r}")
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False, **kw)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, **kw)

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str] = "relu6"
    ) -> DepthwiseConvBNAct:
        """Take over an existing depthwise ``conv`` and ``bn`` pair (parameters are shared)."""
        name = f"{cls.__name__}"
        cls._check_pair(name, conv, bn)
        C = conv.in_channels
        if not (
            conv.groups == C == conv.out_channels
            and tuple(conv.kernel_size) == (3, 3)
            and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1)
            and conv.stride[0] == conv.stride[1]
            and conv.stride[0] in (1, 2)
        ):
            raise ValueError(
                f"{name}.from_modules: conv must be a depthwise 3x3 conv with padding 1, dilation 1, "
                f"stride 1 or 2 and groups=in_channels=out_channels, got {conv}"
            )
        self = cls.__new__(cls)
        _ConvBNAct.__init__(self, activation)
        self.conv = conv
        self.bn = bn
        return self

    @property
    def stride(self) -> int:
        return int(self.conv.stride[0])

    def forward(self, x: Tensor) -> Tensor:
        y = _inference_call("depthwise", x, self.conv, self.bn, self.activation, self.training)
        if y is not None:
            return y
        return DF.depthwise_conv_bn_act(
            x,
            self.conv.weight,
            stride=self.stride,
            activation=self.activation,
            **_bn_forward_args(self, self.bn),
        )


class PointwiseConvBNAct(_ConvBNAct):
    """Pointwise 1x1 conv + BatchNorm + activation, fused (a GEMM with a fused epilogue)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        activation: Optional[str] = "relu6",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(activation)
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **kw)

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str] = "relu6"
    ) -> PointwiseConvBNAct:
        """Take over an existing 1x1 ``conv`` and ``bn`` pair (parameters are shared)."""
        name = f"{cls.__name__}"
        cls._check_pair(name, conv, bn)
        if not (
            tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (0, 0)
            and conv.groups == 1
        ):
            raise ValueError(
                f"{name}.from_modules: conv must be a 1x1 conv with stride 1, padding 0 and "
                f"groups=1, got {conv}"
            )
        self = cls.__new__(cls)
        _ConvBNAct.__init__(self, activation)
        self.conv = conv
        self.bn = bn
        return self

    def forward(self, x: Tensor) -> Tensor:
        y = _inference_call("pointwise", x, self.conv, self.bn, self.activation, self.training)
        if y is not None:
            return y
        return DF.pointwise_conv_bn_act(
            x, self.conv.weight, activation=self.activation, **_bn_forward_args(self, self.bn)
        )


# --- Converting existing models ----------------------------------------------------------------

_ACTIVATIONS = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"))


def _fusable_kind(conv: nn.Module, bn: nn.Module, check_bn: bool = True) -> Optional[str]:
    """ "depthwise" or "pointwise" when (conv, bn) is a pair the fused ops compute, else None
    (``check_bn=False``: the caller has checked what the BN computes)."""
    if not _computes_like(conv, nn.Conv2d):
        return None
    if check_bn and not _computes_like(bn, nn.BatchNorm2d):
        return None
    if (
        conv.bias is not None
        or conv.padding_mode != "zeros"
        or bn.num_features != conv.out_channels
    ):
        return None
    k, s, p, d = (tuple(v) for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    c = conv.in_channels
    if k == (3, 3) and p == (1, 1) and d == (1, 1) and s in ((1, 1), (2, 2)):
        if conv.groups == c == conv.out_channels:
            return "depthwise"
    if k == (1, 1) and s == (1, 1) and p == (0, 0) and conv.groups == 1:
        return "pointwise"
    return None


def _activation_of(module: Optional[nn.Module]) -> Optional[str]:
    for cls, name in _ACTIVATIONS:
        if type(module) is cls:
            return name
    return None


def _fused_call(
    kind: str, x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str]
) -> Tensor:
    """The fused op of a (conv, bn) pair of ``kind`` (see _fusable_kind), with BatchNorm
    following ``bn``'s own ``training`` flag as nn.BatchNorm2d does."""
    y = _inference_call(kind, x, conv, bn, activation, bn.training)
    if y is not None:
        return y
    args = _bn_forward_args(bn, bn)
    if kind == "depthwise":
        stride = int(conv.stride[0])
        return DF.depthwise_conv_bn_act(
            x, conv.weight, stride=stride, activation=activation, **args
        )
    return DF.pointwise_conv_bn_act(x, conv.weight, activation=activation, **args)


def _plan(seq: nn.Sequential) -> list[tuple]:
    """The steps of a Sequential: ("module", name) or ("fused", kind, conv, bn, act or None,
    activation) for each Conv2d + BatchNorm2d (+ ReLU6 / ReLU) run the fused ops can compute."""
    names = list(seq._modules)
    steps: list[tuple] = []
    i = 0
    while i < len(names):
        kind = None
        if i + 1 < len(names):
            kind = _fusable_kind(seq._modules[names[i]], seq._modules[names[i + 1]])
        if kind is None:
            steps.append(("module", names[i]))
            i += 1
            continue
        act_name = names[i + 2] if i + 2 < len(names) else None
        activation = _activation_of(seq._modules[act_name]) if act_name is not None else None
        if activation is None:
            act_name = None
        steps.append(("fused", kind, names[i], names[i + 1], act_name, activation))
        i += 3 if act_name is not None else 2
    return steps


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose Conv2d + BatchNorm2d (+ ReLU6 / ReLU) runs execute as dwsep's
    fused ops. Made by :func:`fuse_conv_bn_act` from an existing Sequential (or subclass, e.g.
    torchvision's ``Conv2dNormActivation``): it keeps that module's children and attributes, so
    the parameters are the same objects and ``state_dict`` keys are unchanged. BatchNorm follows
    each ``bn`` module's own ``training`` flag, as ``nn.BatchNorm2d`` does. Children that
    compute differently from ``nn.Conv2d`` / ``nn.BatchNorm2d`` (a subclass with its own
    forward) or carry forward hooks are not fused. A hook registered on a fused child after
    conversion does not run."""

    _dwsep_plan: list
    _dwsep_children: tuple = ()

    def __init__(self, *args) -> None:
        """Like ``nn.Sequential(*args)``, with the fusable runs among ``args`` fused."""
        super().__init__(*args)
        self._set_plan()

    def _set_plan(self) -> None:
        self._dwsep_plan = _plan(self)
        self._dwsep_children = tuple(self._modules.values())

    def _current_plan(self) -> list:
        """The plan, made again if children were added, removed or replaced since (append,
        insert, ``seq[i] = m``, ...), so that every child always runs."""
        kids = tuple(self._modules.values())
        made = self._dwsep_children
        if len(kids) != len(made) or any(a is not b for a, b in zip(kids, made)):
            self._set_plan()
        return self._dwsep_plan

    def forward(self, x: Tensor) -> Tensor:
        mods = self._modules
        for step in self._current_plan():
            if step[0] == "module":
                x = mods[step[1]](x)
                continue
            _, kind, conv_name, bn_name, _act_name, activation = step
            x = _fused_call(kind, x, mods[conv_name], mods[bn_name], activation)
        return x

    def extra_repr(self) -> str:
        fused = [
            f"{s[2]}+{s[3]}" + (f"+{s[4]}" if s[4] else "")
            for s in self._dwsep_plan
            if s[0] == "fused"
        ]
        return f"fused={fused}"


# --- Pairs inside modules with their own forward (timm's blocks, ConvNormAct, ...) ------------


def _is_timm_bn_act(bn: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` itself (not a subclass), without hooks: its forward is
    BatchNorm2d's math, then ``self.drop``, then ``self.act``."""
    cls = type(bn)
    return (
        cls.__qualname__ == "BatchNormAct2d"
        and cls.__module__.startswith("timm.")
        and isinstance(bn, nn.BatchNorm2d)
        and not (bn._forward_pre_hooks or bn._forward_hooks)
        and isinstance(getattr(bn, "act", None), nn.Module)
        and isinstance(getattr(bn, "drop", None), nn.Module)
    )


def _norm_epilogue(bn: nn.Module) -> Optional[tuple[Optional[str], bool]]:
    """For a BN a fused op can take over: (the activation to fuse, whether the BN module must
    still run its own drop + act after it). None when it cannot be taken over."""
    if _computes_like(bn, nn.BatchNorm2d):
        return None, False
    if not _is_timm_bn_act(bn):
        return None
    act = bn.act
    if type(bn.drop) is not nn.Identity:
        return None  # DropBlock between the BN and its activation: left as it is
    if type(act) is nn.Identity:
        return None, False
    activation = _activation_of(act)
    if activation is not None:
        return activation, False
    return None, True  # e.g. SiLU or Hardswish: conv + BN fused, the activation runs after


class _ChildCallTracer(torch.fx.Tracer):
    """Traces one module's own forward, every submodule a leaf (one call_module node each)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _pairs_in_graph(graph: torch.fx.Graph) -> set[tuple[str, str]]:
    """(conv, bn) child names where the conv's only use is as the only argument of the bn's
    call, and each of the two is called once and touched nowhere else in the forward."""
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            head = str(node.target).split(".")[0]
            uses[head] = uses.get(head, 0) + 1
    pairs = set()
    for node in graph.nodes:
        if node.op != "call_module" or "." in str(node.target) or len(node.users) != 1:
            continue
        (user,) = node.users
        conv_name, bn_name = str(node.target), str(user.target)
        if (
            user.op == "call_module"
            and "." not in bn_name
            and user.args == (node,)
            and not user.kwargs
            and len(node.args) == 1
            and not node.kwargs
            and uses.get(conv_name) == 1
            and uses.get(bn_name) == 1
        ):
            pairs.add((conv_name, bn_name))
    return pairs


def _traced_pairs(module: nn.Module) -> set[tuple[str, str]]:
    """The (conv, bn) pairs that ``module``'s forward runs back to back, in training and in
    eval alike (a forward that branches on ``self.training`` keeps only pairs of both); empty
    when the forward cannot be traced (e.g. it branches on tensor values)."""
    found = None
    was = module.training
    try:
        for mode in (was, not was):
            module.training = mode  # its own flag only: the children are leaves
            try:
                graph = _ChildCallTracer().trace(module)
            except Exception:  # untraceable forward: nothing is fused in this module
                return set()
            pairs = _pairs_in_graph(graph)
            found = pairs if found is None else found & pairs
    finally:
        module.training = was
    return found or set()


class _FusedPair:
    """A (conv, BN) pair fused in ``parent``: the two modules and the attribute names the parent
    holds them under, and their classes before fusing. Both sides check :meth:`intact` on each
    call and compute what they computed before fusing if not: if either attribute now holds
    another module (a replaced or wrapped layer), the BN is neither skipped nor applied twice."""

    def __init__(self, parent: nn.Module, conv_name: str, bn_name: str, conv, bn) -> None:
        self.parent, self.conv_name, self.bn_name = parent, conv_name, bn_name
        self.conv_cls, self.bn_cls = type(conv), type(bn)
        self.conv: Optional[FusedConv2d] = None
        self.norm: Optional[AbsorbedBatchNorm2d] = None

    def intact(self) -> bool:
        return (
            getattr(self.parent, self.conv_name, None) is self.conv
            and getattr(self.parent, self.bn_name, None) is self.norm
        )


class FusedConv2d(nn.Conv2d):
    """A depthwise 3x3 or pointwise 1x1 ``nn.Conv2d`` that applies the BatchNorm (and
    activation) that follows it in its parent's forward, as one dwsep fused op. Made by
    :func:`fuse_conv_bn_act` for modules with their own forward (timm's blocks): it is the
    original conv (same parameters, attributes and ``state_dict`` keys), and the BN module
    it applies (an :class:`AbsorbedBatchNorm2d`, still a child of the parent, where its
    parameters, buffers and ``training`` flag live) then passes its input through. If the
    parent no longer holds the two (one was replaced), it is a plain conv again."""

    _dwsep_kind: str
    _dwsep_activation: Optional[str]
    _dwsep_pair: _FusedPair

    def forward(self, x: Tensor) -> Tensor:
        pair = self._dwsep_pair
        if not pair.intact():
            return nn.Conv2d.forward(self, x)
        return _fused_call(self._dwsep_kind, x, self, pair.norm, self._dwsep_activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused with BN, activation={self._dwsep_activation!r}"


class AbsorbedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose normalization (and activation) its :class:`FusedConv2d` applies.
    It keeps its parameters, buffers and ``state_dict`` keys; its forward passes its input
    through, or runs only what was not fused (timm ``BatchNormAct2d``'s ``act`` where it is not
    ReLU/ReLU6). :func:`fuse_conv_bn_act` only absorbs a BN that its parent's forward calls
    once, on the conv's output only. If the parent no longer holds the two (one was replaced),
    it computes what the BN computed before fusing."""

    _dwsep_post_ops: bool = False
    _dwsep_timm: bool = False  # a timm BatchNormAct2d before fusing: BN, drop, act
    # An out-of-place twin of an in-place activation: the fused op saves its output for the
    # backward, which the original BN did not, so autograd must not see it modified.
    _dwsep_act_twin: Optional[nn.Module] = None
    _dwsep_pair: _FusedPair

    def forward(self, x: Tensor) -> Tensor:
        if not self._dwsep_pair.intact():
            x = nn.BatchNorm2d.forward(self, x)
            return self.act(self.drop(x)) if self._dwsep_timm else x
        if not self._dwsep_post_ops:
            return x
        act = self.act
        if self._dwsep_act_twin is not None and torch.is_grad_enabled() and x.requires_grad:
            act = self._dwsep_act_twin
        return act(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, applied by its conv"


def _absorb(module: nn.Module, conv_name: str, bn_name: str, kind: str) -> None:
    conv, bn = module._modules[conv_name], module._modules[bn_name]
    activation, post_ops = _norm_epilogue(bn)
    pair = _FusedPair(module, conv_name, bn_name, conv, bn)
    head = FusedConv2d.__new__(FusedConv2d)
    head.__dict__ = dict(conv.__dict__)  # the same parameters, buffers and flags
    norm = AbsorbedBatchNorm2d.__new__(AbsorbedBatchNorm2d)
    norm.__dict__ = dict(bn.__dict__)
    norm._dwsep_post_ops = post_ops
    norm._dwsep_timm = _is_timm_bn_act(bn)
    if post_ops and getattr(bn.act, "inplace", False) is True:
        twin = copy.copy(bn.act)  # shares the activation's parameter dicts, if any
        twin.inplace = False
        norm.__dict__["_dwsep_act_twin"] = twin  # not registered: no state of its own
    head._dwsep_kind = kind
    head._dwsep_activation = activation
    pair.conv, pair.norm = head, norm
    head._dwsep_pair = norm._dwsep_pair = pair  # plain attributes: nothing registered
    module._modules[conv_name] = head
    module._modules[bn_name] = norm


def _unfused(module: nn.Module) -> nn.Module:
    """A FusedConv2d or AbsorbedBatchNorm2d whose pair is no longer intact, as the module it
    was before fusing (same parameters and attributes); anything else as it is."""
    if not isinstance(module, (FusedConv2d, AbsorbedBatchNorm2d)) or module._dwsep_pair.intact():
        return module
    pair = module._dwsep_pair
    cls = pair.conv_cls if isinstance(module, FusedConv2d) else pair.bn_cls
    old = cls.__new__(cls)
    old.__dict__ = {k: v for k, v in module.__dict__.items() if not k.startswith("_dwsep_")}
    return old


def _absorb_traced_pairs(module: nn.Module, shared: set[int]) -> None:
    """Fuses the conv + BN pairs of a module with its own forward (see fuse_conv_bn_act)."""
    kids = module._modules
    free = [n for n, m in kids.items() if m is not None and id(m) not in shared]
    convs = {n for n in free if _computes_like(kids[n], nn.Conv2d)}
    norms = {n for n in free if _norm_epilogue(kids[n]) is not None}
    if not convs or not norms:
        return  # nothing to fuse: no need to trace
    for conv_name, bn_name in sorted(_traced_pairs(module)):
        if conv_name not in convs or bn_name not in norms:
            continue
        kind = _fusable_kind(kids[conv_name], kids[bn_name], check_bn=False)
        if kind is not None:
            _absorb(module, conv_name, bn_name, kind)


def _fused_copy(seq: nn.Sequential, plan: list) -> FusedSequential:
    new = FusedSequential.__new__(FusedSequential)
    new.__dict__ = dict(seq.__dict__)  # same children, parameters, buffers, hooks and flags
    new._dwsep_plan = plan
    new._dwsep_children = tuple(new._modules.values())
    return new


def _replace_bottom_up(module: nn.Module, replace) -> nn.Module:
    """``replace(m)`` (a module to put in m's place, or m itself) applied to every module of the
    tree, children before their parent; returns what takes ``module``'s place."""
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _replace_bottom_up(child, replace)
    return replace(module)


def fuse_conv_bn_act(model: nn.Module) -> nn.Module:
    """Runs every depthwise 3x3 and pointwise 1x1 conv + BatchNorm (+ ReLU6 / ReLU) of ``model``
    through dwsep's fused ops, in place, and returns the model. The conv must be depthwise 3x3
    (padding 1, stride 1 or 2, no bias) or 1x1 (stride 1, no bias). Parameters stay the same
    objects and ``state_dict`` keys do not change (load weights before or after).

    Two kinds of parents are looked into:

    - every ``nn.Sequential`` (and subclass, such as torchvision's ``Conv2dNormActivation``):
      consecutive ``Conv2d``, ``BatchNorm2d`` and optional ``ReLU6`` / ``ReLU`` children. The
      Sequential becomes a :class:`FusedSequential` with the same children. torchvision's
      ``mobilenet_v2`` gets all 51 of its depthwise (17) and pointwise (34) layers fused.
    - every other module with a conv and a BN among its children (timm's
      ``DepthwiseSeparableConv``, ``InvertedResidual``, ``ConvNormAct``, its models' heads):
      its forward is traced with ``torch.fx``, children as leaves, in training and in eval
      mode. A pair is fused where, in both, the conv's output goes only to the BN, and each is
      called once and touched nowhere else; the conv becomes a :class:`FusedConv2d` that
      applies the BN, and the BN an :class:`AbsorbedBatchNorm2d` that passes its input on. A
      timm ``BatchNormAct2d`` fuses its ReLU / ReLU6; another activation (SiLU, Hardswish) is
      kept and runs after the fused conv + BN. A forward that cannot be traced (it branches
      on tensor values) is left as it is, and so are modules reachable from two places.

    Convs and BNs that compute something else (a subclass with its own forward, forward
    hooks, SyncBatchNorm) are never fused; everything else runs as before. A model that is
    itself a matching Sequential is returned as a new object.

    A forward whose pairs depend on attributes other than ``training`` (``if self.use_bn:``)
    is traced as it is at conversion: change such attributes before converting, not after.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_conv_bn_act: model must be an nn.Module, got {type(model).__name__}")

    seen: set[int] = set()
    shared: set[int] = set()  # modules reachable twice: never absorbed
    for _, m in model.named_modules(remove_duplicate=False):
        (shared if id(m) in seen else seen).add(id(m))

    def convert(module: nn.Module) -> nn.Module:
        module = _unfused(module)  # a pair broken up since an earlier conversion
        if isinstance(module, nn.Sequential):
            if not isinstance(module, FusedSequential):
                plan = _plan(module)
                if any(step[0] == "fused" for step in plan):
                    return _fused_copy(module, plan)
        elif id(module) not in shared:
            _absorb_traced_pairs(module, shared)
        return module

    return _replace_bottom_up(model, convert)


def freeze(model: nn.Module) -> nn.Module:
    """An inference-only copy of ``model`` with every fusable conv + BN (+ act) folded once.

    The copy is converted as :func:`fuse_conv_bn_act` does (the original is left as it is),
    then each fused run, and each :class:`DepthwiseConvBNAct` / :class:`PointwiseConvBNAct`,
    becomes one ``FrozenConvAct``: the conv weight and the BN folded into a per-channel scale
    and shift, as buffers, so a forward is one kernel launch per layer with no per-call BN
    folding or checks; a :class:`dwsep.MobileNetV1` anywhere in ``model`` becomes its
    :meth:`~dwsep.MobileNetV1.freeze` (a ``FrozenMobileNetV1``). Same outputs
    as the converted model in eval on the same backend. The frozen layers are a snapshot:
    training or loading weights into the original does not change them, and their
    ``state_dict`` keys differ from the original's (``<conv name>.weight``, ``.scale``,
    ``.shift``). BatchNorms without running statistics cannot be folded (ValueError).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: model must be an nn.Module, got {type(model).__name__}")
    from .models.mobilenet_v1 import MobileNetV1  # here: the models module imports this one

    frozen = fuse_conv_bn_act(copy.deepcopy(model))

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, MobileNetV1):  # also as a part, e.g. a detector's backbone
            return module.freeze()
        if isinstance(module, (DepthwiseConvBNAct, PointwiseConvBNAct)):
            kind = "dw" if isinstance(module, DepthwiseConvBNAct) else "pw"
            return FrozenConvAct(kind, module.conv, module.bn, module.activation)
        if isinstance(module, FusedConv2d):  # its pair is intact: fuse_conv_bn_act checked
            kind = "dw" if module._dwsep_kind == "depthwise" else "pw"
            return FrozenConvAct(kind, module, module._dwsep_pair.norm, module._dwsep_activation)
        if isinstance(module, AbsorbedBatchNorm2d):
            return module.act if module._dwsep_post_ops else nn.Identity()
        if isinstance(module, FusedSequential):
            mods, steps = module._modules, OrderedDict()
            for step in module._dwsep_plan:
                if step[0] == "module":
                    steps[step[1]] = mods[step[1]]
                    continue
                _, kind, conv, bn, _act, activation = step
                steps[conv] = FrozenConvAct(
                    "dw" if kind == "depthwise" else "pw", mods[conv], mods[bn], activation
                )
            return nn.Sequential(steps)
        return module

    return _replace_bottom_up(frozen, convert).eval()
