"""Backend registry, build info and the import fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dwsep
from dwsep import backends


def test_build_info_fields():
    info = dwsep.build_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["triton"] == backends.triton_version()
    assert "torch" in info["backends"]
    assert set(info["backends"]) <= set(backends.BACKENDS)


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
