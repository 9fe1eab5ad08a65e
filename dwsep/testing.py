"""Test utilities shared by the test suite and the benchmarks: the tolerance table, the
error metric, the float64 oracle and the (backend, device) cases that can run here."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends, reference

# Norm-wise relative error ||out - ref|| / ||ref|| allowed per dtype (DESIGN.md section 6).
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}
GRAD_TOLERANCES = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
TF32_TOLERANCE = 1e-3


def rel_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has a NaN/inf where ref is finite."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape mismatch: {tuple(out64.shape)} vs {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return math.inf
    num = torch.linalg.vector_norm(out64 - ref64).item()
    den = torch.linalg.vector_norm(ref64).item()
    if den == 0.0:
        return num
    return num / den


def assert_close(
    out: Tensor,
    ref: Tensor,
    tol: float,
    what: str = "",
    scale: float = 0.0,
) -> None:
    """Norm-wise relative check, ||out - ref|| <= tol * max(||ref||, scale); NaN never passes.

    ``scale`` is the typical magnitude of the result for reductions whose exact value can be far
    smaller than their terms (a weight gradient that cancels under train-mode BN, e.g. a
    1-input-channel pointwise conv): there, rounding the stored operands to the storage dtype
    perturbs the result at the size of its terms, not of its exact value."""
    err = rel_error(out, ref)
    if err <= tol:
        return
    diff = torch.linalg.vector_norm(out.detach().double().cpu() - ref.detach().double().cpu())
    if math.isfinite(err) and diff.item() <= tol * scale:
        return
    raise AssertionError(
        f"{what}: relative error {err:.3e} > tolerance {tol:.1e}"
        + (f" (absolute {diff.item():.3e} > {tol:.1e} x scale {scale:.3e})" if scale else "")
    )


def kernel_cases(include_torch: bool = False) -> list[tuple[str, str]]:
    """(backend, device) pairs the op tests cover; unavailable ones are kept (the tests skip
    them with the reason from :func:`skip_reason`)."""
    cases = [("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]
    if include_torch:
        cases += [("torch", "cpu"), ("torch", "cuda")]
    return cases


def skip_reason(backend: str, device: str) -> Optional[str]:
    """Why (backend, device) cannot run here, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return backends._why_unavailable(backend, torch.device(device))


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """Dtypes a backend is tested with on a device. The Triton interpreter has no real bf16."""
    if backend == "triton" and device == "cpu":
        return [torch.float64, torch.float32, torch.float16]
    return [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def reference_f64(
    op: str, x: Tensor, weight: Tensor, bn: dict, requires_grad: bool = False, **kwargs
) -> tuple[Tensor, dict]:
    """Run the reference op in float64 on copies of the (already rounded) inputs.

    ``x`` and ``weight`` are used as given after ``.double()`` (pass float64 leaves to get
    their gradients). Returns the output and the float64 BN tensors: the running stats as
    updated by the op, and the affine parameters as leaves (``requires_grad`` when asked)."""
    fn = {
        "depthwise": reference.depthwise_conv_bn_act,
        "pointwise": reference.pointwise_conv_bn_act,
    }[op]
    bn64 = {k: (None if v is None else v.detach().double().clone()) for k, v in bn.items()}
    for key in ("bn_weight", "bn_bias"):
        if bn64.get(key) is not None:
            bn64[key].requires_grad_(requires_grad)
    y = fn(x.double(), weight.double(), **bn64, **kwargs)
    return y, bn64
