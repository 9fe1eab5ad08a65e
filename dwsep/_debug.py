"""Test hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import _ext, ops


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Every kernel output is pre-filled with NaN while active, so a test can prove that each
    output element is written (an element a kernel skips stays NaN)."""
    ops._POISON = True
    if _ext.HAS_C:
        torch.ops.dwsep._set_debug_poison(True)
    try:
        yield
    finally:
        ops._POISON = False
        if _ext.HAS_C:
            torch.ops.dwsep._set_debug_poison(False)
