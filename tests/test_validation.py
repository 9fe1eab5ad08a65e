"""Bad input raises a Python exception naming the argument, the expectation and the value,
on every backend (validation runs before dispatch)."""

from __future__ import annotations

import pytest
import torch

import dwsep
from dwsep import depthwise_conv_bn_act as dw
from dwsep import pointwise_conv_bn_act as pw


def dw_args(C=4, dtype=torch.float32):
    x = torch.randn(2, C, 5, 5, dtype=dtype)
    w = torch.randn(C, 1, 3, 3, dtype=dtype)
    return x, w, torch.zeros(C), torch.ones(C), torch.ones(C), torch.zeros(C)


def pw_args(cin=4, cout=6, dtype=torch.float32):
    x = torch.randn(2, cin, 5, 5, dtype=dtype)
    w = torch.randn(cout, cin, 1, 1, dtype=dtype)
    return x, w, torch.zeros(cout), torch.ones(cout), torch.ones(cout), torch.zeros(cout)


@pytest.fixture(params=dwsep.available_backends("cpu"))
def backend(request):
    with dwsep.use_backend(request.param):
        yield request.param


def expect(exc, *fragments):
    """pytest.raises whose message must contain every fragment."""

    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            ok = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for f in fragments:
                assert f in msg, f"{f!r} not in error message {msg!r}"
            return ok

    return _Ctx()


def test_wrong_rank(backend):
    x, w, *bn = dw_args()
    with expect(ValueError, "x must be a 4-D", "3-D"):
        dw(x[0], w, *bn)
    with expect(ValueError, "x must be a 4-D", "5-D"):
        pw(x[None], torch.randn(6, 4, 1, 1), *pw_args()[2:])


def test_weight_shape(backend):
    x, w, *bn = dw_args(C=4)
    with expect(ValueError, "weight must be (C, 1, 3, 3)", "(4, 1, 3, 3)", "(5, 1, 3, 3)"):
        dw(x, torch.randn(5, 1, 3, 3), *bn)
    with expect(ValueError, "weight", "(4, 1, 5, 5)"):
        dw(x, torch.randn(4, 1, 5, 5), *bn)
    x, w, *bn = pw_args()
    with expect(ValueError, "weight must be (Cout, Cin, 1, 1)", "(6, 3, 1, 1)"):
        pw(x, torch.randn(6, 3, 1, 1), *bn)
    with expect(TypeError, "weight must be a torch.Tensor", "list"):
        pw(x, [1.0], *bn)


@pytest.mark.parametrize("stride", [0, 3, (1, 2), 1.5, True])
def test_unsupported_stride(backend, stride):
    x, w, *bn = dw_args()
    with expect(ValueError, "stride must be 1 or 2", repr(stride)):
        dw(x, w, *bn, stride=stride)


def test_unsupported_padding_or_dilation_in_modules():
    conv = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
    with expect(ValueError, "padding 1, dilation 1"):
        dwsep.nn.DepthwiseConvBNAct.from_modules(conv, torch.nn.BatchNorm2d(4))
    conv = torch.nn.Conv2d(4, 4, 3, padding=0, groups=4, bias=False)
    with expect(ValueError, "padding 1"):
        dwsep.nn.DepthwiseConvBNAct.from_modules(conv, torch.nn.BatchNorm2d(4))
    conv = torch.nn.Conv2d(4, 6, 1, padding=1, bias=False)
    with expect(ValueError, "padding 0"):
        dwsep.nn.PointwiseConvBNAct.from_modules(conv, torch.nn.BatchNorm2d(6))
    with expect(ValueError, "bias=False"):
        dwsep.nn.PointwiseConvBNAct.from_modules(torch.nn.Conv2d(4, 6, 1), torch.nn.BatchNorm2d(6))
    with expect(ValueError, "bn.num_features must equal conv.out_channels=6", "5"):
        dwsep.nn.PointwiseConvBNAct.from_modules(
            torch.nn.Conv2d(4, 6, 1, bias=False), torch.nn.BatchNorm2d(5)
        )


def test_mixed_dtypes(backend):
    x, w, *bn = dw_args()
    with expect(TypeError, "weight must have dtype torch.float32", "torch.float64"):
        dw(x, w.double(), *bn)
    rm, rv, g, b = bn
    with expect(TypeError, "bn_weight must have dtype", "torch.float16"):
        dw(x, w, rm, rv, g.half(), b)
    x, w, *bn = pw_args(dtype=torch.float64)
    with expect(TypeError, "running_mean must have dtype torch.float64", "torch.float32"):
        pw(x, w, bn[0].float(), *bn[1:])


def test_mixed_devices(backend):
    x, w, *bn = dw_args()
    meta_w = w.to("meta")
    with expect(ValueError, "weight must be on cpu", "meta"):
        dw(x, meta_w, *bn)
    rm, rv, g, b = bn
    with expect(ValueError, "running_var must be on cpu", "meta"):
        dw(x, w, rm, rv.to("meta"), g, b)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_or_bool_dtypes(backend, dtype):
    x = torch.ones(2, 4, 5, 5, dtype=dtype)
    w = torch.ones(4, 1, 3, 3, dtype=dtype)
    with expect(TypeError, "x must be float16, bfloat16, float32 or float64", str(dtype)):
        dw(x, w, torch.zeros(4), torch.ones(4))
    with expect(TypeError, "x must be float16", str(dtype)):
        pw(x, torch.ones(6, 4, 1, 1, dtype=dtype), torch.zeros(6), torch.ones(6))


def test_bn_tensors_of_wrong_length(backend):
    x, w, rm, rv, g, b = dw_args(C=4)
    for name, args in [
        ("running_mean", (torch.zeros(3), rv, g, b)),
        ("running_var", (rm, torch.ones(5), g, b)),
        ("bn_weight", (rm, rv, torch.ones(1), b)),
        ("bn_bias", (rm, rv, g, torch.zeros(2, 2))),
    ]:
        with expect(ValueError, f"{name} must have shape (4,)"):
            dw(x, w, *args)
    x, w, rm, rv, g, b = pw_args(cout=6)
    with expect(ValueError, "bn_weight must have shape (6,)", "(4,)"):
        pw(x, w, rm, rv, torch.ones(4), b)


def test_eval_needs_running_stats(backend):
    x, w, *_ = dw_args()
    with expect(ValueError, "training=False needs running_mean and running_var"):
        dw(x, w, None, None, training=False)
    with expect(ValueError, "running_mean and running_var must both be tensors or both be None"):
        dw(x, w, torch.zeros(4), None, training=True)
    x, w, *_ = pw_args()
    with expect(ValueError, "training=False needs running_mean and running_var"):
        pw(x, w)


@pytest.mark.parametrize("activation", ["gelu", "ReLU6", 6, "hardswish"])
def test_unknown_activation(backend, activation):
    x, w, *bn = dw_args()
    with expect(ValueError, "activation must be one of 'relu6', 'relu' or None", repr(activation)):
        dw(x, w, *bn, activation=activation)
    with expect(ValueError, "activation must be one of"):
        dwsep.nn.PointwiseConvBNAct(4, 6, activation=activation)


def test_one_value_per_channel_in_training(backend):
    x = torch.randn(1, 4, 1, 1)
    w = torch.randn(4, 1, 3, 3)
    with expect(ValueError, "expected more than 1 value per channel when training"):
        dw(x, w, training=True)
    with expect(ValueError, "expected more than 1 value per channel when training"):
        dw(torch.randn(1, 4, 2, 2), w, training=True, stride=2)


def test_bad_eps_and_momentum(backend):
    x, w, *bn = dw_args()
    with expect(ValueError, "eps must be a positive float", "0.0"):
        dw(x, w, *bn, eps=0.0)
    with expect(TypeError, "momentum must be a float", "str"):
        dw(x, w, *bn, training=True, momentum="0.1")


def test_zero_channels(backend):
    with expect(ValueError, "x must have at least one channel"):
        dw(torch.randn(2, 0, 4, 4), torch.randn(0, 1, 3, 3))


def test_compiled_ops_check_their_inputs():
    """The C++ glue refuses what would crash a kernel even when called directly."""
    if "cpu" not in dwsep.available_backends("cpu"):
        pytest.skip("compiled extension not loaded")
    z = torch.randn(2, 4, 3, 3)
    with expect(RuntimeError, "scale must be a contiguous 1-D tensor of length 4"):
        torch.ops.dwsep.bn_act(z, torch.ones(3), torch.zeros(4), 2)
    with expect(RuntimeError, "act must be 0 (none), 1 (relu) or 2 (relu6)", "7"):
        torch.ops.dwsep.bn_act(z, torch.ones(4), torch.zeros(4), 7)
    with expect(RuntimeError, "contiguous in NCHW or channels_last"):
        torch.ops.dwsep.bn_act(z[:, :, ::2], torch.ones(4), torch.zeros(4), 2)
    with expect(RuntimeError, "scale must have dtype Float"):
        torch.ops.dwsep.bn_act(z, torch.ones(4, dtype=torch.float64), torch.zeros(4), 2)
