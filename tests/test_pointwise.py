"""Fused pointwise 1x1 conv + BN + activation: every kernel backend against the float64
reference (outputs, running stats, every gradient) over ragged channel counts, opcheck, TF32."""

from __future__ import annotations

import pytest
import torch
from op_harness import LAYOUTS, backend_dtype_params, backend_params, run_and_compare, to_layout

import dwsep

# (N, Cin, H, W, Cout): Cin or Cout of 1, odd sizes, channels not a multiple of 8.
SHAPES = [(2, 3, 7, 7, 8), (1, 13, 5, 3, 40), (2, 8, 1, 1, 1), (2, 1, 2, 7, 13), (1, 40, 3, 5, 3)]
ACTS = ["relu6", "relu", None]


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(backend, device, dtype, training, layout):
    for i, (n, cin, h, w, cout) in enumerate(SHAPES):
        run_and_compare(
            "pointwise",
            backend,
            device,
            dtype,
            (n, cin, h, w),
            cout=cout,
            layout=layout,
            training=training,
            activation=ACTS[i % 3],
            seed=i,
        )


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_inference_without_grad_and_no_affine(backend, device, training):
    # no input requires grad: the single fused GEMM + epilogue kernel (pw_fwd) runs in eval
    run_and_compare(
        "pointwise",
        backend,
        device,
        torch.float32,
        (2, 24, 5, 6),
        cout=17,
        training=training,
        grads=False,
    )
    run_and_compare(
        "pointwise",
        backend,
        device,
        torch.float32,
        (2, 24, 5, 6),
        cout=17,
        layout="channels_last",
        training=training,
        grads=False,
        affine=False,
    )


@pytest.mark.parametrize("mkldnn", [True, False], ids=["onednn", "no-onednn"])
@pytest.mark.parametrize(
    ("layout", "shape", "cout"),
    [
        ("contiguous", (2, 12, 5, 6), 19),
        ("contiguous", (2, 12, 28, 29), 19),
        ("channels_last", (2, 12, 5, 6), 19),
        ("channels_last", (2, 12, 15, 14), 19),
        ("channels_last", (1, 600, 30, 30), 19),
        ("channels_last", (1, 300, 7, 7), 301),
    ],
)
def test_cpu_forward_paths(mkldnn, layout, shape, cout):
    """The CPU pw_fwd and pw_fwd_stats have three fp32 paths: oneDNN's convolution (on BN-folded
    weights in inference; z, then the per-block statistics of z, in training) for NCHW planes
    under 28x28 and channels_last inputs with planes over 14x14 and over 512K elements (here
    600x30x30); one at::mm over the (N*H*W, Cin) matrix, then the shift and activation (or the
    statistics) in one pass, for the other channels_last inputs (5x6: a small plane; 15x14: a
    small input; 7x7 with 301 output channels: fewer than 64 rows, so the output channels are
    split between two threads, unevenly); and block-wise sgemm + fused epilogue (NCHW planes
    from 28x28, and whenever oneDNN is disabled). Both against the oracle, every activation,
    inference and training (batch statistics, running statistics, every gradient), outputs on
    both sides of ReLU6's kinks. Inference also under torch.inference_mode, which (like grad
    mode) is thread-local: the split's worker threads do not see it."""
    reason = dwsep.testing.skip_reason("cpu", "cpu")
    if reason:
        pytest.skip(reason)
    saved, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = mkldnn
    torch.set_num_threads(2)  # the split path needs two threads
    try:
        for training, inference_mode in ((False, False), (False, True), (True, False)):
            for i, act in enumerate(ACTS):
                with torch.inference_mode(inference_mode):
                    run_and_compare(
                        "pointwise", "cpu", "cpu", torch.float32, shape, cout=cout, layout=layout,
                        training=training, activation=act, grads=training, seed=i, wide=True,
                    )  # fmt: skip
    finally:
        torch.backends.mkldnn.enabled = saved
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_larger_than_one_tile(backend, device):
    # M, K and N past common tile sizes (128) with ragged remainders
    if backend == "triton" and device == "cpu":
        shape, cout = (1, 70, 9, 15), 33
    else:
        shape, cout = (2, 136, 13, 11), 130
    for layout in LAYOUTS:
        run_and_compare(
            "pointwise",
            backend,
            device,
            torch.float32,
            shape,
            cout=cout,
            layout=layout,
            training=True,
        )


@pytest.mark.parametrize(("backend", "device"), [p for p in backend_params() if "triton" in p.id])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("g_mode", ["materialize", "fused"])
def test_triton_bwd_g_modes(backend, device, layout, g_mode, monkeypatch):
    """Both ways the Triton backward feeds its GEMMs (g_conv written once, or rebuilt from grad_y
    and z inside each GEMM; DWSEP_TRITON_PW_BWD) give every gradient, in training and eval,
    with every activation and ragged channel counts."""
    monkeypatch.setenv("DWSEP_TRITON_PW_BWD", g_mode)
    cases = [(True, "relu6", (2, 13, 5, 3), 40), (False, "relu", (1, 40, 3, 5), 3)]
    cases.append((True, None, (2, 8, 4, 1), 17))
    for i, (training, act, shape, cout) in enumerate(cases):
        run_and_compare(
            "pointwise",
            backend,
            device,
            torch.float32,
            shape,
            cout=cout,
            layout=layout,
            training=training,
            activation=act,
            seed=i,
        )


def test_triton_bwd_g_mode_rejects_unknown(monkeypatch):
    pytest.importorskip("triton")
    from kernels_triton.pointwise_bwd import pw_bwd_mode

    assert pw_bwd_mode("fused") == "fused"
    monkeypatch.setenv("DWSEP_TRITON_PW_BWD", "fast")
    with pytest.raises(ValueError, match=r"DWSEP_TRITON_PW_BWD.*'materialize'.*got 'fast'"):
        pw_bwd_mode()
    monkeypatch.delenv("DWSEP_TRITON_PW_BWD")
    assert pw_bwd_mode() == "materialize"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_nchw_pixel_blocks(dtype):
    """NCHW images split into several pixel blocks of the CPU GEMM + epilogue (blocks of ~64K
    elements on the wider side: 256 pixels at 256 channels; 930 pixels = 3 full blocks + a ragged
    one), the forward, the statistics merged across blocks, and every gradient."""
    if "cpu" not in dwsep.available_backends("cpu"):
        pytest.skip("the compiled cpu backend is not available")
    for training, act in [(True, "relu6"), (False, "relu6"), (False, None)]:
        run_and_compare(
            "pointwise",
            "cpu",
            "cpu",
            dtype,
            (2, 256, 30, 31),
            cout=200,
            training=training,
            activation=act,
            wide=True,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("schedule", ["auto", "blocks", "chunks"])
def test_cpu_bwd_schedules(dtype, schedule, monkeypatch):
    """Both schedules of the CPU pointwise backward (DWSEP_CPU_PW_BWD) give every gradient:
    channels_last with Cin * Cout = 256^2, where "auto" takes the chunks, over 4608 rows (two
    4096-row chunks, the second ragged), in training and eval, each compared with the float64
    oracle; and the two schedules agree."""
    if "cpu" not in dwsep.available_backends("cpu"):
        pytest.skip("the compiled cpu backend is not available")
    monkeypatch.setenv("DWSEP_CPU_PW_BWD", schedule)
    for training, act in [(True, "relu6"), (False, None)]:
        run_and_compare(
            "pointwise",
            "cpu",
            "cpu",
            dtype,
            (2, 256, 48, 48),
            cout=256,
            layout="channels_last",
            training=training,
            activation=act,
        )
    if schedule == "auto":
        table = dwsep.ops.op_table("cpu")
        g = torch.Generator().manual_seed(0)
        n, c, h, w = 2, 256, 48, 48
        cl = torch.channels_last
        x, z, gy = (
            torch.randn(n, c, h, w, generator=g, dtype=dtype).contiguous(memory_format=cl)
            for _ in range(3)
        )
        weight = (torch.randn(c, c, generator=g) / 16).to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        vec = [torch.rand(c, generator=g, dtype=acc) + 0.5 for _ in range(5)]
        out = {}
        for mode in ("blocks", "chunks"):
            monkeypatch.setenv("DWSEP_CPU_PW_BWD", mode)
            out[mode] = table.pw_bwd(gy, z, x, weight, *vec, 2)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
        for a, b in zip(out["blocks"], out["chunks"]):
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * b.abs().max())


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_non_contiguous_inputs(backend, device):
    run_and_compare(
        "pointwise",
        backend,
        device,
        torch.float32,
        (2, 6, 9, 14),
        cout=5,
        training=True,
        x_transform=lambda t: t[:, :, :, ::2],
    )
    run_and_compare(
        "pointwise",
        backend,
        device,
        torch.float32,
        (2, 6, 7, 8),
        cout=5,
        layout="channels_last",
        x_transform=lambda t: t[:, :, 1:6, ::2],
    )


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "device"), [p for p in backend_params() if "cuda" in p.id])
@pytest.mark.parametrize("switch", ["conv", "matmul", "none"])
def test_tf32_follows_the_conv_switch(backend, device, switch):
    """fp32 uses TF32 exactly when PyTorch allows it for convolutions (cuDNN's switch, on by
    default, as for nn.Conv2d); the matmul switch alone leaves it exact."""
    torch.backends.cudnn.allow_tf32 = switch == "conv"
    torch.backends.cuda.matmul.allow_tf32 = switch == "matmul"
    x = torch.randn(4, 64, 14, 14, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(96, 64, 1, 1, device=device) / 8
    rm, rv = torch.zeros(96, device=device), torch.ones(96, device=device)
    with dwsep.use_backend(backend):
        y = dwsep.pointwise_conv_bn_act(x, w, rm, rv, activation=None)
    ref = dwsep.reference.pointwise_conv_bn_act(
        x.double(), w.double(), rm.double(), rv.double(), activation=None
    )
    err = ((y.double() - ref).norm() / ref.norm()).item()
    if switch == "conv":
        # TF32 keeps 10 mantissa bits: about 1e-4 relative over K = 64, never fp32's 1e-7.
        assert 1e-5 < err < dwsep.testing.TF32_TOLERANCE, err
    else:
        assert err < 1e-5, err


def _pw_op_args(device, layout, dtype=torch.float32):
    x = to_layout(torch.randn(2, 5, 4, 3, device=device).to(dtype), layout)
    weight = torch.randn(7, 5, device=device).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vec = lambda s: torch.linspace(0.5, 1.5 + s, 7, dtype=acc, device=device)  # noqa: E731
    z = to_layout(torch.randn(2, 7, 4, 3, device=device).to(dtype), layout)
    gy = to_layout(torch.randn(2, 7, 4, 3, device=device).to(dtype), layout)
    return {
        "pw_fwd": (x, weight, vec(0), vec(1) - 1, 2),
        "pw_fwd_stats": (x, weight),
        "bn_act": (z, vec(0), vec(1), 2),
        "pw_bwd_reduce": (gy, z, vec(0), vec(1), vec(2), vec(3), 2),
        "pw_bwd": (gy, z, x, weight, vec(0), vec(1), vec(2), vec(3), vec(4), 2),
    }


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["pw_fwd", "pw_fwd_stats", "bn_act", "pw_bwd_reduce", "pw_bwd"])
def test_opcheck(backend, device, layout, op):
    table = dwsep.ops.op_table(backend)
    torch.library.opcheck(getattr(table, op), _pw_op_args(device, layout)[op])


def _offset_copy(t: torch.Tensor, elems: int = 1) -> torch.Tensor:
    """A dense copy of t with t's strides whose data starts `elems` elements into its storage:
    for 16-bit and fp32 tensors a base pointer that is not 16-byte aligned."""
    buf = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    out = buf[elems:].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset"])
def test_unaligned_planes_and_pointers(backend, device, dtype, offset):
    """NCHW planes of 49 and 196 pixels (rows not a multiple of 16 bytes: the CUDA GEMM loads
    them with 8- or 4-byte copies, or element-wise for 16-bit types) and x at an odd element
    offset (base pointer not 16-byte aligned), several k-tiles and images; channels_last too."""
    transform = (lambda t: _offset_copy(t, offset)) if offset else None
    for i, (shape, cout) in enumerate([((3, 72, 7, 7), 40), ((2, 40, 14, 14), 72)]):
        for layout in LAYOUTS:
            run_and_compare(
                "pointwise",
                backend,
                device,
                dtype,
                shape,
                cout=cout,
                layout=layout,
                training=True,
                activation=ACTS[i % 3],
                seed=i,
                x_transform=transform,
            )


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_by_one_images(backend, device, dtype, layout):
    """1x1 images: x is dense in both formats (the CUDA ops run them as NHWC, one GEMM over the
    batch) and the outputs keep x's format; a batch spanning more than one GEMM tile."""
    run_and_compare(
        "pointwise", backend, device, dtype, (150, 40, 1, 1), cout=72, layout=layout, training=True
    )


@pytest.mark.parametrize(
    ("backend", "device"), [p for p in backend_params() if "triton" not in p.id]
)
def test_pw_bwd_layout_from_z_or_x(backend, device):
    """pw_bwd takes channels_last from z or from x, whichever is strictly channels_last (x with
    one channel is dense in both formats); the result matches the all-NCHW call and grad_x keeps
    x's format."""
    torch.manual_seed(0)
    dt = torch.float64
    n, cin, cout, h, w = 2, 1, 5, 3, 4
    x = torch.randn(n, cin, h, w, dtype=dt, device=device)  # dense in both formats
    weight = torch.randn(cout, cin, dtype=dt, device=device)
    z = torch.randn(n, cout, h, w, dtype=dt, device=device)
    gy = torch.randn(n, cout, h, w, dtype=dt, device=device)
    vec = lambda s: torch.linspace(0.5, 1.5 + s, cout, dtype=dt, device=device)  # noqa: E731
    rest = (vec(0), vec(1) - 1, vec(2), vec(3), vec(4), 2)
    table = dwsep.ops.op_table(backend)
    gx_ref, gw_ref = table.pw_bwd(gy, z, x, weight, *rest)
    cl = torch.channels_last
    gx, gw = table.pw_bwd(
        gy.contiguous(memory_format=cl), z.contiguous(memory_format=cl), x, weight, *rest
    )
    assert gx.is_contiguous()  # x's own format
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)
