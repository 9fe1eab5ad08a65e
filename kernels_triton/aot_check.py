"""Ahead-of-time compile check of the Triton kernels for NVIDIA GPUs, without a GPU.

Every launcher in ``kernels_triton`` is run on ``meta`` tensors (shapes, strides and dtypes, no
data), with outputs allocated by dwsep's own fake implementations, for a set of scenarios:
each dtype, layout (NCHW, channels_last, and a non-dense input, which the launchers make dense
NCHW while dwsep allocates channels_last outputs), stride, activation, use_z, TF32 switch and
problem size (including tensors of 2^31 elements and more, which select the 64-bit-index
kernels, and sizes that prune the autotune configs down to their fallbacks). The launches are
recorded instead of run: an autotuned launch is expanded into every config that the
autotuner's own ``prune_configs`` keeps for those arguments, and Triton's JIT binder computes
the specialization (argument types, constexprs, unit-value and divisibility specializations)
as on a GPU launch. Each distinct specialization is compiled with ``triton.compile`` for a
``GPUTarget`` (sm_90, sm_80): the front end, the MLIR and LLVM pipelines and ptxas, down to a
cubin. ptxas's ``-v`` report gives the register and spill counts (``CompiledKernel.n_regs`` and
``n_spills`` are only filled in when a GPU loads the cubin), the compile metadata the shared
memory.

Failures: a compile error, or a launch none of whose configs fits in the target's shared
memory (the autotuner skips a config that does not fit, and the launch fails when none does;
see shared_memory_failures()). Configs over the limit are listed, as are configs that spill.

Selection (``--coverage``): ``full`` compiles every recorded specialization; ``pairwise`` a
subset, chosen greedily, that still covers for every kernel every (dtype, tile config),
(layout, tile config) and (dtype, layout) pair, every value of every other constexpr with
every dtype, every pair of values of two such constexprs, and every argument type signature
with every dtype; ``smoke`` every tile config, dtype, layout and constexpr value once per
kernel. Both also compile, per dtype, the smallest config (witness()) of every autotuned
launch, so that the shared-memory check knows a config of each launch; ``smoke`` after a
previous target only for the kernels that used more than a quarter of this target's shared
memory there.

Must run with ``TRITON_INTERPRET`` unset or 0: the launchers read it at import and pick their
interpreter configs otherwise. Compiled kernels go to a temporary Triton cache, removed at the
end. Command line: ``python -m kernels_triton.aot_check --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError(
        "kernels_triton.aot_check compiles for a GPU target: run it with TRITON_INTERPRET unset"
    )
# Every config the pruning keeps is compiled, whatever a test run set for itself.
os.environ["DWSEP_TRITON_AUTOTUNE"] = "1"

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import depthwise_bwd, depthwise_fwd, pointwise_bwd, pointwise_fwd
from .bn_act import bn_act as _bn_act

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}

# Largest shared memory a block may use (the opt-in maximum that Triton checks at load time).
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


# --------------------------------------------------------------------------------------------
# Recording launches


@dataclass
class Launch:
    """One kernel launch as a launcher made it (after autotune expansion): the JIT function,
    its positional and keyword arguments, the autotune config (None when not autotuned), the
    labels of the scenario that produced it, and the configs the autotuner would try for that
    call ((None,) when not autotuned)."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    config: Any
    labels: dict
    group_configs: tuple


class _Recorder:
    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.labels: dict = {}
        self.config = None
        self.group_configs = (None,)


@contextlib.contextmanager
def record_launches():
    """Within the block, ``kernel[grid](...)`` records a :class:`Launch` instead of compiling
    and running. An autotuned kernel is expanded into every config its ``prune_configs`` keeps
    (Triton's own pruning, with the launch's arguments); heuristics, if any, run as usual."""
    rec = _Recorder()
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        labels = dict(rec.labels)
        rec.launches.append(Launch(self, args, kwargs, rec.config, labels, rec.group_configs))

    def record_tuner(self, *args, **kwargs):
        configs = self.configs
        if len(configs) > 1:  # as Autotuner.run: a single config is used without pruning
            self.nargs = dict(zip(self.arg_names, args))
            meta = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            try:
                configs = self.prune_configs(meta)
            finally:
                self.nargs = None
        rec.group_configs = tuple(configs)
        try:
            for cfg in configs:
                rec.config = cfg
                self.fn.run(*args, **kwargs, **cfg.all_kwargs())
        finally:
            rec.config, rec.group_configs = None, (None,)

    JITFunction.run, Autotuner.run = record_jit, record_tuner
    try:
        yield rec
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


# --------------------------------------------------------------------------------------------
# Scenarios: the launchers called the way the dwsep_triton ops call them, with the outputs
# allocated by dwsep's own fake implementations (dwsep.ops.FAKES: outputs in the input's dtype
# and memory format, per-channel vectors in the accumulation dtype) and grad_y made contiguous
# in y's memory format, as the autograd Functions do.


def _ops():
    from dwsep import _validation, ops

    return ops, _validation.memory_format


def _x(shape, dtype, layout: str) -> torch.Tensor:
    """The input in a layout: "nchw", "nhwc" (channels_last), or "mixed": a non-dense input
    with channels innermost, which the launchers make dense (NCHW) while dwsep allocates the
    outputs channels_last."""
    if layout == "mixed":
        n, c, h, w = shape
        big = torch.empty((n, c, h, w + 1), dtype=dtype, device="meta")
        return big.to(memory_format=torch.channels_last)[..., :w]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


LAYOUTS = ("nchw", "nhwc", "mixed")

# (N, C, H, W) of the depthwise input; "i64" has 2^31+ elements (64-bit index kernels), "c1"
# one channel (C specialized to 1), "small" fewer channels than the narrowest wide tile.
DW_SIZES = {
    "main": (2, 96, 14, 14),
    "small": (2, 8, 9, 9),
    "c1": (2, 1, 7, 7),
    "i64": (1, 64, 5800, 5800),
}
# (N, Cin, H, W, Cout) of the pointwise input: "main" has >= 4096 rows (statistics tile 128),
# "small" fewer (tile 64) and channel counts below every tile, "n1" one image (batch 1 NCHW)
# and 17-32 input channels (only the BN=32 tiles).
PW_SIZES = {
    "main": (2, 96, 48, 48, 160),
    "small": (2, 3, 8, 8, 17),
    "n1": (1, 24, 7, 7, 40),
    "i64": (1, 64, 5800, 5800, 32),
}


@contextlib.contextmanager
def _tf32(enabled: bool):
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_tf32
    matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32 = old


def _dw_case(op, dtype, layout, size, stride, act, use_z):
    ops, memory_format = _ops()
    fake = ops.FAKES
    n, c, h, w = DW_SIZES[size]
    x = _x((n, c, h, w), dtype, layout)
    wt = torch.empty((c, 1, 3, 3), dtype=dtype, device="meta")
    mean, var = fake["dw_stats"](x, wt, stride)  # (C,) in the accumulation dtype
    if op == "dw_stats":
        depthwise_fwd.dw_stats(x, wt, stride, mean, var)
        return
    y = fake["dw_fwd"](x, wt, mean, var, stride, act)
    if op == "dw_fwd":
        depthwise_fwd.dw_fwd(x, wt, mean, var, stride, act, y)
        return
    gy = torch.empty_like(y).contiguous(memory_format=memory_format(y))
    if op == "dw_bwd_reduce":
        s_gz, s_gzx = fake[op](gy, y, x, wt, mean, var, stride, act)
        depthwise_bwd.dw_bwd_reduce(gy, y, x, wt, mean, var, stride, act, s_gz, s_gzx)
    elif op == "dw_bwd":
        k, b, cc = mean, var, torch.empty_like(mean)
        gx, gw = fake[op](gy, y, x, wt, k, b, cc, stride, act, use_z)
        depthwise_bwd.dw_bwd(gy, y, x, wt, k, b, cc, stride, act, use_z, gx, gw)
    else:
        raise ValueError(op)


def _pw_case(op, dtype, layout, size, act):
    ops, memory_format = _ops()
    fake = ops.FAKES
    n, cin, h, w, cout = PW_SIZES[size]
    x = _x((n, cin, h, w), dtype, layout)
    wt = torch.empty((cout, cin), dtype=dtype, device="meta")
    z, mean, var = fake["pw_fwd_stats"](x, wt)
    if op == "pw_fwd_stats":
        pointwise_fwd.pw_fwd_stats(x, wt, z, mean, var)
        return
    if op == "pw_fwd":
        pointwise_fwd.pw_fwd(x, wt, mean, var, act, fake[op](x, wt, mean, var, act))
        return
    if op == "bn_act":
        _bn_act(z, mean, var, act, fake[op](z, mean, var, act))
        return
    gy = torch.empty_like(z).contiguous(memory_format=memory_format(z))
    vec = [torch.empty_like(mean) for _ in range(5)]
    if op == "pw_bwd_reduce":
        s_gz, s_gzx = fake[op](gy, z, *vec[:4], act)
        pointwise_bwd.pw_bwd_reduce(gy, z, *vec[:4], act, s_gz, s_gzx)
    elif op in ("pw_bwd", "pw_bwd_fused"):
        gx, gw = fake["pw_bwd"](gy, z, x, wt, *vec, act)
        mode = "fused" if op == "pw_bwd_fused" else "materialize"
        pointwise_bwd.pw_bwd(gy, z, x, wt, *vec, act, gx, gw, g_mode=mode)
    else:
        raise ValueError(op)


DW_OPS = ("dw_fwd", "dw_stats", "dw_bwd_reduce", "dw_bwd")
PW_OPS = ("pw_fwd", "pw_fwd_stats", "bn_act", "pw_bwd_reduce", "pw_bwd", "pw_bwd_fused")
_DW_ACT = {"dw_fwd", "dw_bwd_reduce", "dw_bwd"}
_PW_ACT = {"pw_fwd", "bn_act", "pw_bwd_reduce", "pw_bwd", "pw_bwd_fused"}
_GEMM = {"pw_fwd", "pw_fwd_stats", "pw_bwd", "pw_bwd_fused"}


def scenarios() -> list[tuple[dict, Callable[[], None]]]:
    """(labels, call) pairs: each call runs one launcher on meta tensors. Every dtype with
    every layout, stride (1, 2), activation (none, relu, relu6), use_z and TF32 setting, on a
    main problem size and on the 2^31-element size; the edge sizes with the default settings."""
    out = []

    def add(labels, fn, *a):
        out.append((labels, lambda: fn(*a)))

    for dtype, op in itertools.product(DTYPES, DW_OPS):
        dn = DTYPE_NAMES[dtype]
        acts = (0, 1, 2) if op in _DW_ACT else (2,)
        use_zs = (False, True) if op == "dw_bwd" else (True,)
        for size in DW_SIZES:
            edge = size not in ("main", "i64")
            layouts = ("nchw", "nhwc") if edge else LAYOUTS
            for layout, stride, act, use_z in itertools.product(layouts, (1, 2), acts, use_zs):
                if (edge or layout == "mixed") and (act != 2 or not use_z):
                    continue
                labels = {"op": op, "dtype": dn, "layout": layout, "size": size}
                add(labels, _dw_case, op, dtype, layout, size, stride, act, use_z)
    for dtype, op in itertools.product(DTYPES, PW_OPS):
        dn = DTYPE_NAMES[dtype]
        acts = (0, 1, 2) if op in _PW_ACT else (2,)
        tf32s = (False, True) if dtype == torch.float32 and op in _GEMM else (False,)
        for size in PW_SIZES:
            edge = size not in ("main", "i64")
            layouts = ("nchw", "nhwc") if edge else LAYOUTS
            for layout, act, tf32 in itertools.product(layouts, acts, tf32s):
                if (edge or layout == "mixed") and act != 2:
                    continue
                labels = {"op": op, "dtype": dn, "layout": layout, "size": size}

                def call(op=op, dtype=dtype, layout=layout, size=size, act=act, tf32=tf32):
                    with _tf32(tf32):
                        _pw_case(op, dtype, layout, size, act)

                out.append((labels, call))
    return out


def record_all() -> list[Launch]:
    """Every launch that the scenarios make."""
    with record_launches() as rec:
        for labels, call in scenarios():
            rec.labels = labels
            call()
    return rec.launches


# --------------------------------------------------------------------------------------------
# Specializations and compile jobs


@dataclass(eq=False)
class Job:
    """One distinct compilation: a kernel specialization for one target, with the features
    (coverage items) of every launch that produces it."""

    kernel: JITFunction
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str
    features: set = field(default_factory=set)
    labels: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.__name__


def _cfg_name(cfg) -> str:
    if cfg is None:
        return "-"
    kw = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{kw},w{cfg.num_warps},s{cfg.num_stages}"


def _value_name(v) -> str:
    return str(v) if not isinstance(v, triton.language.dtype) else v.name


_BINDERS: dict = {}
_BACKENDS: dict = {}


def _backend(arch: int):
    if arch not in _BACKENDS:
        _BACKENDS[arch] = make_backend(GPUTarget("cuda", arch, 32))
    return _BACKENDS[arch]


def specialize(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) of a launch for sm_<arch>, computed by the JIT's
    own binder and argument packing, as JITFunction.run does before compiling."""
    fn = launch.kernel
    backend = _backend(arch)
    key = (id(fn), arch)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    bound, spec, options = _BINDERS[key](*launch.args, **kwargs)
    # Private API (triton 3.x): the packing that JITFunction.run feeds to triton.compile.
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def _features(launch: Launch, signature: dict, constexprs: dict, coverage: str) -> set:
    """Coverage items of a launch (see the module docstring); every item names the kernel."""
    k = launch.kernel.__name__
    dt, lay = launch.labels["dtype"], launch.labels["layout"]
    tile = set(launch.config.kwargs) if launch.config is not None else set()
    names = launch.kernel.arg_names
    cfg = _cfg_name(launch.config)
    # Non-tile constexprs, including arguments specialized to a value (unit strides, C == 1).
    cx = sorted(
        (names[i[0]], _value_name(v))
        for i, v in constexprs.items()
        if len(i) == 1 and names[i[0]] not in tile
    )
    types = tuple(v for v in signature.values() if v != "constexpr")
    if coverage == "smoke":
        items = {("cfg", cfg), ("dtype", dt), ("layout", lay)}
        items |= {("cx", n, v) for n, v in cx}
    else:
        items = {("cfg", dt, cfg), ("cfg-layout", lay, cfg), ("layout", dt, lay)}
        items |= {("cx", dt, n, v) for n, v in cx}
        items |= {("cx2", a, b) for a, b in itertools.combinations(cx, 2)}
        items |= {("sig", dt, types)}
    if launch.config is not None and launch.config is witness(launch.group_configs):
        items.add(("fit", dt, cfg))
    return {(k, *item) for item in items}


def witness(configs) -> Any:
    """The config of an autotuned launch most likely to fit in shared memory: the smallest
    product of integer tile parameters and stages (then fewest stages, warps, by name). Every
    selection compiles it, for the shared-memory check of run()."""

    def size(cfg):
        ints = [v for v in cfg.kwargs.values() if isinstance(v, int) and not isinstance(v, bool)]
        return math.prod(ints) * cfg.num_stages, cfg.num_stages, cfg.num_warps, _cfg_name(cfg)

    return min(configs, key=size) if configs and configs[0] is not None else None


def _key(signature, constexprs, attrs, options) -> str:
    return repr(
        (
            sorted(signature.items()),
            sorted((k, _value_name(v)) for k, v in constexprs.items()),
            sorted(attrs.items()),
            sorted((k, repr(v)) for k, v in options.__dict__.items()),
        )
    )


def specializations(
    launches: list[Launch], arch: int, coverage: str = "full", fit_kernels=None
) -> list[Job]:
    """Distinct specializations of the launches for sm_<arch>, each with the coverage features
    of its launches. The shared-memory witness features are left out for kernels not in
    fit_kernels (None: all kernels)."""
    jobs: dict[tuple, Job] = {}
    for launch in launches:
        signature, constexprs, attrs, options = specialize(launch, arch)
        key = (launch.kernel.__name__, _key(signature, constexprs, attrs, options))
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = Job(
                launch.kernel,
                arch,
                signature,
                constexprs,
                attrs,
                dict(options.__dict__),
                _cfg_name(launch.config),
            )
        job.labels.append(launch.labels)
        feats = _features(launch, signature, constexprs, coverage)
        if fit_kernels is not None and job.name not in fit_kernels:
            feats = {f for f in feats if f[1] != "fit"}
        job.features |= feats
    return list(jobs.values())


def make_jobs(
    launches: list[Launch], arch: int, coverage: str = "full", fit_kernels=None
) -> list[Job]:
    """The specializations to compile for sm_<arch>: all of them for "full" coverage, else a
    greedy subset that covers every feature of every launch."""
    jobs = specializations(launches, arch, coverage, fit_kernels)
    return jobs if coverage == "full" else _greedy_cover(jobs)


def _greedy_cover(jobs: list[Job]) -> list[Job]:
    """A small subset of the jobs that covers every feature, per kernel: features are taken
    rarest first (fewest jobs have them), each uncovered one by the job that has it and covers
    the most uncovered features (ties: the first); then chosen jobs whose features the others
    cover are dropped. Returns the chosen jobs in their original order."""
    keep = set()
    by_kernel = defaultdict(list)
    for i, job in enumerate(jobs):
        by_kernel[job.name].append(i)
    for idx in by_kernel.values():
        having = defaultdict(list)
        for i in idx:
            for f in jobs[i].features:
                having[f].append(i)
        uncovered = set(having)
        picked = []
        for f in sorted(having, key=lambda f: (len(having[f]), repr(f))):
            if f in uncovered:
                best = max(having[f], key=lambda i: len(jobs[i].features & uncovered))
                picked.append(best)
                uncovered -= jobs[best].features
        count = defaultdict(int)
        for i in picked:
            for f in jobs[i].features:
                count[f] += 1
        for i in reversed(picked[:]):
            if all(count[f] > 1 for f in jobs[i].features):
                picked.remove(i)
                for f in jobs[i].features:
                    count[f] -= 1
        keep.update(picked)
    return [job for i, job in enumerate(jobs) if i in keep]


# --------------------------------------------------------------------------------------------
# Compiling


@dataclass
class Result:
    """Outcome of one job: error is None on success; regs and spills from ptxas -v, shared
    memory (bytes) from the compile metadata."""

    index: int
    error: str | None
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    seconds: float = 0.0
    cpu_seconds: float = 0.0


_JOBS: list[Job] = []  # read by the pool workers (fork)

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(index: int) -> Result:
    """Compiles _JOBS[index] to a cubin; never raises."""
    job = _JOBS[index]
    t0, c0 = time.perf_counter(), _cpu_time()
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        src = ASTSource(job.kernel, job.signature, job.constexprs, job.attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src, target=GPUTarget("cuda", job.arch, 32), options=job.options
            )
    except Exception as exc:
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return Result(
            index,
            msg[-4000:] or type(exc).__name__,
            seconds=time.perf_counter() - t0,
            cpu_seconds=_cpu_time() - c0,
        )
    text = log.getvalue()
    entry = text.find(f"Compiling entry function '{compiled.metadata.name}'")
    text = text[max(entry, 0) :]
    regs = _REGS.search(text)
    spills = _SPILLS.search(text)
    return Result(
        index,
        None,
        int(regs.group(1)) if regs else -1,
        int(spills.group(1)) if spills else -1,
        int(spills.group(2)) if spills else -1,
        int(compiled.metadata.shared),
        time.perf_counter() - t0,
        _cpu_time() - c0,
    )


def _cpu_time() -> float:
    """CPU seconds of this process and its finished children (ptxas)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compile_all(jobs: list[Job], workers: int = 2, progress: bool = False) -> list[Result]:
    """Compiles the jobs (in a fork-based process pool when workers > 1) into a fresh
    temporary Triton cache."""
    global _JOBS
    _JOBS = jobs
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as cache:
        old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            if workers <= 1:
                results = []
                for i in range(len(jobs)):
                    results.append(compile_job(i))
                    if progress:
                        _progress(len(results), len(jobs))
                return results
            import multiprocessing as mp

            ctx = mp.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                results = []
                for r in pool.map(compile_job, range(len(jobs)), chunksize=1):
                    results.append(r)
                    if progress:
                        _progress(len(results), len(jobs))
                return results
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old


def _progress(done: int, total: int) -> None:
    if done % 25 == 0 or done == total:
        print(f"  compiled {done}/{total}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Report


def _job_dtype(job: Job) -> str:
    return ",".join(
        sorted({lab["dtype"] for lab in job.labels}, key=list(DTYPE_NAMES.values()).index)
    )


def summary_rows(jobs: list[Job], results: list[Result], arch: int) -> list[dict]:
    """Per (kernel, dtype) on sm_<arch>: jobs compiled, register range, largest spill stores
    and loads, largest shared memory, and the config with the most registers."""
    groups = defaultdict(list)
    for job, res in zip(jobs, results):
        if job.arch == arch and res.error is None:
            for dt in sorted({lab["dtype"] for lab in job.labels}):
                groups[(job.name, dt)].append((job, res))
    order = list(DTYPE_NAMES.values())
    rows = []
    for (name, dt), items in sorted(
        groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))
    ):
        top = max(items, key=lambda it: it[1].regs)
        rows.append(
            {
                "kernel": name,
                "dtype": dt,
                "n": len(items),
                "regs_min": min(r.regs for _, r in items),
                "regs_max": top[1].regs,
                "spill_st": max(r.spill_stores for _, r in items),
                "spill_ld": max(r.spill_loads for _, r in items),
                "smem_max": max(r.shared for _, r in items),
                "max_regs_cfg": top[0].config,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of summary_rows."""
    head = ["kernel", "dtype", "n", "regs", "spill st/ld B", "smem B", "most regs at"]
    body = [
        [
            r["kernel"],
            r["dtype"],
            str(r["n"]),
            f"{r['regs_min']}-{r['regs_max']}",
            f"{r['spill_st']}/{r['spill_ld']}",
            str(r["smem_max"]),
            r["max_regs_cfg"],
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def shared_memory_failures(launches, jobs, results, archs) -> list[str]:
    """Autotuned launches none of whose configs fits in the target's shared memory (Triton's
    autotuner skips a config that does not fit, and fails when none does), and non-autotuned
    launches that do not fit. A config's shared memory is taken as the largest over the
    compiled jobs of its kernel, dtype and config; a launch passes when one of its configs is
    known to fit, fails when its witness (see witness()) does not fit and no other config is
    known to fit."""
    est: dict = {}
    for job, res in zip(jobs, results):
        if res.error is None:
            for dt in {lab["dtype"] for lab in job.labels}:
                key = (job.arch, job.name, dt, job.config)
                est[key] = max(est.get(key, 0), res.shared)
    seen, out = set(), []
    for launch in launches:
        name, dt = launch.kernel.__name__, launch.labels["dtype"]
        cfgs = tuple(_cfg_name(c) for c in launch.group_configs)
        for arch in archs:
            if (arch, name, dt, cfgs) in seen:
                continue
            seen.add((arch, name, dt, cfgs))
            limit = SMEM_LIMIT[arch]
            known = [est.get((arch, name, dt, c)) for c in cfgs]
            if any(v is not None and v <= limit for v in known):
                continue
            wit = _cfg_name(witness(launch.group_configs))
            if est.get((arch, name, dt, wit)) is None and any(v is None for v in known):
                continue  # nothing known (a compile error, reported on its own)
            sizes = ", ".join(f"{c}: {v if v is not None else '?'} B" for c, v in zip(cfgs, known))
            out.append(
                f"SHARED MEMORY sm_{arch} {name} [{dt}] {launch.labels}: no config fits in "
                f"{limit} B ({sizes})"
            )
    return out


def _describe(job: Job) -> str:
    names = job.kernel.arg_names
    cx = ", ".join(
        f"{names[i[0]]}={_value_name(v)}" for i, v in job.constexprs.items() if len(i) == 1
    )
    sizes = sorted({lab["size"] for lab in job.labels})
    return (
        f"{job.name} sm_{job.arch} [{_job_dtype(job)}] w{job.options['num_warps']} "
        f"s{job.options['num_stages']} {cx} (sizes {','.join(sizes)})"
    )


def run(
    archs=(90, 80),
    coverage: dict | None = None,
    workers: int = 2,
    json_path: str | None = None,
    progress: bool = False,
    kernels: str | None = None,
    dtypes=None,
) -> int:
    """Records, selects, compiles and reports; returns the number of failures (compile errors,
    and launches with no config that fits in the target's shared memory). kernels (a regular
    expression searched in the kernel name) and dtypes ("fp16", ...) restrict the launches."""
    coverage = coverage or {90: "pairwise", 80: "smoke"}
    t0 = time.perf_counter()
    launches = [
        launch
        for launch in record_all()
        if (not kernels or re.search(kernels, launch.kernel.__name__))
        and (not dtypes or launch.labels["dtype"] in dtypes)
    ]
    jobs, results, t_rec, t_comp = [], [], time.perf_counter() - t0, 0.0
    for arch in archs:
        t1 = time.perf_counter()
        mode = coverage.get(arch, "full")
        fit = None
        if mode == "smoke" and results:
            # Witness configs only for kernels whose shared memory matters on this target.
            fit = {j.name for j, r in zip(jobs, results) if r.shared > SMEM_LIMIT[arch] // 4}
        every = specializations(launches, arch, mode, fit)
        sel = every if mode == "full" else _greedy_cover(every)
        print(
            f"sm_{arch}: {len(sel)} of {len(every)} distinct specializations ({mode} coverage) "
            f"from {len(launches)} launches",
            flush=True,
        )
        t2 = time.perf_counter()
        results += compile_all(sel, workers, progress)
        jobs += sel
        t_rec += t2 - t1
        t_comp += time.perf_counter() - t2
    failures = [
        f"COMPILE ERROR {_describe(job)}:\n    {res.error}"
        for job, res in zip(jobs, results)
        if res.error is not None
    ]
    failures += shared_memory_failures(launches, jobs, results, archs)
    for arch in archs:
        rows = summary_rows(jobs, results, arch)
        if rows:
            print(f"\nsm_{arch}: registers, spills (bytes) and shared memory (bytes)")
            print(format_table(rows))
    spilled = [
        (job, res) for job, res in zip(jobs, results) if res.error is None and res.spill_stores > 0
    ]
    over = sorted(
        {
            (job.arch, job.name, dt, job.config, res.shared)
            for job, res in zip(jobs, results)
            if res.error is None and res.shared > SMEM_LIMIT[job.arch]
            for dt in {lab["dtype"] for lab in job.labels}
        }
    )
    print(
        f"\nconfigurations over the target's shared memory (the autotuner skips them; a launch "
        f"fails only when all its configs are over, checked below): {len(over)}"
    )
    for arch, name, dt, cfg, shared in over:
        print(f"  OVER sm_{arch} {name} [{dt}] {cfg}: {shared} B > {SMEM_LIMIT[arch]} B")
    print(f"\nconfigurations with spills: {len(spilled)}")
    for job, res in spilled:
        print(f"  SPILLS {res.spill_stores}/{res.spill_loads} B, {res.regs} regs: {_describe(job)}")
    cpu = sum(r.cpu_seconds for r in results)
    print(
        f"\n{len(jobs)} compiled in {t_comp:.0f} s wall, {cpu:.0f} s CPU ({workers} workers; "
        f"recording and selection {t_rec:.1f} s); {len(failures)} failures"
    )
    for line in failures:
        print(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(
                [
                    {
                        "kernel": job.name,
                        "arch": job.arch,
                        "dtypes": _job_dtype(job),
                        "config": job.config,
                        "describe": _describe(job),
                        **{k: v for k, v in vars(res).items() if k != "index"},
                    }
                    for job, res in zip(jobs, results)
                ],
                f,
                indent=1,
            )
    return len(failures)


def main(argv=None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="sm_XX target (repeatable)")
    p.add_argument(
        "--coverage",
        action="append",
        default=[],
        metavar="ARCH=MODE",
        help="full, pairwise or smoke per arch (default 90=pairwise, 80=smoke)",
    )
    p.add_argument("--jobs", type=int, default=2, help="compile processes")
    p.add_argument("--json", help="write per-job results here")
    p.add_argument("--progress", action="store_true", help="report progress on stderr")
    p.add_argument("--kernel", help="only kernels whose name matches this regular expression")
    p.add_argument("--dtype", action="append", choices=list(DTYPE_NAMES.values()))
    a = p.parse_args(argv)
    coverage = {90: "pairwise", 80: "smoke"}
    for item in a.coverage:
        arch, mode = item.split("=")
        coverage[int(arch)] = mode
    archs = tuple(a.arch) if a.arch else (90, 80)
    failures = run(archs, coverage, a.jobs, a.json, a.progress, a.kernel, a.dtype)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
