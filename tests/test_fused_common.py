"""Behaviour shared by both fused ops, on every backend: empty batches, every output element
written (poisoned outputs), bitwise determinism, float64 gradcheck, torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch
from op_harness import (
    LAYOUTS,
    backend_dtype_params,
    backend_params,
    make_inputs,
    run_and_compare,
    to_layout,
)

import dwsep
from dwsep._debug import poison_outputs
from dwsep.testing import reference_f64

OPS = {
    # op: (x shape, extra make_inputs kwargs, a stride-2 variant of the op kwargs)
    "depthwise": ((2, 11, 9, 7), {}, {"stride": 2}),
    "pointwise": ((2, 11, 9, 7), {"cout": 13}, {}),
}


def call(op, backend, x, weight, bn, **kwargs):
    fn = dwsep.depthwise_conv_bn_act if op == "depthwise" else dwsep.pointwise_conv_bn_act
    with dwsep.use_backend(backend):
        return fn(x, weight, **bn, **kwargs)


def leaves(x, weight, bn):
    return [x, weight, bn["bn_weight"], bn["bn_bias"]]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "device"), backend_params(include_torch=True))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_batch(op, backend, device, training):
    shape, extra, kw = OPS[op]
    x, weight, bn = make_inputs(op, (0, *shape[1:]), torch.float32, device, **extra)
    before = {k: v.clone() for k, v in bn.items()}
    y = call(op, backend, x, weight, bn, training=training, **kw)
    expected = (0, 11, 5, 4) if op == "depthwise" else (0, 13, 9, 7)
    assert tuple(y.shape) == expected
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(bn[k], before[k], rtol=0, atol=0)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_output_element_written(op, backend, device, layout):
    shape, extra, kw = OPS[op]
    for training, variant in itertools.product([False, True], [{}, kw]):
        x, weight, bn = make_inputs(op, shape, torch.float32, device, **extra)
        x = to_layout(x, layout)
        for t in leaves(x, weight, bn):
            t.requires_grad_()
        with poison_outputs():
            y = call(op, backend, x, weight, bn, training=training, activation=None, **variant)
            y.backward(torch.ones_like(y))
        named = {
            "y": y,
            "grad x": x.grad,
            "grad weight": weight.grad,
            "grad bn_weight": bn["bn_weight"].grad,
            "grad bn_bias": bn["bn_bias"].grad,
            "running_mean": bn["running_mean"],
            "running_var": bn["running_var"],
        }
        for name, t in named.items():
            assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu6", "relu", None])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_nan_propagates(op, backend, device, layout, activation, training):
    """A NaN in x gives NaN exactly where F.conv2d + F.batch_norm + the activation give NaN (in
    float64): activations must not clamp NaN to 0 or 6, as a max/min-based relu can. In
    training the NaN reaches the batch statistics, so whole channels are NaN (every channel
    for the pointwise op), through the training forward's own kernels (statistics, then
    normalize and activate)."""
    shape, extra, kw = OPS[op]
    x, weight, bn = make_inputs(op, shape, torch.float32, device, **extra)
    x[0, 1, 2, 3] = float("nan")
    x[1, 4, 0, 0] = float("nan")
    x = to_layout(x, layout)
    y = call(op, backend, x, weight, bn, training=training, activation=activation, **kw)
    fn = dwsep.reference.depthwise_conv_bn_act
    if op == "pointwise":
        fn = dwsep.reference.pointwise_conv_bn_act
    ref = fn(
        x.double(),
        weight.double(),
        **{k: v.double() for k, v in bn.items()},
        training=training,
        activation=activation,
        **kw,
    )
    nan = torch.isnan(ref)
    assert nan.any()
    assert torch.equal(torch.isnan(y), nan), (
        f"{backend}: NaN pattern differs ({int(torch.isnan(y).sum())} NaN vs "
        f"{int(nan.sum())} in the reference)"
    )
    torch.testing.assert_close(y[~nan].double(), ref[~nan], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_relu6_both_kinks(op, backend, device, dtype, layout, training):
    """Outputs spread over both kinks of ReLU6 (the other tests' O(1) outputs seldom reach 6):
    the clamp at 6 in the forward, and its zero gradient, on every path (eval without autograd
    runs the inference kernels; with it, the training-capable ones), both strides."""
    shape, extra, kw = OPS[op]
    for variant, grads in itertools.product(({}, kw) if kw else ({},), (False, True)):
        # not vacuous: a fair share of the pre-activations beyond each kink
        x, weight, bn = make_inputs(op, shape, torch.float64, "cpu", wide=True, **extra)
        pre, _ = reference_f64(op, x, weight, bn, training=training, activation=None, **variant)
        above, below = (pre > 6).double().mean().item(), (pre < 0).double().mean().item()
        assert above > 0.08 and below > 0.2, (above, below)
        run_and_compare(
            op,
            backend,
            device,
            dtype,
            shape,
            layout=layout,
            training=training,
            grads=grads,
            wide=True,
            **extra,
            **variant,
        )


GPU_LARGE = {
    # op: [(x shape, make_inputs extras, op kwargs)]: planes and channel counts past one tile
    # or block of the GPU kernels in every dimension, with ragged remainders
    "depthwise": [((2, 72, 70, 67), {}, {"stride": 1}), ((2, 72, 70, 67), {}, {"stride": 2})],
    "pointwise": [((2, 136, 40, 37), {"cout": 264}, {})],
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    ("backend", "device"), [p for p in backend_params() if p.values[1] == "cuda"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gpu_many_tiles(op, backend, device, dtype, layout, training):
    """The GPU kernels over many tiles and blocks (the other tests' shapes fit in one or two):
    forward, statistics and every gradient, outputs across both kinks of ReLU6."""
    for shape, extra, kw in GPU_LARGE[op]:
        run_and_compare(
            op,
            backend,
            device,
            dtype,
            shape,
            layout=layout,
            training=training,
            wide=True,
            **extra,
            **kw,
        )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gpu_tensors_on_a_device_that_is_not_current(op, backend, training):
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1 (the CUDA glue
    takes a device guard; Triton launches on the current device unless told)."""
    if backend not in dwsep.available_backends("cuda:1"):
        pytest.skip(f"backend {backend} unavailable")
    shape, extra, _ = OPS[op]
    with torch.cuda.device(0):
        run_and_compare(op, backend, "cuda:1", torch.float32, shape, training=training, **extra)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic(op, backend, device, layout):
    shape, extra, kw = OPS[op]

    def run():
        x, weight, bn = make_inputs(op, (3, 10, 15, 11), torch.float32, device, seed=7, **extra)
        x = to_layout(x, layout)
        for t in leaves(x, weight, bn):
            t.requires_grad_()
        y = call(op, backend, x, weight, bn, training=True)
        y.backward(torch.cos(torch.arange(y.numel(), device=device).view_as(y).float()))
        return [
            y,
            x.grad,
            weight.grad,
            bn["bn_weight"].grad,
            bn["bn_bias"].grad,
            bn["running_mean"],
            bn["running_var"],
        ]

    for ta, tb in zip(run(), run()):
        assert torch.equal(ta, tb), "two identical runs differ bitwise"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("variant", ["plain", "strided"])
def test_gradcheck_float64(op, backend, device, training, variant):
    _, extra, kw = OPS[op]
    kw = kw if variant == "strided" else {}
    x, weight, bn = make_inputs(
        op,
        (2, 3, 5, 4),
        torch.float64,
        device,
        seed=3,
        **({"cout": 4} if op == "pointwise" else {}),
    )
    inputs = [t.requires_grad_() for t in leaves(x, weight, bn)]
    rm, rv = (None, None) if training else (bn["running_mean"], bn["running_var"])

    def fn(x, w, g, b):
        stats = {"running_mean": rm, "running_var": rv, "bn_weight": g, "bn_bias": b}
        return call(op, backend, x, w, stats, training=training, activation="relu6", **kw)

    # The Triton interpreter takes ~0.3 s a call and the full Jacobian of these inputs hundreds of
    # calls: 70-430 s per case on the 2-core CI host, ~20 min over the 8. There gradcheck runs in
    # fast mode (u^T J v for random u, v, in float64): it catches gross errors only, as its
    # tolerance grows with u and v (grad_x scaled by 1 + 1e-4 in the Triton dx kernel passed it
    # in train mode). Such errors are caught by test_matches_reference, which compares every
    # float64 gradient of every backend with the float64 oracle at 1e-10 relative (the same planted
    # error failed all its Triton float64 training cases). The full Jacobian is checked on the cpu
    # backend here and for triton on a GPU.
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_double_backward_raises(op, backend, device):
    """The kernel backends' backward has no derivative of its own: a first-order gradient with
    create_graph=True is right, and differentiating it again raises instead of returning zeros
    (before, PyTorch's autograd fallback warned and the second derivative came out 0)."""
    shape, extra, kw = OPS[op]
    x, weight, bn = make_inputs(op, shape, torch.float64, device, **extra)
    for t in leaves(x, weight, bn):
        t.requires_grad_()
    y = call(op, backend, x, weight, bn, training=True, **kw)
    (g1,) = torch.autograd.grad((y**2).sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    assert torch.equal(g1, g2)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g2.sum().backward()
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g2.sum(), weight)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "device"), backend_params(include_torch=True))
def test_torch_compile_fullgraph(op, backend, device):
    torch._dynamo.reset()
    shape, extra, kw = OPS[op]
    x, weight, bn = make_inputs(op, (2, 6, 7, 5), torch.float32, device, **extra)
    x.requires_grad_()

    def f(x, w, rm, rv, g, b):
        stats = {"running_mean": rm, "running_var": rv, "bn_weight": g, "bn_bias": b}
        return call(op, backend, x, w, stats, training=True, **kw)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    bn_c = {k: v.clone() for k, v in bn.items()}
    y = compiled(x, weight, *bn_c.values())
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_eager = f(x, weight, *bn.values())
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(bn_c["running_mean"], bn["running_mean"])
    torch.testing.assert_close(bn_c["running_var"], bn["running_var"])
