"""Loads the compiled extension ``dwsep._C`` and records what it contains.

If the extension is missing or fails to load, ``import dwsep`` still works: the ``"torch"``
backend (and ``"triton"`` where it can run) stay available, and one warning says why.
"""

from __future__ import annotations

import warnings

_C = None
LOAD_ERROR: str | None = None
CUDA_COMPILED = False

try:
    import torch  # noqa: F401  (the extension links against libtorch)

    from . import _C as _C_mod  # type: ignore[attr-defined]

    _C = _C_mod
    CUDA_COMPILED = bool(getattr(_C_mod, "cuda_compiled", 0))
except Exception as exc:  # ImportError, OSError (undefined symbol / ABI mismatch), ...
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "dwsep: the compiled extension dwsep._C could not be loaded, so the 'cpu' and 'cuda' "
        f"backends are unavailable and the pure-PyTorch 'torch' backend is used ({LOAD_ERROR}). "
        "Rebuild with `pip install -e .` (or `--no-build-isolation` against your installed torch).",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_C = _C is not None
