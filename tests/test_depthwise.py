"""Fused depthwise 3x3 conv + BN + activation: every kernel backend against the float64
reference (outputs, running stats, every gradient), gradcheck, opcheck, poisoned outputs,
determinism and the edge cases."""

from __future__ import annotations

import pytest
import torch
from op_harness import (
    LAYOUTS,
    OpRecorder,
    backend_dtype_params,
    backend_params,
    make_inputs,
    pinned_triton_configs,
    run_and_compare,
    to_layout,
)

import dwsep
from dwsep._debug import poison_outputs

# Odd spatial sizes (1, 2, 7, 13, 17), non-square, C not a multiple of 8, N of 1 and 2.
SHAPES = [(2, 3, 7, 7), (1, 13, 17, 13), (2, 8, 2, 7), (1, 40, 13, 1), (2, 1, 1, 2)]
ACTS = ["relu6", "relu", None]


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_matches_reference(backend, device, dtype, training, layout, stride):
    for i, shape in enumerate(SHAPES):
        run_and_compare(
            "depthwise",
            backend,
            device,
            dtype,
            shape,
            stride=stride,
            layout=layout,
            training=training,
            activation=ACTS[i % 3],
            seed=i,
        )


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_no_affine_and_bn_in_x_dtype(backend, device, training):
    dtype = torch.float32
    run_and_compare(
        "depthwise", backend, device, dtype, (2, 5, 6, 5), stride=2, training=training, affine=False
    )
    # BN tensors in x's own dtype (fp16 x with fp16 BN tensors), as F.batch_norm allows
    x, weight, bn = make_inputs(
        "depthwise", (2, 5, 6, 5), torch.float16, device, bn_dtype=torch.float16
    )
    bn64 = {k: v.double() for k, v in bn.items()}  # before the op updates the running stats
    with dwsep.use_backend(backend):
        y = dwsep.depthwise_conv_bn_act(x, weight, **bn, training=training)
    ref = dwsep.reference.depthwise_conv_bn_act(
        x.double(), weight.double(), **bn64, training=training
    )
    dwsep.testing.assert_close(y, ref, 2e-3, "fp16 BN tensors")


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_non_contiguous_inputs(backend, device):
    # sliced along W and permuted views: the op must give the reference result
    run_and_compare(
        "depthwise",
        backend,
        device,
        torch.float32,
        (2, 6, 9, 14),
        stride=2,
        training=True,
        x_transform=lambda t: t[:, :, :, ::2],
    )
    run_and_compare(
        "depthwise",
        backend,
        device,
        torch.float32,
        (2, 6, 7, 8),
        stride=1,
        training=False,
        x_transform=lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
    )
    run_and_compare(
        "depthwise",
        backend,
        device,
        torch.float32,
        (2, 6, 7, 8),
        stride=1,
        layout="channels_last",
        training=False,
        x_transform=lambda t: t[:, :, 1:6, ::2],
    )


def _cpu_shapes_train_and_eval(shapes, dtype, stride, layout, seed=0):
    """Each shape through the C++ CPU kernels in eval and in training (forward, running stats,
    every gradient), with pre-activations across both kinks of ReLU6 and the activation
    cycling through ACTS; kernel outputs are pre-filled with NaN, so an element a kernel skips
    fails the comparison."""
    if "cpu" not in dwsep.available_backends():
        pytest.skip("the C++ CPU kernels are not built")
    with poison_outputs():
        for i, shape in enumerate(shapes):
            for training in (False, True):
                run_and_compare(
                    "depthwise",
                    "cpu",
                    "cpu",
                    dtype,
                    shape,
                    stride=stride,
                    layout=layout,
                    training=training,
                    activation=ACTS[i % 3],
                    seed=seed + i,
                    wide=True,
                )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_wide_planes_and_column_tiles(dtype, stride, layout):
    # The shapes above stay on one code path of the C++ kernels: NCHW planes at most 64 wide
    # (the flat-plane path) and channels_last rows within one column tile. Here planes wider
    # than 64 (the row path, stride 2 through its even/odd split) and channels_last rows split
    # into several column tiles (with many channels a tile is a few pixels: input columns are
    # converted tile by tile; the backward's tiles are 8x wider, 21 pixels at 520 channels and
    # stride 1, 10 at stride 2), forward, statistics and every gradient.
    _cpu_shapes_train_and_eval(
        [(1, 3, 5, 131), (2, 130, 5, 23), (1, 520, 3, 11), (1, 520, 3, 50)], dtype, stride, layout
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_channels_last_rows_in_place(dtype, stride):
    # At stride 1 the C++ channels_last forward and statistics read fp32/fp64 rows at least
    # 28 wide in place (no ring copy) when C is a multiple of the vector (8 fp32 lanes, 4
    # fp64): interior outputs from x itself, the first and last columns with their outside
    # taps skipped, rows above and below the image as zeros. C = 12 takes this path in fp64
    # only. Stride 2 (the ring) runs the same shapes as a control.
    shapes = [(2, 16, 5, 28), (1, 8, 1, 29), (2, 24, 3, 33), (1, 12, 4, 30), (1, 128, 2, 29)]
    _cpu_shapes_train_and_eval(shapes, dtype, stride, "channels_last", seed=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_channels_last_forward_stores(dtype, stride):
    # How the C++ channels_last forward stores y from the row ring (planes under 28 wide, or
    # stride 2), fp32/fp64 with C a multiple of the vector: pixel-major straight to y when the
    # channel blocks' constants (11 vectors per block) fit in 24 KB (C = 16, 136: fp32 and
    # fp64), block-major straight to y beyond that (C = 576: both; C = 296: fp64 only); a ragged
    # C (13) goes through the staging tile. Several column tiles per row (W = 23 and up).
    shapes = [(2, 16, 5, 23), (1, 136, 4, 25), (1, 576, 3, 23), (1, 296, 3, 26), (2, 13, 4, 27)]
    _cpu_shapes_train_and_eval(shapes, dtype, stride, "channels_last", seed=30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_channels_last_backward_bands(dtype, stride):
    # The C++ channels_last backward cuts each image's output rows into bands of at least 32
    # rows (more when Wo*C is small) and recomputes the g_conv rows just outside a band (above
    # and below at stride 1, below at stride 2) instead of storing g_conv. These shapes give two
    # or three bands per image: in place (fp32/fp64, C a multiple of the vector, W >= 28, at
    # stride 1) and through the ring (C = 130, bf16, stride 2), odd and even heights.
    shapes = {
        1: [(2, 64, 37, 29), (1, 130, 40, 30), (1, 64, 70, 28)],
        2: [(1, 128, 67, 29), (1, 130, 69, 30), (2, 128, 66, 29)],
    }[stride]
    _cpu_shapes_train_and_eval(shapes, dtype, stride, "channels_last", seed=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_plane_widths(dtype, stride):
    # The C++ NCHW small-plane path copies rows narrower than a vector as whole vectors read
    # from the rows below (element-wise near the plane's end) and clears the junk they leave;
    # rows of a vector or more end with an overlapping vector. Every width from 1 to 19 (both
    # sides of 4 and 8 lanes and 16 and 18), heights down to 1, through forward, statistics
    # and backward.
    if "cpu" not in dwsep.available_backends():
        pytest.skip("the C++ CPU kernels are not built")
    for w in range(1, 20):
        for h in (1, 2, 3, 9):
            run_and_compare(
                "depthwise",
                "cpu",
                "cpu",
                dtype,
                (2, 3, h, w),
                stride=stride,
                training=(w + h) % 2 == 0,
                activation=ACTS[w % 3],
                seed=w * 10 + h,
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_nchw_stride2_plane_groups(dtype):
    # The C++ NCHW fp32 stride-2 forward with outputs at most 16 wide takes eight planes at a
    # time, one per vector lane (8x8 transposes in and out), and sends the planes left over
    # (N*C mod 8) through the one-plane kernel. Lanes run across image boundaries (channel
    # c + 1 wraps to 0 of the next image); rows narrower than 8 are read 8 wide (generic
    # transpose where that would run past the end of x: exactly 8 planes) and stored 8 wide
    # into the next rows, except where that would reach the next plane. Widths 1..33 (outputs
    # 1..17: both sides of 8 and of the 16 limit), heights 1, 2, 9; fp64 as the control.
    if "cpu" not in dwsep.available_backends():
        pytest.skip("the C++ CPU kernels are not built")
    for n, c in ((1, 8), (3, 5), (2, 12)):
        for w in range(1, 34):
            for h in (1, 2, 9):
                run_and_compare(
                    "depthwise",
                    "cpu",
                    "cpu",
                    dtype,
                    (n, c, h, w),
                    stride=2,
                    # (training needs more than one output per channel)
                    training=(w + h + c) % 3 == 0 and n * ((h + 1) // 2) * ((w + 1) // 2) > 1,
                    activation=ACTS[w % 3],
                    seed=w * 10 + h + c,
                )


def _dw_op_args(device, layout, stride, dtype=torch.float32):
    x, weight, bn = make_inputs("depthwise", (2, 5, 7, 6), dtype, device)
    x = to_layout(x, layout)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    C = x.shape[1]
    vec = lambda s: torch.linspace(0.5, 1.5 + s, C, dtype=acc, device=device)  # noqa: E731
    ho, wo = (7 - 1) // stride + 1, (6 - 1) // stride + 1
    y = to_layout(torch.randn(2, C, ho, wo, device=device).to(dtype), layout)
    gy = to_layout(torch.randn(2, C, ho, wo, device=device).to(dtype), layout)
    return {
        "dw_fwd": (x, weight, vec(0), vec(1) - 1, stride, 2),
        "dw_stats": (x, weight, stride),
        "dw_bwd_reduce": (gy, y, x, weight, vec(0), vec(1), stride, 2),
        "dw_bwd": (gy, y, x, weight, vec(0), vec(1), vec(2), stride, 2, True),
    }


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["dw_fwd", "dw_stats", "dw_bwd_reduce", "dw_bwd"])
def test_opcheck(backend, device, layout, op):
    table = dwsep.ops.op_table(backend)
    args = _dw_op_args(device, layout, stride=2)[op]
    torch.library.opcheck(getattr(table, op), args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_dw_fwd_stats(layout, dtype):
    """dwsep::dw_fwd_stats, the CPU training forward's single conv pass: z is the conv (against
    F.conv2d in float64), in x's dtype and layout, and the batch statistics are dw_stats's bit
    for bit, on every path of the kernel: NHWC through the row ring (C = 5, 3, 11, 24, 16 at
    stride 2) and rows read in place (C = 16 and 520, W >= 28; 520 channels over several column
    tiles), NCHW over flat small planes and in row blocks (W > 64, and more than 4096 outputs, so
    several blocks per plane); strides 1 and 2. Then opcheck."""
    reason = dwsep.testing.skip_reason("cpu", "cpu")
    if reason:
        pytest.skip(reason)
    ops = torch.ops.dwsep
    gen = torch.Generator().manual_seed(7)
    shapes = [
        (2, 5, 7, 6), (1, 16, 9, 30), (1, 3, 70, 66), (3, 11, 13, 17), (2, 24, 5, 13),
        (1, 520, 3, 50),
    ]  # fmt: skip
    for shape in shapes:
        C = shape[1]
        x = to_layout(torch.randn(*shape, generator=gen).to(dtype), layout)
        weight = torch.randn(C, 1, 3, 3, generator=gen).to(dtype)
        for stride in (1, 2):
            what = f"{tuple(shape)} s{stride}"
            with poison_outputs():
                z, mean, var = ops.dw_fwd_stats(x, weight, stride)
            ref = torch.nn.functional.conv2d(x.double(), weight.double(), None, stride, 1, 1, C)
            assert z.dtype == dtype and z.shape == ref.shape, what
            assert z.is_contiguous(memory_format=dwsep.ops.memory_format(x)), what
            dwsep.testing.assert_close(z, ref, dwsep.testing.TOLERANCES[dtype], f"z {what}")
            mean2, var2 = ops.dw_stats(x, weight, stride)
            assert torch.equal(mean, mean2) and torch.equal(var, var2), what
            dims = (0, 2, 3)
            dwsep.testing.assert_close(mean, ref.mean(dims), 1e-5, f"mean {what}", scale=1.0)
            dwsep.testing.assert_close(var, ref.var(dims, unbiased=False), 1e-4, f"var {what}")
    if dtype == torch.float32:
        x = to_layout(torch.randn(2, 5, 7, 6, generator=gen), layout)
        args = (x, torch.randn(5, 1, 3, 3, generator=gen), 2)
        torch.library.opcheck(ops.dw_fwd_stats, args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_training_forward_paths(layout, dtype):
    """The cpu backend's depthwise training forward: one conv pass (dw_fwd_stats, then bn_act)
    for fp32/fp64 at stride 2, on planes up to 32x32 and on larger NCHW planes, and on every
    plane when a backward follows (z is kept, and the backward's reduction reads it through
    pw_bwd_reduce instead of convolving x again in dw_bwd_reduce); two passes (dw_stats, then
    dw_fwd) for larger channels_last planes at stride 1 without gradients and for fp16/bf16.
    Each path against the oracle: output, batch and running statistics, every gradient."""
    reason = dwsep.testing.skip_reason("cpu", "cpu")
    if reason:
        pytest.skip(reason)
    cases = [((2, 8, 33, 34), 1), ((2, 16, 9, 30), 1), ((1, 8, 35, 33), 2)]
    for grads in (False, True):
        for i, (shape, stride) in enumerate(cases):
            rec = OpRecorder()
            with rec:
                run_and_compare(
                    "depthwise", "cpu", "cpu", dtype, shape, stride=stride, layout=layout,
                    training=True, activation=ACTS[i % 3], seed=i, wide=True, grads=grads,
                )  # fmt: skip
            one_pass = dtype != torch.bfloat16 and (
                grads or stride == 2 or shape[2] * shape[3] <= 32 * 32 or layout == "contiguous"
            )
            what = (shape, stride, grads)
            assert rec.count("dwsep.dw_fwd_stats.") == (1 if one_pass else 0), what
            assert rec.count("dwsep.dw_stats.") == (0 if one_pass else 1), what
            assert rec.count("dwsep.dw_fwd.") == (0 if one_pass else 1), what
            if grads:
                assert rec.count("dwsep.pw_bwd_reduce.") == (1 if one_pass else 0), what
                assert rec.count("dwsep.dw_bwd_reduce.") == (0 if one_pass else 1), what
                assert rec.count("dwsep.dw_bwd.") == 1, what


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(("backend", "device"), [p for p in backend_params() if "cuda" in p.id])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_past_2_pow_31_elements(backend, device, layout):
    """64-bit indexing: an input of more than 2^31 elements gives the right answer at its far
    end (checked against the reference on the last rows only)."""
    C, H, W = 8, 16386, 16386  # 8 * 16386^2 = 2.148e9 > 2^31
    try:
        x = torch.randn(1, C, H, W, device=device, dtype=torch.float16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x = to_layout(x, layout)
    w = torch.randn(C, 1, 3, 3, device=device, dtype=torch.float16)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    with dwsep.use_backend(backend):
        y = dwsep.depthwise_conv_bn_act(x, w, rm, rv, activation=None)
    tail = x[:, :, -5:].double()
    ref = dwsep.reference.depthwise_conv_bn_act(
        tail, w.double(), rm.double(), rv.double(), activation=None
    )
    dwsep.testing.assert_close(y[:, :, -4:], ref[:, :, -4:], 2e-3, "tail rows")


@pytest.mark.parametrize(("backend", "device"), [p for p in backend_params() if "triton" in p.id])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tap_acc", [True, False], ids=["tap-accumulators", "tile-reductions"])
def test_triton_weight_grad_variants(backend, device, layout, tap_acc):
    """Both ways the Triton g_conv kernel sums the weight-gradient products over pixels (the
    autotuner picks one per shape on a GPU; the interpreter has one config) give every gradient,
    in training and eval, with the z term (eval with grad of the BN affine) and without."""
    import triton

    from kernels_triton import depthwise_bwd

    cfg = triton.Config({"BLOCK_P": 32, "BLOCK_C": 16, "TAP_ACC": tap_acc}, num_warps=4)
    with pinned_triton_configs({depthwise_bwd._dw_bwd_gconv_kernel: cfg}):
        for training, stride, shape in [(True, 1, (2, 40, 13, 11)), (False, 2, (1, 24, 9, 14))]:
            run_and_compare(
                "depthwise",
                backend,
                device,
                torch.float32,
                shape,
                stride=stride,
                layout=layout,
                training=training,
            )


@pytest.mark.parametrize(("backend", "device"), [p for p in backend_params() if "triton" in p.id])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lanes", [True, False], ids=["lane-welford", "tile-chan"])
def test_triton_batch_statistics_variants(backend, device, layout, lanes):
    """Both ways the Triton statistics kernel merges a chunk's pixels (the autotuner picks one
    per shape on a GPU; the interpreter has one config) give the batch statistics, the running
    statistics and every gradient, also for inputs whose mean (300) dwarfs their spread (1),
    where a plain sum of squares in fp32 would lose the variance."""
    import triton

    from kernels_triton import depthwise_fwd

    cfg = triton.Config({"BLOCK_P": 32, "BLOCK_C": 16, "LANE_STATS": lanes}, num_warps=4)
    with pinned_triton_configs({depthwise_fwd._dw_stats_kernel: cfg}):
        for stride, shape, shift in [(1, (2, 40, 13, 11), 0.0), (2, (1, 24, 17, 14), 300.0)]:
            run_and_compare(
                "depthwise",
                backend,
                device,
                torch.float32,
                shape,
                stride=stride,
                layout=layout,
                training=True,
                x_transform=(lambda t, s=shift: (t + s).detach().requires_grad_()),
            )
