"""Backend registry: which kernels run an op.

Backends:
  ``"cuda"``   hand-written CUDA kernels in ``dwsep._C`` (CUDA tensors)
  ``"triton"`` Triton kernels in ``kernels_triton`` (CUDA tensors, or CPU tensors under
               ``TRITON_INTERPRET=1``)
  ``"cpu"``    C++ CPU kernels in ``dwsep._C`` (CPU tensors)
  ``"torch"``  the pure-PyTorch reference (any device; always available)

The default, ``"auto"``, picks per device: CUDA tensors use ``triton``, else ``cuda``, else
``torch`` (float64 CUDA tensors: ``cuda`` first); CPU tensors use ``cpu``, else ``torch``.
The GPU backends need compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell); on an
older GPU, or one the CUDA build has no kernel image for, ``"auto"`` runs the reference ops and
warns once, and naming such a backend raises :class:`BackendUnavailableError` saying why.
Triton leads on CUDA because it measured faster than the CUDA kernels on every MobileNetV1
layer and mode on an H100 (bf16, channels_last, batch 256; bench/results/2026-11-23_*); float64
goes to the CUDA kernels because the Triton pointwise kernels failed gradcheck in float64 there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "cpu", "torch")
_CHOICES = (*BACKENDS, "auto")

_current = "auto"


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run on the given tensors."""


def _find_triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # pragma: no cover - exotic installs
        return "unknown"


_TRITON_VERSION = _find_triton_version()


def triton_version() -> str | None:
    """The installed Triton version, or None (found without importing triton)."""
    return _TRITON_VERSION


def triton_interpret() -> bool:
    """Whether Triton runs in its interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The GPU kernels use sm_80 instructions (cp.async, ldmatrix, bf16/tf32 mma.sync); Triton itself
# supports NVIDIA GPUs from compute capability 8.0.
MIN_CUDA_CAPABILITY = (8, 0)

_GPU_PROBLEMS: dict[tuple[str, int], str] = {}  # (backend, device index) -> why, or ""
_FALLBACK_WARNED: set[int] = set()  # device indices "auto" has warned about


def _constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does (torch.compile calls ``fn`` at trace
    time and bakes its result into the graph), without importing torch._dynamo when dwsep is
    imported (~1.5 s). tests/test_backends.py checks that it still matches torch's."""
    fn._dynamo_marked_constant = True
    return fn


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _cuda_device(device: torch.device) -> tuple[int, tuple[int, int], str]:
    """(index, compute capability, name) of CUDA device ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, tuple(torch.cuda.get_device_capability(index)), torch.cuda.get_device_name(index)


def _cuda_kernel_image(index: int) -> tuple[list[int], str]:
    """([sass_version, ptx_version], error) of dwsep._C's kernel image for CUDA device index
    (no error, so no refusal, from an extension built before the probe existed)."""
    try:
        probe = torch.ops.dwsep._cuda_kernel_image
    except (AttributeError, RuntimeError):
        return [0, 0], ""
    versions, error = probe(index)
    return list(versions), error


@_constant_under_compile
def _gpu_problem(name: str, device: torch.device) -> str:
    """Why backend ``name`` (``cuda`` or ``triton``) cannot run on CUDA device ``device``, or
    ``""``: the compute capability, and for ``cuda`` whether dwsep._C holds a kernel image
    for the GPU. Asked once per (backend, device) and cached; under torch.compile it runs at
    trace time and its answer is a constant of the graph."""
    key = (name, device.index if device.index is not None else -1)
    known = _GPU_PROBLEMS.get(key)
    if known is not None:  # the per-op path: one dict lookup
        return known
    if not _cuda_available():
        return ""  # no device to ask (not cached); a tensor cannot be on one either
    index, cap, gpu_name = _cuda_device(device)
    gpu = f"{gpu_name} (cuda:{index}) has compute capability {cap[0]}.{cap[1]}"
    why = ""
    if cap < MIN_CUDA_CAPABILITY:
        need = "cp.async, ldmatrix, bf16 mma.sync" if name == "cuda" else "Triton's own minimum"
        why = f"the {name} kernels need compute capability 8.0 or newer ({need}); {gpu}"
    elif name == "cuda":
        _, error = _cuda_kernel_image(index)
        if error:
            why = (
                f"dwsep._C holds no kernel image for this GPU: {gpu} ({error}); rebuild for it "
                f'with TORCH_CUDA_ARCH_LIST="{cap[0]}.{cap[1]}" pip install -e . '
                "--no-build-isolation"
            )
    _GPU_PROBLEMS[key] = why
    return why


@_constant_under_compile
def _warn_reference_fallback(device: torch.device, op: str) -> bool:
    """Warns once per device that ``"auto"`` found no kernel backend for it (the reason of
    each), so the reference ops run there. Runs at trace time under torch.compile."""
    key = device.index if device.index is not None else -1
    if key in _FALLBACK_WARNED:
        return True
    reasons = "; ".join(
        f"{b}: {_why_unavailable(b, device)}" for b in auto_order(device) if b != "torch"
    )
    warnings.warn(
        f"dwsep.{op}: no kernel backend can run on {device}, so the pure-PyTorch reference "
        f"ops run instead (correct, unfused). {reasons}",
        RuntimeWarning,
        stacklevel=3,
    )
    _FALLBACK_WARNED.add(key)
    return True


def gpu_info() -> list[dict]:
    """Per visible CUDA device: index, name, compute capability, the backends that can run on
    it, and why each GPU backend cannot (empty without CUDA)."""
    if not _cuda_available():
        return []
    out = []
    for index in range(torch.cuda.device_count()):
        dev = torch.device("cuda", index)
        _, cap, name = _cuda_device(dev)
        why = {b: _why_unavailable(b, dev) for b in BACKENDS}
        out.append(
            {
                "index": index,
                "name": name,
                "capability": f"{cap[0]}.{cap[1]}",
                "backends": [b for b, w in why.items() if w is None],
                "unavailable": {b: why[b] for b in ("triton", "cuda") if why[b]},
            }
        )
    return out


def _why_unavailable(name: str, device: torch.device) -> str | None:
    """None if ``name`` can run on tensors of ``device``, else a reason."""
    if name == "torch":
        return None
    if name == "cpu":
        if not _ext.HAS_C:
            return f"the compiled extension dwsep._C failed to load ({_ext.LOAD_ERROR})"
        if device.type != "cpu":
            return f"it runs on CPU tensors, got tensors on {device}"
        return None
    if name == "cuda":
        if not _ext.HAS_C:
            return f"the compiled extension dwsep._C failed to load ({_ext.LOAD_ERROR})"
        if not _ext.CUDA_COMPILED:
            return "dwsep._C was built without CUDA kernels (rebuild with a CUDA toolkit)"
        if device.type != "cuda":
            return f"it runs on CUDA tensors, got tensors on {device}"
        return _gpu_problem("cuda", device) or None
    if name == "triton":
        if triton_version() is None:
            return "triton is not installed"
        if device.type == "cuda":
            return _gpu_problem("triton", device) or None
        if device.type == "cpu":
            if triton_interpret():
                return None
            return (
                "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
        return f"Triton does not run on {device} tensors"
    raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run here.

    With ``device``, those that can run on tensors of that device; without, those that can run
    on some device of this machine (CUDA if present, and CPU).
    """
    if device is not None:
        dev = torch.device(device)
        return [b for b in BACKENDS if _why_unavailable(b, dev) is None]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    return [b for b in BACKENDS if any(_why_unavailable(b, d) is None for d in devices)]


def get_backend() -> str:
    """The backend selected with :func:`set_backend` / :func:`use_backend` (``"auto"`` by default)."""
    return _current


def set_backend(name: str) -> None:
    """Select the backend for all dwsep ops: one of ``cuda``, ``triton``, ``cpu``, ``torch``,
    ``auto``. Availability is checked when an op runs, against its tensors' device."""
    global _current
    if name not in _CHOICES:
        raise ValueError(f"dwsep.set_backend: name must be one of {_CHOICES}, got {name!r}")
    _current = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend for the ops run inside it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def auto_order(device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """The backends ``"auto"`` tries, in order, for tensors of ``device`` and ``dtype``."""
    if device.type == "cuda":
        if dtype == torch.float64:
            return ("cuda", "triton", "torch")
        return ("triton", "cuda", "torch")
    return ("cpu", "torch")


def resolve(device: torch.device, op: str = "op", dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``device`` (and ``dtype``); raises if the
    selected one can't."""
    name = _current
    if name == "auto":
        for cand in auto_order(device, dtype):
            if _why_unavailable(cand, device) is None:
                if cand == "torch" and device.type == "cuda":
                    _warn_reference_fallback(device, op)
                return cand
        return "torch"
    why = _why_unavailable(name, device)
    if why is not None:
        raise BackendUnavailableError(f"dwsep.{op}: backend {name!r} cannot run: {why}")
    return name
