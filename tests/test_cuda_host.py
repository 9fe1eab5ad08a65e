"""Host runs of CUDA kernel bodies: the channels_last depthwise forward without a GPU.

``dw_fwd_nhwc_thread`` (csrc/cuda/depthwise_fwd_nhwc.cuh) is the whole work of one thread of
the kernel and touches no other thread's data, so running it for every thread id of a grid, one
after another on the CPU, computes what the GPU computes. tests/cuda_host/dw_fwd_nhwc_host.cu does
that, built with the host compiler under AddressSanitizer and UBSan (buffers at their exact
sizes: any out-of-bounds access stops the run), its output filled with NaN first (an output it
does not write fails the comparison). This checks the kernel's indexing, work split and
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

from dwsep.testing import TOLERANCES, assert_close

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cuda_host" / "dw_fwd_nhwc_host.cu"
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
    out = tmp_path_factory.mktemp("cuda_host") / "dw_fwd_nhwc_host"
    cmd = [
        cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-x", "c++",
        f"-I{ROOT / 'csrc'}", f"-I{inc}", str(SOURCE), "-o", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"host build failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return out


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def run_host(binary: Path, workdir: Path, x, w, scale, shift, stride, act, vec, nthreads):
    """y of the emulated launch (NCHW view of the NHWC result)."""
    n, c, h, wd = x.shape
    (workdir / "x.bin").write_bytes(_raw(x.permute(0, 2, 3, 1)))
    (workdir / "w.bin").write_bytes(_raw(w.reshape(c, 9)))
    (workdir / "scale.bin").write_bytes(_raw(scale))
    (workdir / "shift.bin").write_bytes(_raw(shift))
    dtype = str(x.dtype).removeprefix("torch.")
    args = [binary, workdir, dtype, n, c, h, wd, stride, ACT_CODES[act], 0 if vec else 1, nthreads]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0")
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"{args[2:]}: exit {res.returncode}\n{res.stderr[-4000:]}"
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    raw = bytearray((workdir / "y.bin").read_bytes())
    y = torch.frombuffer(raw, dtype=x.dtype) if raw else torch.empty(0, dtype=x.dtype)
    return y.reshape(n, ho, wo, c).permute(0, 3, 1, 2)


def reference(x, w, scale, shift, stride, act):
    z = F.conv2d(x.double(), w.double(), None, stride, 1, 1, x.shape[1])
    y = z * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if act == "relu":
        y = y.clamp_min(0)
    elif act == "relu6":
        y = y.clamp(0, 6)
    return y


# (N, C, H, W): odd sizes, 1x1 and 2x2 planes, C not a multiple of any vector width, widths not
# a multiple of the strip width (8 at stride 1, 4 at stride 2).
SHAPES = [(2, 16, 7, 9), (1, 8, 1, 1), (1, 24, 2, 2), (3, 8, 13, 17), (1, 5, 6, 3), (2, 32, 17, 16)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_dw_fwd_nhwc_thread_matches_reference(host_binary, tmp_path, dtype, stride):
    vec_width = 16 // torch.empty(0, dtype=dtype).element_size()
    acts = list(ACT_CODES)
    runs = 0
    for i, (n, c, h, wd) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(1000 * i + stride)
        x = torch.randn(n, c, h, wd, generator=g, dtype=torch.float64).to(dtype)
        w = (torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64) / 3).to(dtype)
        scale = (torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.5).to(ACC[dtype])
        shift = (torch.randn(c, generator=g, dtype=torch.float64) + 1).to(ACC[dtype])
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
                y = run_host(host_binary, tmp_path, x, w, scale, shift, stride, act, vec, nthreads)
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
        run_host(host_binary, tmp_path, x, w, s, s, 1, None, False, 15)
