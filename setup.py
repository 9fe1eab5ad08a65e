"""Build script for dwsep.

Always builds ``dwsep._C`` from the C++ CPU sources. Adds the CUDA sources whenever a CUDA
toolkit is found (``CUDA_HOME``/``CUDA_PATH``, ``/usr/local/cuda``, or ``nvcc`` on ``PATH``),
whether or not a GPU is present.

Environment knobs:
  DWSEP_BUILD_CUDA=0/1      force the CUDA sources off / on (on fails when no toolkit is found)
  TORCH_CUDA_ARCH_LIST      GPU architectures; default "8.0;9.0" (works on GPU-less builders)
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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

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


ext_modules, cmdclass = build_ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
