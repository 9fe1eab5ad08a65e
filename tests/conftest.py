import os
import time

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter. This must be decided
# before triton is imported (dwsep imports it lazily, on first use of the triton backend).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU every Triton launch would otherwise compile and time every autotune config of a
    # new shape (minutes over the suite): the tests run the first config the pruning keeps, and
    # tests/test_triton_configs.py runs every config. DWSEP_TRITON_AUTOTUNE=1 restores tuning.
    os.environ.setdefault("DWSEP_TRITON_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 is tested exact: TF32 off for convolutions (the switch the cuda and triton backends
    follow, as cuDNN does) and matmuls. Tests of TF32 switch it on themselves."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = False
    matmul.allow_tf32 = False
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = saved


# DWSEP_TEST_LOG=FILE appends one line per test as it finishes (outcome, seconds, node id) and
# the full report of every failure, so a run cut off by a time limit (bench/gpu_check.sh) still
# says what failed and why. Written by the xdist controller only, which sees every report.
_LOG = os.environ.get("DWSEP_TEST_LOG")


def pytest_runtest_logreport(report):
    if not _LOG or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    failed = report.failed or (report.when == "call" and report.outcome == "failed")
    if report.when != "call" and not failed:
        return
    with open(_LOG, "a") as f:
        stamp = time.strftime("%H:%M:%S")
        f.write(f"{stamp} {report.outcome.upper():7s} {report.duration:7.2f}s {report.nodeid}")
        f.write(f" [{report.when}]\n" if report.when != "call" else "\n")
        if failed:
            f.write("-" * 100 + "\n" + str(report.longreprtext)[-6000:] + "\n" + "-" * 100 + "\n")
