"""Backend registry, build info and the import fallback."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dwsep
from dwsep import backends

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_fields():
    info = dwsep.build_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["triton"] == backends.triton_version()
    assert "torch" in info["backends"]
    assert set(info["backends"]) <= set(backends.BACKENDS)
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_cuda_compiled_when_required():
    """CI builds with DWSEP_BUILD_CUDA=1 and sets DWSEP_REQUIRE_CUDA_BUILD=1."""
    if os.environ.get("DWSEP_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("DWSEP_REQUIRE_CUDA_BUILD not set")
    assert dwsep.build_info()["cuda_compiled"], dwsep.build_info()


def test_set_and_use_backend():
    assert dwsep.get_backend() == "auto"
    with dwsep.use_backend("torch"):
        assert dwsep.get_backend() == "torch"
        with dwsep.use_backend("auto"):
            assert dwsep.get_backend() == "auto"
        assert dwsep.get_backend() == "torch"
    assert dwsep.get_backend() == "auto"
    with pytest.raises(ValueError, match="name must be one of"):
        dwsep.set_backend("cudnn")


def test_auto_policy_on_cpu():
    expected = "cpu" if "cpu" in dwsep.available_backends("cpu") else "torch"
    assert backends.resolve(torch.device("cpu")) == expected


def test_auto_order_on_cuda():
    """Triton first on CUDA (measured fastest on an H100), the CUDA kernels first for float64;
    the policy itself, so it is checked without a GPU."""
    cuda = torch.device("cuda")
    for dt in (torch.float32, torch.float16, torch.bfloat16, None):
        assert backends.auto_order(cuda, dt) == ("triton", "cuda", "torch")
    assert backends.auto_order(cuda, torch.float64) == ("cuda", "triton", "torch")
    assert backends.auto_order(torch.device("cpu"), torch.float32) == ("cpu", "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_resolves_on_cuda():
    avail = dwsep.available_backends("cuda")
    for dt in (torch.float32, torch.float64):
        want = next(b for b in backends.auto_order(torch.device("cuda"), dt) if b in avail)
        assert backends.resolve(torch.device("cuda"), "op", dt) == want


def test_unavailable_backend_says_why():
    with dwsep.use_backend("cuda"):
        with pytest.raises(dwsep.BackendUnavailableError, match="backend 'cuda' cannot run"):
            dwsep.depthwise_conv_bn_act(
                torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3), torch.zeros(3), torch.ones(3)
            )


def test_triton_on_cpu_needs_interpreter():
    if backends.triton_version() is None:
        pytest.skip("triton not installed")
    code = (
        "import torch, dwsep\n"
        "try:\n"
        "    with dwsep.use_backend('triton'):\n"
        "        dwsep.depthwise_conv_bn_act(torch.randn(2,3,4,4), torch.randn(3,1,3,3),"
        " torch.zeros(3), torch.ones(3))\n"
        "except dwsep.BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "TRITON_INTERPRET=1" in out


def test_import_without_extension_falls_back_with_one_warning(tmp_path):
    """A broken _C: import still works, one warning, the torch backend runs."""
    code = (
        "import sys, warnings, builtins\n"
        "real_import = builtins.__import__\n"
        "def fake(name, globals=None, locals=None, fromlist=(), level=0):\n"
        "    if level == 1 and fromlist and '_C' in fromlist and globals and "
        "globals.get('__name__') == 'dwsep._ext':\n"
        "        raise ImportError('simulated broken extension')\n"
        "    return real_import(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = fake\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import dwsep\n"
        "builtins.__import__ = real_import\n"
        "msgs = [str(x.message) for x in w if 'dwsep' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'simulated broken extension' in msgs[0]\n"
        "import torch\n"
        "assert dwsep.available_backends('cpu') in (['torch'], ['triton', 'torch']), "
        "dwsep.available_backends('cpu')\n"
        "y = dwsep.depthwise_conv_bn_act(torch.randn(2,3,4,4), torch.randn(3,1,3,3),"
        " torch.zeros(3), torch.ones(3))\n"
        "assert y.shape == (2,3,4,4)\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_main_job_runs():
    out = subprocess.run([sys.executable, "-m", "dwsep", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"cuda_compiled"' in out.stdout


def test_triton_autotune_options(monkeypatch):
    """Off the interpreter every autotuned kernel caches its choice on disk (unless
    DWSEP_TRITON_AUTOTUNE_CACHE=0) and times configs with the short benchmark, where this Triton
    takes those options; the interpreter gets none."""
    import inspect

    triton = pytest.importorskip("triton")
    from kernels_triton import _common

    params = inspect.signature(triton.autotune).parameters
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.delenv("DWSEP_TRITON_AUTOTUNE_CACHE", raising=False)
    opts = _common.autotune_options()
    assert opts.get("cache_results") is (True if "cache_results" in params else None)
    assert opts.get("do_bench") is (_common._short_bench if "do_bench" in params else None)
    monkeypatch.setenv("DWSEP_TRITON_AUTOTUNE_CACHE", "0")
    assert "cache_results" not in _common.autotune_options()
    monkeypatch.setattr(_common, "INTERPRET", True)
    assert _common.autotune_options() == {}


# --- GPU generations: checked without a GPU by faking what torch.cuda reports -----------------

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend CUDA device 0 exists; returns a setter for its capability and kernel image."""
    state = {"cap": (9, 0), "image": ([90, 90], "")}
    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(backends, "_cuda_device", lambda d: (0, state["cap"], "Fake GPU"))
    monkeypatch.setattr(backends, "_cuda_kernel_image", lambda i: state["image"])
    monkeypatch.setattr(backends, "_GPU_PROBLEMS", {})
    monkeypatch.setattr(backends, "_FALLBACK_WARNED", set())

    def set_gpu(cap, image=([90, 90], "")):
        state["cap"], state["image"] = cap, image
        backends._GPU_PROBLEMS.clear()
        backends._FALLBACK_WARNED.clear()

    return set_gpu


def _needs_cuda_build():
    if not dwsep.build_info()["cuda_compiled"]:
        pytest.skip("dwsep._C built without CUDA kernels")


def _needs_triton():
    if backends.triton_version() is None:
        pytest.skip("triton not installed")


def test_gpu_backends_refuse_gpus_older_than_sm80(fake_gpu):
    """A Turing GPU (sm_75): both kernel backends say why; "auto" runs the reference ops and
    warns once, naming the reasons; a named backend raises."""
    _needs_triton()
    fake_gpu((7, 5))
    why = backends._why_unavailable("triton", CUDA0)
    assert why and "compute capability 8.0 or newer" in why and "7.5" in why and "Fake GPU" in why
    if dwsep.build_info()["cuda_compiled"]:
        why = backends._why_unavailable("cuda", CUDA0)
        assert why and "8.0 or newer" in why and "7.5" in why
    assert "triton" not in dwsep.available_backends(CUDA0)
    with pytest.warns(RuntimeWarning, match=r"no kernel backend can run on cuda:0.*triton: the"):
        assert backends.resolve(CUDA0, "some_op", torch.bfloat16) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device: the second call is silent
        assert backends.resolve(CUDA0, "some_op", torch.float16) == "torch"
    with dwsep.use_backend("triton"):
        with pytest.raises(dwsep.BackendUnavailableError, match="need compute capability 8.0"):
            backends.resolve(CUDA0, "some_op", torch.float16)


def test_build_info_reports_each_gpu(fake_gpu, monkeypatch):
    """build_info()['gpus']: capability and why a GPU backend cannot run, per device."""
    _needs_triton()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fake_gpu((7, 5))
    (gpu,) = dwsep.build_info()["gpus"]
    assert gpu["index"] == 0 and gpu["name"] == "Fake GPU" and gpu["capability"] == "7.5"
    assert "triton" not in gpu["backends"] and "torch" in gpu["backends"]
    assert "8.0 or newer" in gpu["unavailable"]["triton"]
    fake_gpu((9, 0))
    (gpu,) = dwsep.build_info()["gpus"]
    assert "triton" in gpu["backends"] and "triton" not in gpu["unavailable"]


def test_cuda_backend_needs_a_kernel_image_for_the_gpu(fake_gpu):
    """A GPU newer than the build (no SASS, no PTX it can JIT): the cuda backend names the
    rebuild command with the GPU's architecture; Triton still runs; a PTX-only image is fine."""
    _needs_cuda_build()
    fake_gpu((12, 0), ([0, 0], "cudaErrorNoKernelImageForDevice: no kernel image"))
    why = backends._why_unavailable("cuda", CUDA0)
    assert why and "no kernel image" in why and 'TORCH_CUDA_ARCH_LIST="12.0"' in why
    assert backends._why_unavailable("triton", CUDA0) in (None, "triton is not installed")
    with dwsep.use_backend("cuda"):
        with pytest.raises(dwsep.BackendUnavailableError, match="holds no kernel image"):
            backends.resolve(CUDA0, "some_op", torch.float64)
    fake_gpu((12, 0), ([0, 90], ""))  # compute_90 PTX, JIT-compiled by the driver
    assert backends._why_unavailable("cuda", CUDA0) is None
    fake_gpu((8, 6))
    assert backends._why_unavailable("cuda", CUDA0) is None


def test_cuda_kernel_image_probe_runs_without_a_gpu():
    """The real probe (csrc/cuda/device_check.cu through the registered op) on a machine with
    no usable GPU reports an error instead of failing; with a GPU it finds this build's image."""
    if not dwsep.build_info()["extension_loaded"]:
        pytest.skip("dwsep._C not loaded")
    versions, error = torch.ops.dwsep._cuda_kernel_image(0)
    assert len(versions) == 2
    if torch.cuda.is_available() and dwsep.build_info()["cuda_compiled"]:
        if not error:
            assert max(versions) >= 80, versions
    else:
        assert error and versions == [0, 0], (versions, error)


def test_gpu_check_is_a_constant_under_compile(fake_gpu):
    """torch.compile(fullgraph=True) calls the GPU check at trace time (no graph break) and
    uses its answer; and the marker is the one torch.compiler.assume_constant_result sets."""
    _needs_triton()

    def mine():
        pass

    def theirs():
        pass

    backends._constant_under_compile(mine)
    torch.compiler.assume_constant_result(theirs)
    assert vars(mine) == vars(theirs)

    fake_gpu((7, 5))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + (1.0 if backends._why_unavailable("triton", CUDA0) else 0.0)

    assert f(torch.zeros(2)).tolist() == [1.0, 1.0]


def _load_setup_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dwsep_setup_py", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the helpers, builds nothing
    return mod


def test_default_cuda_arch_list():
    """The default TORCH_CUDA_ARCH_LIST: sm_80 and sm_90 always, PTX for the newest so that later
    GPUs JIT it, plus the build machine's GPUs where nvcc knows them (none below 8.0)."""
    setup_py = _load_setup_py()
    archs = setup_py.default_cuda_arch_list
    nvcc13 = {f"compute_{a}" for a in (75, 80, 86, 89, 90, 100, 120)}
    assert archs([], nvcc13) == "8.0;9.0+PTX"
    assert archs([(8, 6)], nvcc13) == "8.0;8.6;9.0+PTX"
    assert archs([(9, 0), (9, 0)], nvcc13) == "8.0;9.0+PTX"
    assert archs([(7, 5)], nvcc13) == "8.0;9.0+PTX"
    assert archs([(12, 0), (8, 9)], nvcc13) == "8.0;8.9;9.0;12.0+PTX"
    assert archs([(12, 0)], {"compute_80", "compute_90"}) == "8.0;9.0+PTX"
    assert archs([(10, 0)], None) == "8.0;9.0;10.0+PTX"


def test_triton_launches_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the dwsep_triton ops make the input's device
    current first (checked with a fake tensor on cuda:1 while cuda:0 is current)."""
    from dwsep._triton_ops import on_device_of

    entered = []

    @contextlib.contextmanager
    def fake_device(d):
        entered.append(torch.device(d))
        yield

    class FakeCudaTensor:
        is_cuda = True

        def __init__(self, index):
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with on_device_of(FakeCudaTensor(1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with on_device_of(FakeCudaTensor(0)), on_device_of(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]  # already current / a CPU tensor: nothing
