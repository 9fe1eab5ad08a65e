"""Host runs of CUDA kernel bodies without a GPU: the channels_last depthwise kernels' thread
bodies, and the pointwise GEMM's operand tile loader and epilogue packing (the last tests).

``dw_fwd_nhwc_thread`` and ``dw_stats_nhwc_thread`` (csrc/cuda/depthwise_fwd_nhwc.cuh) are the
whole work of one thread of their kernels and touch no other thread's data, so running them for
every thread id of a grid, one after another on the CPU, computes what the GPU computes.
tests/cuda_host/dw_nhwc_host.cu does that, built with the host compiler under AddressSanitizer
and UBSan (buffers at their exact sizes: any out-of-bounds access stops the run), its output
filled with NaN first (a value it does not write fails the comparison). This checks the kernel's indexing, work split and
arithmetic on every machine with the CUDA headers; it does not check anything only a GPU has
(timing, memory model, the compiled SASS). The CUDA op tests cover those on a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from dwsep.testing import GRAD_TOLERANCES, TOLERANCES, assert_close

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cuda_host" / "dw_nhwc_host.cu"
ACC = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}
ACT_CODES = {None: 0, "relu": 1, "relu6": 2}


def _cuda_include() -> Optional[Path]:
    """A directory with cuda_bf16.h: $CUDA_HOME, /usr/local/cuda, nvcc's toolkit, or the CUDA
    runtime headers of the pip package beside torch."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    cands = [Path(r) / "include" for r in roots if r]
    site = Path(torch.__file__).resolve().parents[1] / "nvidia"
    cands += sorted(site.glob("*/include")) + sorted(site.glob("cuda_runtime/include"))
    for d in cands:
        if (d / "cuda_bf16.h").is_file() and (d / "cuda_runtime.h").is_file():
            return d
    return None


@pytest.fixture(scope="module")
def host_binary(tmp_path_factory) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip(f"needs a C++ compiler ({cxx}) and the CUDA headers ({inc})")
    out = tmp_path_factory.mktemp("cuda_host") / "dw_nhwc_host"
    cmd = [
        cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-x", "c++",
        f"-I{ROOT / 'csrc'}", f"-I{inc}", str(SOURCE), "-o", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and not _sanitizers_work(cxx, out.parent):
        pytest.skip(f"{cxx} cannot build with -fsanitize=address,undefined here")
    assert res.returncode == 0, f"host build failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return out


def _sanitizers_work(cxx: str, tmp: Path) -> bool:
    """Whether the compiler links a trivial program with the sanitizers (their runtimes are a
    separate package on some systems): a failure of the real build is then the code's."""
    src = tmp / "probe.cc"
    src.write_text("int main() { return 0; }\n")
    cmd = [cxx, "-fsanitize=address,undefined", str(src), "-o", str(tmp / "probe")]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def run_host(binary: Path, workdir: Path, op, x, w, stride, act, vec, nthreads, **inputs):
    """The emulated launch's output: y (an NCHW view of the NHWC result) for ``op="fwd"``; the
    [chunks, C, 3] (``"stats"``) or [chunks, C, 2] (``"reduce"``) workspace; (grad_x, the
    [chunks, C, 9] weight-gradient partials) for ``"bwd"`` / ``"bwd_noz"``. ``inputs``: the op's
    other tensors by file name (scale, shift; grad_y, y_saved, mean, invstd, k, b, c); 4-D ones
    are written in NHWC order."""
    n, c, h, wd = x.shape
    for name, t in dict(inputs, x=x, w=w.reshape(c, 9)).items():
        (workdir / f"{name}.bin").write_bytes(_raw(t.permute(0, 2, 3, 1) if t.dim() == 4 else t))
    dtype = str(x.dtype).removeprefix("torch.")
    vec_arg = 0 if vec else 1
    args = [binary, op, workdir, dtype, n, c, h, wd, stride, ACT_CODES[act], vec_arg, nthreads]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0")
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"{args[1:]}: exit {res.returncode}\n{res.stderr[-4000:]}"

    def read(name, dtype):
        raw = bytearray((workdir / name).read_bytes())
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)

    if op in ("stats", "reduce"):
        return read("ws.bin", ACC[x.dtype]).reshape(-1, c, 3 if op == "stats" else 2)
    if op == "fwd":
        ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
        return read("y.bin", x.dtype).reshape(n, ho, wo, c).permute(0, 3, 1, 2)
    grad_x = read("y.bin", x.dtype).reshape(n, h, wd, c).permute(0, 3, 1, 2)
    return grad_x, read("ws.bin", ACC[x.dtype]).reshape(-1, c, 9)


def conv_f64(x, w, stride):
    return F.conv2d(x.double(), w.double(), None, stride, 1, 1, x.shape[1])


def reference(x, w, scale, shift, stride, act):
    z = conv_f64(x, w, stride)
    y = z * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if act == "relu":
        y = y.clamp_min(0)
    elif act == "relu6":
        y = y.clamp(0, 6)
    return y


# (N, C, H, W): odd sizes, 1x1 and 2x2 planes, C not a multiple of any vector width, widths not
# a multiple of the strip width (8 at stride 1, 4 at stride 2).
SHAPES = [(2, 16, 7, 9), (1, 8, 1, 1), (1, 24, 2, 2), (3, 8, 13, 17), (1, 5, 6, 3), (2, 32, 17, 16)]


def inputs(shape, dtype, seed):
    n, c, h, wd = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, wd, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64) / 3).to(dtype)
    scale = (torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.5).to(ACC[dtype])
    shift = (torch.randn(c, generator=g, dtype=torch.float64) + 1).to(ACC[dtype])
    return x, w, scale, shift


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_dw_fwd_nhwc_thread_matches_reference(host_binary, tmp_path, dtype, stride):
    vec_width = 16 // torch.empty(0, dtype=dtype).element_size()
    acts = list(ACT_CODES)
    runs = 0
    for i, (n, c, h, wd) in enumerate(SHAPES):
        x, w, scale, shift = inputs((n, c, h, wd), dtype, 1000 * i + stride)
        act = acts[i % len(acts)]
        ref = reference(x, w, scale, shift, stride, act)
        tws = 8 if stride == 1 else 4
        ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
        items = n * ho * ((wo + tws - 1) // tws)
        for vec in [True, False] if c % vec_width == 0 else [False]:
            cg = c // vec_width if vec else c
            # One worker per channel vector (the least the launcher gives), a thread count that
            # is not a multiple of C / VEC (idle threads), and more threads than work items.
            for nthreads in sorted({cg, 3 * cg + 1, 2 * cg + cg // 2 + 1, items * cg + 7}):
                y = run_host(
                    host_binary, tmp_path, "fwd", x, w, stride, act, vec, nthreads,
                    scale=scale, shift=shift,
                )  # fmt: skip
                what = f"{tuple(x.shape)} s{stride} {act} vec={vec} nthreads={nthreads}"
                assert_close(y, ref, TOLERANCES[dtype], what)
                runs += 1
    assert runs >= len(SHAPES) + 3


def test_host_run_catches_a_wrong_thread_count(host_binary, tmp_path):
    """The harness refuses fewer threads than channel vectors (the launcher never launches
    that), instead of leaving outputs unwritten."""
    x = torch.randn(1, 16, 4, 4)
    w, s = torch.randn(16, 1, 3, 3), torch.ones(16)
    with pytest.raises(AssertionError, match="exit 2"):
        run_host(host_binary, tmp_path, "fwd", x, w, 1, None, False, 15, scale=s, shift=s)


# Statistics: the small shapes put one pixel item in each chunk (dw_nhwc_chunks aims at
# ~32K (chunk, channel vector) pairs); the wide one (C = 16384) gets several items per chunk.
STATS_SHAPES = SHAPES + [(2, 16384, 9, 9)]


def reduction_runs(c, vec_width):
    """(vector path?, thread count) runs of a reduction: for the small shapes, the vector and
    scalar paths with one thread, a thread count that is not a multiple of the pairs, and more
    threads than pairs; for the wide shape (slow under the sanitizers) one run."""
    if c > 1024:
        return [(True, 257)]
    runs = []
    for vec in [True, False] if c % vec_width == 0 else [False]:
        pairs = c // vec_width if vec else c
        runs += [(vec, t) for t in sorted({1, 257, pairs + 3})]
    return runs


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_dw_stats_nhwc_thread_matches_reference(host_binary, tmp_path, dtype, stride):
    """Per-chunk (count, mean, M2), merged here in float64, against the mean and biased variance
    of the float64 conv; the counts must cover every output exactly once."""
    vec_width = 16 // torch.empty(0, dtype=dtype).element_size()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    multi_item_chunks = False
    for i, (n, c, h, wd) in enumerate(STATS_SHAPES):
        x, w, _, _ = inputs((n, c, h, wd), dtype, 2000 * i + stride)
        z = conv_f64(x, w, stride)
        m = z.shape[0] * z.shape[2] * z.shape[3]
        ref_mean = z.mean(dim=(0, 2, 3))
        ref_var = z.var(dim=(0, 2, 3), unbiased=False)
        for vec, nthreads in reduction_runs(c, vec_width):
            ws = run_host(host_binary, tmp_path, "stats", x, w, stride, None, vec, nthreads)
            ws = ws.double()
            what = f"{tuple(x.shape)} s{stride} vec={vec} nthreads={nthreads}"
            cnt, mean, m2 = ws.unbind(-1)
            assert bool((cnt == cnt[:, :1]).all()), f"{what}: chunk counts differ by channel"
            assert bool((cnt.sum(0) == m).all()), f"{what}: counts {cnt.sum(0)} != {m}"
            multi_item_chunks |= bool(cnt.max() > (8 if stride == 1 else 4))
            mu = (cnt * mean).sum(0) / m
            var = (m2.sum(0) + (cnt * (mean - mu) ** 2).sum(0)) / m
            spread = float(ref_var.max().sqrt())
            assert_close(mu, ref_mean, tol, f"{what} mean", scale=spread)
            assert_close(var, ref_var, tol, f"{what} var")
    assert multi_item_chunks, "no shape put several pixel items in one chunk"


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_dw_bwd_reduce_nhwc_thread_matches_reference(host_binary, tmp_path, dtype, stride):
    """Per-chunk partial sums of g_z and g_z * xhat, added here in float64, against the float64
    sums (g_z = grad_y where act'(y) passes; y the stored forward output, covering both kinks of
    ReLU6)."""
    vec_width = 16 // torch.empty(0, dtype=dtype).element_size()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    acts = list(ACT_CODES)
    for i, (n, c, h, wd) in enumerate(STATS_SHAPES):
        x, w, scale, shift = inputs((n, c, h, wd), dtype, 3000 * i + stride)
        act = acts[i % len(acts)]
        z = conv_f64(x, w, stride)
        y = reference(x, w, scale * 3, shift, stride, act).to(dtype)  # wide: both kinks
        g = torch.Generator().manual_seed(i)
        grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
        mean = z.mean(dim=(0, 2, 3)).to(ACC[dtype])
        invstd = (z.var(dim=(0, 2, 3), unbiased=False) + 1e-5).rsqrt().to(ACC[dtype])
        yd = y.double()
        passes = {None: torch.ones_like(yd, dtype=torch.bool), "relu": yd > 0}
        passes["relu6"] = (yd > 0) & (yd < 6)
        gz = torch.where(passes[act], grad_y.double(), torch.zeros_like(yd))
        xhat = (z - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)
        ref = torch.stack([gz.sum(dim=(0, 2, 3)), (gz * xhat).sum(dim=(0, 2, 3))], dim=-1)
        spread = float(gz.abs().sum(dim=(0, 2, 3)).max())  # sums of mixed signs: vs sum |terms|
        for vec, nthreads in reduction_runs(c, vec_width):
            ws = run_host(
                host_binary, tmp_path, "reduce", x, w, stride, act, vec, nthreads,
                grad_y=grad_y, y_saved=y, mean=mean, invstd=invstd,
            )  # fmt: skip
            what = f"{tuple(x.shape)} s{stride} {act} vec={vec} nthreads={nthreads}"
            assert_close(ws.double().sum(0), ref, tol, what, scale=spread)


def bwd_runs(c, vec_width):
    """(vector path?, thread count) runs of the backward: the dx pass needs a thread per channel
    vector, so at least that many; for the wide shape one run."""
    if c > 1024:
        return [(True, max(257, c // vec_width))]
    runs = []
    for vec in [True, False] if c % vec_width == 0 else [False]:
        cg = c // vec_width if vec else c
        runs += [(vec, t) for t in sorted({cg, max(cg, 257), 3 * cg + 1})]
    return runs


@pytest.mark.parametrize("use_z", [True, False], ids=["z", "noz"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_dw_bwd_nhwc_threads_match_reference(host_binary, tmp_path, dtype, stride, use_z):
    """g_conv = k * g_z + (b * z + c), then grad_x (the transposed conv of g_conv) and the
    weight gradient's per-chunk partials (added here in float64), against autograd through the
    float64 conv."""
    vec_width = 16 // torch.empty(0, dtype=dtype).element_size()
    vec_width = min(vec_width, 4)  # dw_bwd's dispatch: 4 channels per thread for 16-bit types
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    acts = list(ACT_CODES)
    # The wide shape (several items per chunk) for one dtype: the chunk logic does not depend
    # on it, and its float64 reference is slow.
    shapes = STATS_SHAPES if dtype == torch.float32 else SHAPES
    for i, (n, c, h, wd) in enumerate(shapes):
        x, w, scale, shift = inputs((n, c, h, wd), dtype, 4000 * i + stride)
        act = acts[i % len(acts)]
        g = torch.Generator().manual_seed(10 + i)
        y = reference(x, w, scale * 3, shift, stride, act).to(dtype)  # wide: both kinks
        grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
        k, b, cc = (torch.randn(c, generator=g, dtype=torch.float64).to(ACC[dtype]) for _ in "kbc")
        xd = x.double().requires_grad_(True)
        wdd = w.double().requires_grad_(True)
        z = conv_f64(xd, wdd, stride)
        yd = y.double()
        passes = {None: torch.ones_like(yd, dtype=torch.bool), "relu": yd > 0}
        passes["relu6"] = (yd > 0) & (yd < 6)
        gz = torch.where(passes[act], grad_y.double(), torch.zeros_like(yd))
        per_c = lambda v: v.double().view(1, -1, 1, 1)  # noqa: E731
        gconv = per_c(k) * gz
        if use_z:
            gconv = gconv + (per_c(b) * z.detach() + per_c(cc))
        ref_gx, ref_gw = torch.autograd.grad(z, (xd, wdd), gconv)
        # Sums of mixed signs: the weight gradient against the sum of |terms|.
        wabs = w.double().abs().requires_grad_(True)
        (gw_scale,) = torch.autograd.grad(
            conv_f64(x.double().abs(), wabs, stride), wabs, gconv.abs()
        )
        gw_spread = float(gw_scale.abs().max())
        for vec, nthreads in bwd_runs(c, vec_width):
            gx, ws = run_host(
                host_binary, tmp_path, "bwd" if use_z else "bwd_noz", x, w, stride, act, vec,
                nthreads, grad_y=grad_y, y_saved=y, k=k, b=b, c=cc,
            )  # fmt: skip
            what = f"{tuple(x.shape)} s{stride} {act} vec={vec} nthreads={nthreads}"
            assert_close(gx, ref_gx, GRAD_TOLERANCES[dtype], f"{what} grad_x")
            gw = ws.double().sum(0).reshape(c, 1, 3, 3)
            assert_close(gw, ref_gw, tol, f"{what} grad_w", scale=gw_spread)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_pack16_matches_torch_conversion(host_binary, tmp_path, dtype):
    """``pack16`` (the 16-byte stores of the pointwise GEMM epilogue): the bytes it packs are
    those of the values converted to the storage type one by one, in order (a swapped pair of
    16-bit halves or a wrong rounding shows here). Values include ties for the 16-bit roundings,
    signed zeros, subnormals and infinities, compared bitwise, and a NaN, which must stay one."""
    g = torch.Generator().manual_seed(16)
    acc = ACC[dtype]
    vals = torch.cat(
        [
            torch.randn(4092, generator=g, dtype=torch.float64) * 100,
            torch.tensor([0.0, -0.0, 1e-40, -3e-39, 65504.0, 65520.0, 1e39, float("nan")]),
            torch.tensor([float("inf"), float("-inf"), 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-11]),
        ]
    ).to(acc)
    per = 16 // torch.empty(0, dtype=dtype).element_size()
    assert vals.numel() % per == 0 and vals.isnan().any()  # every special value is packed
    (tmp_path / "x.bin").write_bytes(_raw(vals))
    args = [host_binary, "pack16", tmp_path, str(dtype).removeprefix("torch."), vals.numel()]
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stderr[-4000:]}"
    got = (tmp_path / "y.bin").read_bytes()
    want = _raw(vals.to(dtype))
    assert len(got) == len(want)
    # A NaN must stay a NaN; its payload is the converter's own (CUDA's canonical 16-bit NaN is
    # 0x7fff, torch's 0x7fc0 / 0x7e00). Every other value is compared bitwise.
    nan = vals.isnan()
    assert torch.frombuffer(bytearray(got), dtype=dtype)[nan].isnan().all()
    es = torch.empty(0, dtype=dtype).element_size()
    skip = {i * es for i in nan.nonzero().flatten().tolist()}
    bad = [
        i for i in range(0, len(want), es) if i not in skip and got[i : i + es] != want[i : i + es]
    ]
    assert not bad, f"{len(bad)} of {len(want) // es} values differ, first at byte {bad[0]}"


def _pwtile_cases():
    """(dtype, BM, major, copy width) of every operand tile the pointwise GEMM loads
    (pointwise_fwd.cu: CfgBig for the 16-bit types, CfgSmall / CfgF64; K-major or M/N-major;
    the widths pw_gemm's copy_width can pick for the type)."""
    cases = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        es = torch.empty(0, dtype=dtype).element_size()
        # 17: kFullChunks, the 16-byte copies of chunks that are full or empty (the GEMM's
        # VEC path, when the operands' contiguous extents are multiples of 16 bytes)
        widths = [17] + [w for w in (16, 8, 4) if w >= es] + ([0] if es == 2 else [])
        for bm in (64, 128) if es == 2 else (64,):
            for major in ("k", "mn"):
                cases += [(dtype, bm, major, w) for w in widths]
    return cases


@pytest.mark.parametrize(
    "dtype,bm,major,width", _pwtile_cases(), ids=lambda v: str(v).removeprefix("torch.")
)
def test_pw_load_tile_matches_reference(host_binary, dtype, bm, major, width):
    """The pointwise GEMM's operand tile load (``load_tile``, csrc/cuda/pointwise_tile.cuh),
    run for every thread of a block on the host (cp.async emulated): full tiles, ragged rows,
    ragged columns (not a whole 16-byte chunk; for width 17, the predicated full-chunk copies,
    whole missing chunks), both, an empty tile, at the tightest row stride the copy width
    allows and at a wider one. The shared tile must hold the valid elements,
    zeros elsewhere, and untouched padding; reads past the valid extent stop the run
    (AddressSanitizer)."""
    es = torch.empty(0, dtype=dtype).element_size()
    bk = 64 // es
    v = 16 // es
    rows, cols = (bm, bk) if major == "k" else (bk, bm)
    step = max(min(width, 16) // es, 1)  # the row stride must keep every row start width-aligned
    runs = 0
    extents = [(rows, cols), (rows - 3, cols), (rows, cols - 3), (rows - 1, 1), (0, cols)]
    if width == 17:  # full or empty chunks only: whole missing chunks, not ragged ones
        extents = [(rows, cols), (rows - 3, cols), (rows, cols - v), (rows - 1, v), (0, cols)]
        bad = [host_binary, "pwtile", str(dtype).removeprefix("torch."), bm, major, 17]
        res = subprocess.run([str(a) for a in [*bad, rows, cols - 1, cols]], capture_output=True)
        assert res.returncode == 2, "the full-chunk load must refuse a ragged chunk"
    for rl, cl in extents:
        for ld in sorted({-(-cl // step) * step, -(-(cols + 5) // step) * step}):
            ld = max(ld, step)
            args = [host_binary, "pwtile", str(dtype).removeprefix("torch."), bm, major, width]
            args += [rl, cl, ld]
            res = subprocess.run([str(a) for a in args], capture_output=True, text=True)
            assert res.returncode == 0, f"{args[2:]}: exit {res.returncode}\n{res.stderr[-3000:]}"
            runs += 1
    assert runs >= 5


def _pwwalk_cases():
    """(dtype, BM, A layout, B layout) of every GEMM variant (pointwise_fwd.cu launch_layout)."""
    cases = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        es = torch.empty(0, dtype=dtype).element_size()
        for bm in (64, 128) if es == 2 else (64,):
            cases += [(dtype, bm, a, b) for a, b in (("k", "k"), ("k", "mn"), ("mn", "mn"))]
    return cases


@pytest.mark.parametrize(
    "dtype,bm,amajor,bmajor", _pwwalk_cases(), ids=lambda v: str(v).removeprefix("torch.")
)
def test_pw_k_walk_matches_reference(host_binary, dtype, bm, amajor, bmajor):
    """The pointwise GEMM's k-loop loads (``OperandStream`` + ``KWalk``,
    csrc/cuda/pointwise_tile.cuh): every thread keeps its own operand streams across k-tiles, as
    in pw_gemm_kernel, and each k-tile's A and B shared tiles must equal the elements of its
    batch and k offset. Covers a whole batch of ragged k-tiles (the per-image GEMMs), a slice
    running across batch boundaries mid-way (the split-K weight gradient), one-tile batches
    (K < BK), a shared operand (batch stride 0), edge tiles in m and n, and every copy width
    (17: the predicated full-chunk copies, on shapes whose chunks are full or empty)."""
    es = torch.empty(0, dtype=dtype).element_size()
    bk, v = 64 // es, 16 // es
    widths = [17] + [w for w in (16, 8, 4) if w >= es] + ([0] if es == 2 else [])
    runs = 0
    for width in widths:
        step = max(min(width, 16) // es, 1)  # strides must keep rows width-aligned
        rag = 0 if width == 17 else 3  # full-chunk copies need extents that are multiples of V

        def up(x, step=step):
            return -(-x // step) * step

        # (M, N, K, NB, kt0, nkt, shared B): whole batch 1 of 3; across batches; K < BK
        for M, N, K, nb, kt0, nkt, shared_b in [
            (bm + 2 * v + rag, bm + v + rag, 2 * bk + v + rag, 3, 3, 3, False),
            (bm + v + rag, 2 * v + rag, bk + v + rag, 3, 1, 4, True),
            (v + rag, bm + rag, v + rag, 2, 0, 2, False),
        ]:
            kt = -(-K // bk)
            assert kt0 + nkt <= nb * kt
            a_rows, a_cols = (M, K) if amajor == "k" else (K, M)
            b_rows, b_cols = (N, K) if bmajor == "k" else (K, N)
            lda, ldb = up(a_cols) + step, up(b_cols)
            batch_a, batch_b = up(a_rows * lda + 1), 0 if shared_b else b_rows * ldb
            for tm, tn in [(0, 0), (-(-M // bm) - 1, -(-N // bm) - 1)]:
                args = [host_binary, "pwwalk", str(dtype).removeprefix("torch."), bm, amajor]
                args += [bmajor, width, M, N, K, nb, lda, ldb, batch_a, batch_b, kt0, nkt, tm, tn]
                res = subprocess.run([str(a) for a in args], capture_output=True, text=True)
                assert res.returncode == 0, (
                    f"{args[2:]}: exit {res.returncode}\n{res.stderr[-3000:]}"
                )
                runs += 1
    assert runs >= 6 * len(widths)
