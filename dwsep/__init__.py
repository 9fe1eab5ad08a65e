"""dwsep: fused depthwise-separable convolutions for PyTorch.

Depthwise 3x3 + BatchNorm + ReLU6 and pointwise 1x1 GEMM + BatchNorm + ReLU6, with CUDA,
Triton and C++ CPU kernels behind one API, and a drop-in MobileNetV1.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _ext, functional, nn, ops, reference
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    triton_version,
    use_backend,
)
from .functional import depthwise_conv_bn_act, pointwise_conv_bn_act
from .models import MobileNetV1, mobilenet_v1

__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """What this installation has: versions, whether the CUDA kernels were compiled in, the
    backends that can run here, and for each CUDA device its compute capability and why a GPU
    backend cannot run there (``gpus``; empty without CUDA)."""
    from .backends import gpu_info

    return {
        "dwsep": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": _ext.HAS_C,
        "extension_error": _ext.LOAD_ERROR,
        "cuda_compiled": _ext.CUDA_COMPILED,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "triton": triton_version(),
        "backends": available_backends(),
        "backend": get_backend(),
        "gpus": gpu_info(),
    }


__all__ = [
    "BackendUnavailableError",
    "MobileNetV1",
    "available_backends",
    "build_info",
    "depthwise_conv_bn_act",
    "functional",
    "get_backend",
    "mobilenet_v1",
    "nn",
    "ops",
    "pointwise_conv_bn_act",
    "reference",
    "set_backend",
    "use_backend",
]
