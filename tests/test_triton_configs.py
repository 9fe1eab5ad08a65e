"""Every autotune config of every Triton kernel computes the right answer (GPU only).

The rest of the suite runs on a GPU with ``DWSEP_TRITON_AUTOTUNE=0`` (the first config the
pruning keeps, see tests/conftest.py), and autotuning may pick any config for a user's shape, so
here every autotuner in ``kernels_triton`` is pinned to its i-th config in turn (the last one
where it has fewer) and the fused ops are checked against the float64 reference: outputs,
running statistics and every gradient, in training and eval, on shapes that leave every tile
ragged."""

from __future__ import annotations

import pytest
import torch
from op_harness import pinned_triton_configs, run_and_compare

import dwsep

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CASES = [
    # op, x shape, cout, stride
    ("depthwise", (2, 40, 13, 11), None, 1),
    ("depthwise", (2, 40, 13, 11), None, 2),
    ("pointwise", (2, 40, 9, 7), 72, 1),
]
# channels_last with bf16 (the deployment case), NCHW with fp32 (the exact one)
LAYOUT_DTYPES = [("channels_last", torch.bfloat16), ("contiguous", torch.float32)]


def _tuners() -> list:
    if not torch.cuda.is_available() or dwsep.backends.triton_version() is None:
        return []
    from triton.runtime.autotuner import Autotuner

    import kernels_triton
    from kernels_triton import depthwise_bwd, depthwise_fwd, pointwise_bwd, pointwise_fwd

    found = {}
    for mod in (kernels_triton, depthwise_fwd, depthwise_bwd, pointwise_fwd, pointwise_bwd):
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                found[id(obj)] = obj
    return list(found.values())


def _config_count() -> int:
    return max((len(t.configs) for t in _tuners()), default=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("index", range(_config_count()))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("layout", "dtype"), LAYOUT_DTYPES, ids=["nhwc-bf16", "nchw-fp32"])
@pytest.mark.parametrize(("op", "shape", "cout", "stride"), CASES, ids=["dw-s1", "dw-s2", "pw"])
def test_every_config(op, shape, cout, stride, layout, dtype, training, index):
    if dwsep.backends.triton_version() is None:
        pytest.skip("triton is not installed")
    pins = {t: t.configs[min(index, len(t.configs) - 1)] for t in _tuners()}
    with pinned_triton_configs(pins):
        run_and_compare(
            op,
            "triton",
            "cuda",
            dtype,
            shape,
            cout=cout,
            stride=stride,
            layout=layout,
            training=training,
        )
