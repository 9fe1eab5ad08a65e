"""Triton kernels for dwsep: one module per op family and direction. Each launcher takes its
inputs and preallocated outputs and writes every output element; autograd and allocation live
in ``dwsep`` (``dwsep/_triton_ops.py``). Import with ``TRITON_INTERPRET=1`` set beforehand to run
on CPU tensors in the Triton interpreter (one pinned small config per kernel there; autotuned
configs on a GPU). ``python -m kernels_triton.aot_check`` compiles every specialization the
launchers can produce for sm_90 and sm_80 without a GPU."""

from .bn_act import bn_act
from .depthwise_bwd import dw_bwd, dw_bwd_reduce
from .depthwise_fwd import dw_fwd, dw_stats
from .pointwise_bwd import pw_bwd, pw_bwd_reduce
from .pointwise_fwd import pw_fwd, pw_fwd_stats

__all__ = [
    "bn_act",
    "dw_bwd",
    "dw_bwd_reduce",
    "dw_fwd",
    "dw_stats",
    "pw_bwd",
    "pw_bwd_reduce",
    "pw_fwd",
    "pw_fwd_stats",
]
