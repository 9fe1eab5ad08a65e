"""The CUDA kernels' global stores are as wide as their design says, checked in the PTX that
nvcc emits for sm_90 (no GPU needed; skipped without nvcc).

Why: in the session-3 build the pointwise GEMM epilogue meant to store 16 bytes per thread and
step, but nvcc split the store of its 16-byte struct into eight 2-byte stores in every
instantiation (``bench/NOTES.md``, session 14). Nothing else notices that: every output is still
right, only slower, and only a GPU profile shows it. These tests fail when a kernel that should
store 16 bytes at a time has no 16-byte global store left in its PTX.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A 16-byte global store: four 32-bit or two 64-bit lanes.
WIDE_STORE = re.compile(r"\bst\.global(?:\.[a-z0-9]+)*\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")


def _nvcc() -> Optional[Path]:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    found = shutil.which("nvcc")
    if found:
        roots.append(str(Path(os.path.realpath(found)).parents[1]))
    for r in roots:
        if r and (Path(r) / "bin" / "nvcc").is_file() and (Path(r) / "include").is_dir():
            return Path(r) / "bin" / "nvcc"
    return None


@pytest.fixture(scope="module")
def ptx_of(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (CUDA_HOME, CUDA_PATH, /usr/local/cuda or PATH)")
    out_dir = tmp_path_factory.mktemp("ptx")

    def compile_ptx(source: str) -> dict[str, str]:
        """{entry name: its PTX body} of csrc/cuda/SOURCE for sm_90."""
        out = out_dir / (Path(source).stem + ".ptx")
        cmd = [
            str(nvcc), "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
            "-arch=sm_90", "-ptx", str(ROOT / "csrc" / "cuda" / source), "-o", str(out),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
        parts = re.split(r"^\.(?:visible \.)?entry ", out.read_text(), flags=re.M)[1:]
        return {p.split("(", 1)[0].strip(): p for p in parts}

    return compile_ptx


def test_pointwise_gemm_epilogue_stores_16_bytes(ptx_of):
    """Every instantiation of the pointwise GEMM (each dtype, tile, operand layout) has 16-byte
    global stores: the vector path of its epilogue (store_tile's st_global16)."""
    entries = {k: v for k, v in ptx_of("pointwise_fwd.cu").items() if "pw_gemm_kernel" in k}
    assert len(entries) >= 30, sorted(entries)
    narrow = [name for name, body in entries.items() if not WIDE_STORE.search(body)]
    assert not narrow, f"{len(narrow)} of {len(entries)} GEMM kernels lack 16-byte stores"


def test_depthwise_channels_last_forward_stores_16_bytes(ptx_of):
    """The channels_last depthwise forward with channel vectors (VEC > 1: 16 bytes of channels
    per thread) stores them 16 bytes at a time; the scalar variant (VEC = 1) does not."""
    entries = {k: v for k, v in ptx_of("depthwise_fwd.cu").items() if "dw_fwd_nhwc_kernel" in k}
    vec = {}
    for name in entries:
        m = re.search(r"dw_fwd_nhwc_kernelI.*?Li(\d+)ELi(\d+)ELi(\d+)EEEv", name)
        assert m, name
        vec[name] = int(m.group(3))
    assert sorted(set(vec.values())) == [1, 2, 4, 8], vec
    wide = {name: bool(WIDE_STORE.search(body)) for name, body in entries.items()}
    assert all(wide[n] for n in entries if vec[n] > 1), [n for n in entries if not wide[n]]
    assert not any(wide[n] for n in entries if vec[n] == 1)
