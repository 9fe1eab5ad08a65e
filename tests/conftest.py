import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter. This must be decided
# before triton is imported (dwsep imports it lazily, on first use of the triton backend).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
