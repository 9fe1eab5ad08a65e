"""Backend registry: which kernels run an op.

Backends:
  ``"cuda"``   hand-written CUDA kernels in ``dwsep._C`` (CUDA tensors)
  ``"triton"`` Triton kernels in ``kernels_triton`` (CUDA tensors, or CPU tensors under
               ``TRITON_INTERPRET=1``)
  ``"cpu"``    C++ CPU kernels in ``dwsep._C`` (CPU tensors)
  ``"torch"``  the pure-PyTorch reference (any device; always available)

The default, ``"auto"``, picks per device: CUDA tensors use ``triton``, else ``cuda``, else
``torch`` (float64 CUDA tensors: ``cuda`` first); CPU tensors use ``cpu``, else ``torch``.
Triton leads on CUDA because it measured faster than the CUDA kernels on every MobileNetV1
layer and mode on an H100 (bf16, channels_last, batch 256; bench/results/2026-11-23_*); float64
goes to the CUDA kernels because the Triton pointwise kernels failed gradcheck in float64 there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
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
        return None
    if name == "triton":
        if triton_version() is None:
            return "triton is not installed"
        if device.type == "cuda":
            return None
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
                return cand
        return "torch"
    why = _why_unavailable(name, device)
    if why is not None:
        raise BackendUnavailableError(f"dwsep.{op}: backend {name!r} cannot run: {why}")
    return name
