"""Triton kernels for dwsep: one module per op family and direction. Each launcher takes its
inputs and preallocated outputs and writes every output element; autograd and allocation live
in ``dwsep`` (``dwsep/_triton_ops.py``). Import with ``TRITON_INTERPRET=1`` set beforehand to run
on CPU tensors in the Triton interpreter."""

from .bn_act import bn_act

__all__ = ["bn_act"]
