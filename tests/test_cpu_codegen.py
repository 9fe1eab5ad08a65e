"""The built CPU kernels' machine code: what the compiler must not drop.

GCC 12 removed the loops of ``__builtin_prefetch`` calls from several channels_last depthwise
kernels as dead code, silently: the in-place forward ran 1.25x slower with its input read from
memory, with every test passing (bench/NOTES.md, session 19). ``prefetch_span`` now issues the
prefetch as an ``asm volatile`` statement on x86; this test disassembles the extension and checks
that each kernel that prefetches has a prefetch instruction in its code.
"""

from __future__ import annotations

import collections
import platform
import re
import shutil
import subprocess

import pytest

# Kernel families (demangled-name fragments) that prefetch their input rows; each must hold at
# least one prefetch instruction in the functions bearing its name (the kernel, or the lambdas
# that at::parallel_for runs, where the loops end up after inlining).
PREFETCHING_KERNELS = [
    # the in-place stride-1 forward (NhwcInPlace::prefetch)
    "dw_fwd_nhwc_pixels<float, 1, 2, dwsep::cpu::NhwcInPlace<float, 1> >",
    # the ring forward (NhwcRows::ready), fp16 (staged tiles)
    "dw_fwd_nhwc<c10::Half, 2, 2>",
    # statistics that also store z, the backward's reduction and the backward
    "dw_stats_nhwc<float, 1, true>",
    "dw_bwd_reduce_nhwc<float, 1, 2>",
    "dw_bwd_nhwc<float, 1, 2>",
]


@pytest.fixture(scope="module")
def prefetch_counts() -> dict[str, int]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"x86 only (this machine: {platform.machine()})")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump")
    try:
        import dwsep._C as ext
    except ImportError as e:
        pytest.skip(f"dwsep._C not built: {e}")
    res = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", ext.__file__],
        capture_output=True,
        text=True,
        check=True,
    )
    counts: dict[str, int] = collections.Counter()
    current = None
    for line in res.stdout.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            current = m.group(1)
            counts.setdefault(current, 0)
        elif current is not None and "prefetch" in line:
            counts[current] += 1
    return counts


@pytest.mark.parametrize("kernel", PREFETCHING_KERNELS)
def test_cpu_prefetch_emitted(prefetch_counts, kernel):
    functions = {name: n for name, n in prefetch_counts.items() if kernel in name}
    assert functions, f"no function named like {kernel!r} in the extension"
    assert sum(functions.values()) > 0, (
        f"{kernel}: no prefetch instruction in {len(functions)} function(s): the compiler dropped "
        "prefetch_span's prefetches"
    )
