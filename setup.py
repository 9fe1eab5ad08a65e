"""Build script for dwsep.

Always builds ``dwsep._C`` from the C++ CPU sources. Adds the CUDA sources whenever a CUDA
toolkit is found (``CUDA_HOME``/``CUDA_PATH``, ``/usr/local/cuda``, or ``nvcc`` on ``PATH``),
whether or not a GPU is present.

Environment knobs:
  DWSEP_BUILD_CUDA=0/1      force the CUDA sources off / on (on fails when no toolkit is found)
  TORCH_CUDA_ARCH_LIST      GPU architectures; default "8.0;9.0+PTX" plus the compute capability
                            of every GPU this machine has (8.0 or newer, where nvcc knows it),
                            with PTX for the newest (see default_cuda_arch_list)
  MAX_JOBS                  parallel compile jobs; default min(4, CPU count)
  DWSEP_CPU_ARCH_FLAGS      extra host ISA flags for the CPU kernels; default: AVX2+FMA when
                            this x86-64 host has them, none otherwise
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[dwsep setup] {msg}", flush=True)


def _has_nvcc(home: str | None) -> bool:
    """A real toolkit: bin/nvcc and the runtime headers (not a directory holding a wrapper)."""
    return (
        bool(home)
        and os.path.isfile(os.path.join(home, "bin", "nvcc"))
        and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
    )


def find_cuda_home() -> str | None:
    """Locate a CUDA toolkit without needing a GPU. ``nvcc`` on PATH may be a wrapper
    script, so prefer real toolkit directories over guessing from its location."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _has_nvcc(os.environ.get(var)):
            return os.environ[var]
    candidates = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if _has_nvcc(home):
            return home
    if nvcc:  # a wrapper: ask it where the real compiler lives
        try:
            out = subprocess.run(
                ["sh", "-c", f"grep -o '/[^ ]*/bin/nvcc' {nvcc} | head -n1"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if out and _has_nvcc(os.path.dirname(os.path.dirname(out))):
                return os.path.dirname(os.path.dirname(out))
        except OSError:
            pass
    return None


def host_isa_flags() -> list[str]:
    if "DWSEP_CPU_ARCH_FLAGS" in os.environ:
        return os.environ["DWSEP_CPU_ARCH_FLAGS"].split()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if " avx2" in flags and " fma" in flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


# The kernels need sm_80 features (cp.async, ldmatrix, bf16 mma.sync); sm_80 SASS also runs on
# the other 8.x chips. 9.0 is built for the H100, and PTX for the newest listed so that newer
# GPUs (sm_100, sm_120, ...) JIT-compile it on first use.
BASE_CUDA_ARCHS = ((8, 0), (9, 0))
MIN_CUDA_ARCH = (8, 0)


def default_cuda_arch_list(detected: list[tuple[int, int]], nvcc_archs: set[str] | None) -> str:
    """TORCH_CUDA_ARCH_LIST when the user sets none: the base architectures plus each detected
    GPU's compute capability (those below 8.0 are left out: the kernels need sm_80; those the
    toolkit cannot compile for, per ``nvcc --list-gpu-arch`` (``nvcc_archs``, e.g.
    ``{"compute_90"}``; None when unknown), are left to the PTX), with PTX for the newest."""
    archs = set(BASE_CUDA_ARCHS)
    for cap in detected:
        if tuple(cap) >= MIN_CUDA_ARCH and (
            nvcc_archs is None or f"compute_{cap[0]}{cap[1]}" in nvcc_archs
        ):
            archs.add(tuple(cap))
    ordered = sorted(archs)
    names = [f"{major}.{minor}" for major, minor in ordered]
    names[-1] += "+PTX"
    return ";".join(names)


def nvcc_gpu_archs(cuda_home: str) -> set[str] | None:
    """The virtual architectures this toolkit's nvcc compiles for, or None if it cannot say."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return None
    archs = set(out.split())
    return archs or None


def detected_gpus(torch) -> list[tuple[int, int]]:
    """Compute capabilities of the GPUs visible to this build (none on GPU-less builders)."""
    try:
        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a driver problem must not fail a build that needs no GPU
        return []


def build_ext_modules():
    # Decide on CUDA before torch.utils.cpp_extension reads CUDA_HOME at import time.
    want = os.environ.get("DWSEP_BUILD_CUDA", "auto").strip().lower()
    cuda_home = find_cuda_home() if want not in ("0", "false", "off") else None
    if want in ("1", "true", "on") and cuda_home is None:
        raise RuntimeError(
            "DWSEP_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a directory "
            "containing bin/nvcc"
        )
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_home and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(
            detected_gpus(torch), nvcc_gpu_archs(cuda_home)
        )

    if cuda_home and torch.version.cuda is None:
        msg = f"torch {torch.__version__} is a CPU-only build, so the CUDA kernels cannot be built"
        if want in ("1", "true", "on"):
            raise RuntimeError(f"DWSEP_BUILD_CUDA=1 but {msg}")
        _log(f"{msg}; building the CPU extension only")
        cuda_home = None

    def rel(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", *host_isa_flags()]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if cuda_home:
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        cxx.append("-DDWSEP_WITH_CUDA")
        nvcc = [
            "-O3",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "-Xptxas=-v" if os.environ.get("DWSEP_PTXAS_VERBOSE") else "-Xptxas=-O3",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ]
        _log(
            f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']})"
        )
        ext = CUDAExtension(
            "dwsep._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        _log("building CPU kernels only (no CUDA toolkit found or DWSEP_BUILD_CUDA=0)")
        ext = CppExtension(
            "dwsep._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too
    ext_modules, cmdclass = build_ext_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
