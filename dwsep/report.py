"""The comparison report behind ``python -m dwsep bench`` (and the building blocks that the
pytest-benchmark suite in ``bench/`` shares with it).

For each of MobileNetV1's 13 depthwise and 13 pointwise layers (``dwsep.shapes``) and each mode
(inference forward, training forward, forward+backward), it times:

* the baselines, measured in the same run on the same inputs:
    ``eager``    ``F.conv2d`` (grouped for depthwise) + ``F.batch_norm`` + ``F.relu6``, with
                 ``cudnn.benchmark = True`` on a GPU;
    ``compile``  ``torch.compile`` of that same eager function (failures are recorded, never
                 fatal);
* ``matmul``: the bare GEMM of each pointwise layer (``torch.matmul``), in inference only;
* each selected dwsep backend (``cuda``, ``triton``, ``cpu``, ``torch``) through
  ``dwsep.functional``.

Each result carries the time per call (median), the speedup against both baselines, the
achieved GB/s and TFLOP/s, the roofline floor and the percentage of it reached, against ceilings
(copy bandwidth, matmul rate) measured at the start of the same run (``dwsep.roofline``), and a
check of the output against eager's (relative error). Then MobileNetV1 throughput (images/s),
dwsep's model against the eager and compiled reference model, when the model is available.

It writes ``report.json``, ``report.md`` and ``report.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import roofline as RL
from .shapes import DepthwiseLayer, PointwiseLayer, mobilenet_v1_layers
from .timing import Timing, bench_fn, rotation_sets

MODES = RL.MODES
BASELINES = ("eager", "compile")
# Model implementations with this suffix replay the inference forward from a CUDA graph.
GRAPH_SUFFIX = "+graph"
# ... and with this one run MobileNetV1.freeze()'s copy (BN folded once) for inference.
FROZEN_SUFFIX = "+frozen"


def model_impl_base(impl: str) -> str:
    """The baseline or backend a model implementation runs (its name without the suffixes)."""
    return impl.removesuffix(GRAPH_SUFFIX).removesuffix(FROZEN_SUFFIX)


# The bare GEMM of a pointwise layer (torch.matmul, i.e. cuBLAS / oneDNN), timed for pointwise
# inference only: the reference for issue 4's "GEMM >= 0.9x torch.matmul" target.
GEMM_REF = "matmul"
REFERENCES = (*BASELINES, GEMM_REF)
BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")
MODEL_MODES = ("inference", "train_step")

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}
_LAYOUTS = {
    "nchw": "nchw",
    "contiguous": "nchw",
    "channels_last": "channels_last",
    "nhwc": "channels_last",
}
# Relative error of a backend's output against eager's, above which the result is flagged.
# Both sides carry rounding (eager fp32 convs use TF32 on GPUs by default), hence the slack over
# the test-suite tolerances against the fp64 reference.
CHECK_TOL = {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype must be one of fp32, fp16, bf16, fp64, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "fp32",
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.float64: "fp64",
    }[dtype]


def parse_layout(name: str) -> str:
    try:
        return _LAYOUTS[name.lower()]
    except KeyError:
        raise ValueError(f"layout must be nchw or channels_last, got {name!r}") from None


def memory_format(layout: str) -> torch.memory_format:
    return (
        torch.channels_last if parse_layout(layout) == "channels_last" else torch.contiguous_format
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:<current>`` (torch.cuda.set_device needs an index)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def default_backends(device: str | torch.device) -> list[str]:
    """Available dwsep backends for ``device``, without Triton's CPU interpreter (its timings
    mean nothing) and without the pure-PyTorch ``torch`` backend unless nothing else runs."""
    import dwsep

    dev = torch.device(device)
    names = [b for b in dwsep.available_backends(dev) if not (b == "triton" and dev.type == "cpu")]
    kernels = [b for b in names if b != "torch"]
    return kernels or names


def why_skip_backend(name: str, device: str | torch.device) -> Optional[str]:
    """A reason not to time ``name`` on ``device``, or None."""
    import dwsep

    dev = torch.device(device)
    if name == "triton" and dev.type == "cpu":
        return "Triton on CPU runs only in its interpreter: its timings are meaningless"
    if name not in dwsep.available_backends(dev):
        from .backends import _why_unavailable

        return f"backend {name!r} is not available here: {_why_unavailable(name, dev)}"
    return None


def _short_error(exc: BaseException, limit: int = 300) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Layer cases (shared with bench/)


def _eager_dw(x, w, rm, rv, g, b, stride: int, training: bool):
    z = F.conv2d(x, w, None, stride, 1, 1, x.shape[1])
    return F.relu6(F.batch_norm(z, rm, rv, g, b, training, 0.1, 1e-5))


def _eager_pw(x, w, rm, rv, g, b, training: bool):
    z = F.conv2d(x, w)
    return F.relu6(F.batch_norm(z, rm, rv, g, b, training, 0.1, 1e-5))


@dataclass
class LayerInputs:
    """Inputs of one (layer, mode) case: ``nsets`` input sets and shared parameters."""

    layer: DepthwiseLayer | PointwiseLayer
    mode: str
    dtype: torch.dtype
    layout: str
    device: torch.device
    weight: Tensor
    bn: tuple[Tensor, Tensor, Tensor, Tensor]  # running_mean, running_var, gamma, beta
    xs: list[Tensor]
    gys: list[Tensor] = field(default_factory=list)

    @property
    def is_dw(self) -> bool:
        return isinstance(self.layer, DepthwiseLayer)

    @property
    def training(self) -> bool:
        return self.mode != "inference"


def output_shape(layer: DepthwiseLayer | PointwiseLayer) -> tuple[int, int, int, int]:
    if isinstance(layer, DepthwiseLayer):
        ho, wo = layer.out_hw
        return (layer.batch, layer.channels, ho, wo)
    return (layer.batch, layer.out_channels, layer.height, layer.width)


def set_bytes(layer, mode: str, dtype: torch.dtype) -> int:
    """Activation bytes one input set holds (x, plus grad_y for fwd_bwd)."""
    e = RL.element_size(dtype)
    n = math.prod(layer.input_shape)
    if mode == "fwd_bwd":
        n += math.prod(output_shape(layer))
    return n * e


def nsets_for(layer, mode: str, dtype: torch.dtype, device) -> int:
    """Input sets to rotate so that together they exceed twice the last-level cache."""
    return rotation_sets(set_bytes(layer, mode, dtype), device)


def make_layer_inputs(
    layer: DepthwiseLayer | PointwiseLayer,
    mode: str,
    dtype: torch.dtype,
    layout: str,
    device: str | torch.device,
    nsets: int = 1,
    seed: int = 0,
) -> LayerInputs:
    """Random inputs (never zeros) for one case; parameters are shared by all input sets."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dev = torch.device(device)
    fmt = memory_format(layout)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0, dt=dtype):
        t = torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32)
        return (t * scale + shift).to(dt)

    if isinstance(layer, DepthwiseLayer):
        c = layer.channels
        weight = randn(c, 1, 3, 3, scale=1.0 / 3.0)
    else:
        c = layer.out_channels
        weight = randn(c, layer.in_channels, 1, 1, scale=1.0 / math.sqrt(layer.in_channels))
    vdt = torch.float64 if dtype == torch.float64 else torch.float32
    rm = randn(c, scale=0.1, dt=vdt)
    rv = (torch.rand(c, generator=gen, device=dev, dtype=torch.float32) + 0.5).to(vdt)
    gamma = randn(c, scale=0.1, shift=1.0, dt=vdt)
    beta = randn(c, scale=0.1, dt=vdt)
    training = mode != "inference"
    xs = []
    for _ in range(nsets):
        x = randn(*layer.input_shape).contiguous(memory_format=fmt)
        xs.append(x.requires_grad_(training))
    gys = []
    if mode == "fwd_bwd":
        gys = [randn(*output_shape(layer)).contiguous(memory_format=fmt) for _ in range(nsets)]
    if training:
        for t in (weight, gamma, beta):
            t.requires_grad_(True)
    return LayerInputs(layer, mode, dtype, parse_layout(layout), dev, weight, (rm, rv, gamma, beta), xs, gys)  # fmt: skip


def _reset_dynamo() -> None:
    try:
        torch._dynamo.reset()
    except Exception:
        pass


def layer_step(inp: LayerInputs, impl: str, compile_mode: str = "default") -> Callable[[int], Any]:
    """``fn(i)``: one call of ``impl`` (``eager``, ``compile`` or a dwsep backend name) in
    ``inp.mode`` on input set ``i``. ``fwd_bwd`` returns the gradients of x, weight, gamma and
    beta (``torch.autograd.grad``: nothing accumulates between calls)."""
    layer = inp.layer
    training = inp.training
    rm, rv, g, b = inp.bn
    w = inp.weight
    if inp.is_dw:
        stride = layer.stride

        def base(x, w, rm, rv, g, b):
            return _eager_dw(x, w, rm, rv, g, b, stride, training)
    else:

        def base(x, w, rm, rv, g, b):
            return _eager_pw(x, w, rm, rv, g, b, training)

    if impl == GEMM_REF:
        return _gemm_step(inp)
    if impl == "eager":
        op = base
    elif impl == "compile":
        _reset_dynamo()
        op = torch.compile(base, mode=None if compile_mode == "default" else compile_mode)
    else:
        import dwsep

        if impl not in BACKEND_NAMES:
            raise ValueError(f"unknown implementation {impl!r}")
        if inp.is_dw:
            fdw = dwsep.functional.depthwise_conv_bn_act
            stride = layer.stride

            def op(x, w, rm, rv, g, b):
                with dwsep.use_backend(impl):
                    return fdw(x, w, rm, rv, g, b, stride=stride, training=training)
        else:
            fpw = dwsep.functional.pointwise_conv_bn_act

            def op(x, w, rm, rv, g, b):
                with dwsep.use_backend(impl):
                    return fpw(x, w, rm, rv, g, b, training=training)

    xs, gys = inp.xs, inp.gys
    if inp.mode == "inference":

        def fn(i):
            with torch.inference_mode():
                return op(xs[i], w, rm, rv, g, b)
    elif inp.mode == "train_fwd":

        def fn(i):
            return op(xs[i], w, rm, rv, g, b)
    else:

        def fn(i):
            y = op(xs[i], w, rm, rv, g, b)
            return torch.autograd.grad(y, (xs[i], w, g, b), gys[i])

    return fn


def _gemm_step(inp: LayerInputs) -> Callable[[int], Any]:
    """The pointwise layer's GEMM alone, as torch.matmul runs it for the layout: one
    (N*H*W, Cin) x (Cin, Cout) product for channels_last, a batched (Cout, Cin) x (Cin, H*W)
    product for NCHW."""
    if inp.is_dw or inp.mode != "inference":
        raise ValueError("the matmul reference exists for pointwise inference only")
    n, cin, h, w = inp.layer.input_shape
    w2 = inp.weight.detach().reshape(inp.layer.out_channels, cin)
    wt = w2.t()
    if inp.layout == "channels_last":
        xs = [x.detach().permute(0, 2, 3, 1).reshape(n * h * w, cin) for x in inp.xs]

        def fn(i):
            with torch.inference_mode():
                return torch.matmul(xs[i], wt)
    else:
        xs = [x.detach().reshape(n, cin, h * w) for x in inp.xs]

        def fn(i):
            with torch.inference_mode():
                return torch.matmul(w2, xs[i])

    return fn


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def rel_error(out, ref) -> float:
    """max over outputs of ||out - ref|| / ||ref|| (in fp64); inf on NaN or a shape mismatch."""
    errs = []
    for o, r in zip(_as_tuple(out), _as_tuple(ref)):
        if o is None or r is None:
            continue
        if o.shape != r.shape:
            return math.inf
        o64, r64 = o.detach().double(), r.detach().double()
        if not torch.isfinite(o64).all():
            return math.inf
        den = r64.norm().item()
        num = (o64 - r64).norm().item()
        errs.append(num / den if den > 0 else num)
    return max(errs) if errs else math.nan


def _detach(out):
    return tuple(t.detach().clone() if t is not None else None for t in _as_tuple(out))


def timing_metrics(t: Timing, cost: RL.Cost, ceil: Optional[RL.Ceilings]) -> dict[str, Any]:
    """The numbers every result carries, from a timing and the op's cost."""
    res = {"ms": t.median_s * 1e3, "timing": t.to_dict()}
    if t.e2e_median_s is not None:
        res["e2e_ms"] = t.e2e_median_s * 1e3
    res.update(RL.achieved(cost, t.median_s, ceil))
    return res


# --------------------------------------------------------------------------------------------
# Whole model (shared with bench/)


def model_import() -> tuple[Optional[type], Optional[type], Optional[str]]:
    """(MobileNetV1, ReferenceMobileNetV1, None) or (None, None, why not)."""
    try:
        from dwsep.models.mobilenet_v1 import MobileNetV1, ReferenceMobileNetV1
    except Exception as exc:  # ImportError before the model lands, or a broken import
        return None, None, f"MobileNetV1 not available: {_short_error(exc)}"
    return MobileNetV1, ReferenceMobileNetV1, None


@dataclass
class ModelInputs:
    ref: torch.nn.Module
    dws: torch.nn.Module
    images: list[Tensor]
    labels: list[Tensor]
    device: torch.device
    dtype: torch.dtype
    layout: str
    alpha: float
    resolution: int
    batch: int


def make_model_inputs(
    alpha: float, resolution: int, batch: int, dtype: torch.dtype, layout: str, device, seed=0
) -> ModelInputs:
    """The reference model and dwsep's model with the same weights, on device/dtype/layout."""
    mnv1, ref_cls, why = model_import()
    if why:
        raise RuntimeError(why)
    dev = torch.device(device)
    fmt = memory_format(layout)
    torch.manual_seed(seed)
    ref = ref_cls(alpha=alpha)
    dws = mnv1(alpha=alpha)
    dws.load_state_dict(ref.state_dict())
    ref = ref.to(device=dev, dtype=dtype, memory_format=fmt)
    dws = dws.to(device=dev, dtype=dtype, memory_format=fmt)
    img_bytes = batch * 3 * resolution * resolution * RL.element_size(dtype)
    nsets = rotation_sets(img_bytes, dev, max_sets=8)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    images = [
        torch.randn(batch, 3, resolution, resolution, generator=gen, device=dev)
        .to(dtype)
        .contiguous(memory_format=fmt)
        for _ in range(nsets)
    ]
    labels = [torch.randint(0, 1000, (batch,), generator=gen, device=dev) for _ in range(nsets)]
    return ModelInputs(ref, dws, images, labels, dev, dtype, parse_layout(layout), alpha, resolution, batch)  # fmt: skip


def model_step(
    mi: ModelInputs, impl: str, mode: str, compile_mode: str = "default"
) -> Callable[[int], Any]:
    """``fn(i)``: one inference forward, or one training step (forward, cross-entropy,
    backward, SGD step) of ``impl``: ``eager``/``compile`` run the reference model, a backend
    name runs dwsep's model on that backend (``<backend>+frozen``: its ``freeze()`` copy,
    ``<impl>+graph``: replayed from a CUDA graph). Training steps get their own copy of the
    model."""
    if mode not in MODEL_MODES:
        raise ValueError(f"mode must be one of {MODEL_MODES}, got {mode!r}")
    if impl.endswith(GRAPH_SUFFIX):
        return _graphed_model_step(mi, impl.removesuffix(GRAPH_SUFFIX), mode)
    import dwsep

    frozen = impl.endswith(FROZEN_SUFFIX)
    if frozen:
        if mode != "inference":
            raise ValueError(f"frozen model steps are inference only, got mode {mode!r}")
        impl = impl.removesuffix(FROZEN_SUFFIX)
    base = mi.ref if impl in BASELINES else mi.dws
    model = base if mode == "inference" else copy.deepcopy(base)
    model.train(mode == "train_step")
    if frozen:
        model = model.freeze()
    run = model
    if impl == "compile":
        _reset_dynamo()
        run = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    backend = None if impl in BASELINES else impl
    images, labels = mi.images, mi.labels

    def ctx():
        return dwsep.use_backend(backend) if backend else _nullctx()

    if mode == "inference":

        def fn(i):
            with ctx(), torch.inference_mode():
                return run(images[i])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def fn(i):
            with ctx():
                out = run(images[i])
                loss = F.cross_entropy(out.float(), labels[i])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss.detach()

    return fn


def _graphed_model_step(mi: ModelInputs, impl: str, mode: str) -> Callable[[int], Any]:
    """``fn(i)``: the inference forward of ``impl`` (``eager`` or a backend) replayed from one
    CUDA graph: image set ``i`` is copied into the captured input buffer, then the graph runs.
    The copy is timed with it (as a serving loop would pay it); Triton autotuning and
    compilation happen in the warm-up runs before the capture."""
    if mode != "inference":
        raise ValueError(f"CUDA-graph model steps are inference only, got mode {mode!r}")
    if impl == "compile":
        raise ValueError("CUDA-graph model steps take 'eager' or a backend, not 'compile'")
    if mi.images[0].device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors, got {mi.images[0].device}")
    static_in = mi.images[0].clone()  # the captured forward reads this buffer
    run = model_step(replace(mi, images=[static_in]), impl, mode)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # autotuning, compilation, allocator warm-up: outside the capture
            run(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(0)

    def fn(i):
        static_in.copy_(mi.images[i], non_blocking=True)
        graph.replay()
        return static_out

    return fn


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------------------------
# Environment and source revision


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_revision(root: Optional[Path] = None) -> dict[str, Any]:
    """Which kernel sources the numbers belong to: a sha256 over the contents of ``csrc/`` and
    ``kernels_triton/`` (works without git, e.g. on a copied tree), plus git's HEAD, the last
    commit touching those folders, and whether they have uncommitted changes."""
    root = root or repo_root()
    h = hashlib.sha256()
    nfiles = 0
    for d in ("csrc", "kernels_triton"):
        base = root / d
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if not p.is_file() or "__pycache__" in p.parts or p.suffix in (".pyc", ".so", ".o"):
                continue
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
            nfiles += 1
    rev: dict[str, Any] = {
        "kernels_sha256": h.hexdigest() if nfiles else None,
        "kernels_files": nfiles,
        "git_head": _git(root, "rev-parse", "HEAD"),
        "git_kernels_commit": _git(
            root, "log", "-1", "--format=%H", "--", "csrc", "kernels_triton"
        ),
    }
    status = _git(root, "status", "--porcelain", "--", "csrc", "kernels_triton")
    rev["git_kernels_dirty"] = None if status is None else bool(status)
    return rev


def malloc_setup() -> str:
    """The host allocator settings CPU timings depend on: a malloc replacement in LD_PRELOAD,
    glibc malloc tunables (GLIBC_TUNABLES, MALLOC_* variables), or "glibc malloc defaults". With the
    defaults, glibc gives large freed blocks back to the OS and each call then page-faults its
    outputs in again, at a cost that varies from process to process (bench/NOTES.md)."""
    parts = []
    libs = (os.path.basename(p) for p in re.split(r"[:\s]+", os.environ.get("LD_PRELOAD", "")))
    preload = [lib for lib in libs if "malloc" in lib]  # jemalloc, tcmalloc, mimalloc, ...
    if preload:
        parts.append("LD_PRELOAD " + " ".join(preload))
    tunables = [
        t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")
    ]
    if tunables:
        parts.append("GLIBC_TUNABLES " + ":".join(tunables))
    # glibc's MALLOC_ARENA_MAX, MALLOC_TRIM_THRESHOLD_, ..., and jemalloc's MALLOC_CONF
    parts += sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    return ", ".join(parts) or "glibc malloc defaults"


def environment(device: torch.device) -> dict[str, Any]:
    import dwsep

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dwsep": dwsep.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": dwsep.triton_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backends_available": dwsep.available_backends(device),
    }
    try:
        env["loadavg_1min"] = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        pass
    try:
        info = dwsep.build_info()
        env["extension_loaded"] = info.get("extension_loaded")
        env["cuda_compiled"] = info.get("cuda_compiled")
        env["extension_error"] = info.get("extension_error")
    except Exception as exc:
        env["build_info_error"] = _short_error(exc)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            gpu_memory_GiB=round(props.total_memory / 2**30, 1),
            l2_bytes=getattr(props, "L2_cache_size", None),
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            allow_tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    else:
        name = None
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        env["device_name"] = (
            f"CPU ({name or platform.machine()}, {torch.get_num_threads()} threads)"
        )
        env["malloc"] = malloc_setup()
    return env


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    layout: str
    batch: int
    alpha: float
    resolution: int
    backends: list[str]
    modes: list[str]
    layers: Optional[list[str]]
    compile_modes: list[str]  # the modes in which the compile baseline runs
    compile_mode: str
    model_compile_mode: str
    model: bool
    quick: bool
    out: Path
    time_budget: Optional[float]
    seed: int = 0
    graph: bool = False  # also time the inference models replayed from a CUDA graph

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "layout": self.layout,
            "batch": self.batch,
            "alpha": self.alpha,
            "resolution": self.resolution,
            "backends": self.backends,
            "modes": self.modes,
            "layers": self.layers,
            "compile_modes": self.compile_modes,
            "compile_mode": self.compile_mode,
            "model_compile_mode": self.model_compile_mode,
            "model": self.model,
            "quick": self.quick,
            "time_budget_s": self.time_budget,
            "seed": self.seed,
            "graph": self.graph,
        }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if present)")
    p.add_argument("--alpha", type=float, default=1.0, help="width multiplier (default 1.0)")
    p.add_argument("--resolution", type=int, default=224, help="input resolution (default 224)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 256 on GPU, 8 on CPU)")
    p.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default: bf16 GPU, fp32 CPU)")
    p.add_argument(
        "--layout",
        default=None,
        help="nchw or channels_last (default: channels_last GPU, nchw CPU)",
    )
    p.add_argument(
        "--backend",
        default=None,
        help="comma list of dwsep backends (cuda,triton,cpu,torch) or 'all' (default: the "
        "available kernel backends for the device; Triton never on CPU)",
    )
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)} (default: all)"
    )
    p.add_argument(
        "--layers",
        default=None,
        help="comma list of layers to run: dw0..dw12, pw0..pw12, dw, pw, or none for the "
        "model part alone (default: all 26)",
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "all", "inference", "none"),
        help="modes with the torch.compile baseline (auto: all; with --quick: inference on GPU, "
        "none on CPU)",
    )
    p.add_argument(
        "--compile-mode", default="default", help="torch.compile mode (e.g. max-autotune)"
    )
    p.add_argument(
        "--model-compile-mode",
        default=None,
        help="torch.compile mode for the reference model (default: --compile-mode; issue 5's "
        "target is against max-autotune)",
    )
    p.add_argument("--no-model", action="store_true", help="skip the MobileNetV1 throughput part")
    p.add_argument("--quick", action="store_true", help="fewer repeats (and fewer compiles)")
    p.add_argument("--out", default=None, help="output directory for report.json/.md/.png")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: stop starting new cases after this (the report is still written)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--graph",
        action="store_true",
        help="also time MobileNetV1 inference (eager and each backend) replayed from a CUDA "
        "graph: the end-to-end rate with the host's per-op launch cost taken out (CUDA only)",
    )


def _split(s: Optional[str]) -> list[str]:
    return [t.strip() for t in (s or "").split(",") if t.strip()]


def config_from_args(args: argparse.Namespace) -> Config:
    dev = torch.device(default_device() if args.device == "auto" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dwsep bench: --device cuda but no CUDA device is available")
    dev = resolve_device(dev)
    cuda = dev.type == "cuda"
    dtype = parse_dtype(args.dtype or ("bf16" if cuda else "fp32"))
    layout = parse_layout(args.layout or ("channels_last" if cuda else "nchw"))
    batch = args.batch or (256 if cuda else 8)
    if args.backend in (None, "", "auto"):
        backends = default_backends(dev)
    elif args.backend == "all":
        backends = list(BACKEND_NAMES)
    else:
        backends = _split(args.backend)
    for b in backends:
        if b not in BACKEND_NAMES:
            raise SystemExit(
                f"dwsep bench: --backend entries must be in {BACKEND_NAMES}, got {b!r}"
            )
    modes = _split(args.modes)
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"dwsep bench: --modes entries must be in {MODES}, got {m!r}")
    if args.compile == "auto":
        compile_modes = list(modes) if not args.quick else (["inference"] if cuda else [])
    elif args.compile == "all":
        compile_modes = list(modes)
    elif args.compile == "inference":
        compile_modes = ["inference"]
    else:
        compile_modes = []
    if args.out:
        out = Path(args.out)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("bench/out") if Path("bench").is_dir() else Path("dwsep-report")
        out = base / f"{dev.type}_{dtype_name(dtype)}_{stamp}"
    return Config(
        device=dev,
        dtype=dtype,
        layout=layout,
        batch=batch,
        alpha=args.alpha,
        resolution=args.resolution,
        backends=backends,
        modes=modes,
        layers=_split(args.layers) or None,
        compile_modes=compile_modes,
        compile_mode=args.compile_mode,
        model_compile_mode=args.model_compile_mode or args.compile_mode,
        model=not args.no_model,
        quick=args.quick,
        out=out,
        time_budget=args.time_budget,
        seed=args.seed,
        graph=args.graph,
    )


def select_layers(cfg: Config) -> list[DepthwiseLayer | PointwiseLayer]:
    dws, pws = mobilenet_v1_layers(cfg.alpha, cfg.resolution, cfg.batch)
    if not cfg.layers:
        return [*dws, *pws]
    if list(cfg.layers) == ["none"]:  # the model part alone
        return []
    out = []
    for layer in (*dws, *pws):
        tag = ("dw" if isinstance(layer, DepthwiseLayer) else "pw") + str(layer.index)
        if tag in cfg.layers or tag[:2] in cfg.layers or layer.name in cfg.layers:
            out.append(layer)
    if not out:
        raise SystemExit(f"dwsep bench: --layers {','.join(cfg.layers)} selects no layer")
    return out


# --------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """tqdm when installed, else a line per step on stderr."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.n, self.desc = total, 0, desc
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, mininterval=0.5)
        except Exception:
            self._bar = None

    def update(self, k: int = 1, what: str = "") -> None:
        self.n += k
        if self._bar is not None:
            if what:
                self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(k)
        else:
            print(f"[{self.n}/{self.total}] {self.desc} {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------------------------
# Running


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _impls(cfg: Config, mode: str, layer=None) -> list[str]:
    gemm = [GEMM_REF] if isinstance(layer, PointwiseLayer) and mode == "inference" else []
    return ["eager", *(["compile"] if mode in cfg.compile_modes else []), *gemm, *cfg.backends]


def _layer_record(layer, mode: str, cost: RL.Cost, ceil: RL.Ceilings) -> dict[str, Any]:
    dw = isinstance(layer, DepthwiseLayer)
    rec = {
        "op": "dw" if dw else "pw",
        "index": layer.index,
        "name": layer.name,
        "mode": mode,
        "input_shape": list(layer.input_shape),
        "output_shape": list(output_shape(layer)),
        "cost": cost.to_dict(),
        "floor_ms": RL.floor_seconds(cost, ceil) * 1e3,
        "bound": RL.bound(cost, ceil),
        "results": {},
    }
    if dw:
        rec["stride"] = layer.stride
    return rec


def _add_speedups(results: dict[str, dict[str, Any]]) -> None:
    for base in REFERENCES:
        ref = results.get(base, {}).get("ms")
        for res in results.values():
            if ref and res.get("ms"):
                res[f"speedup_vs_{base}"] = ref / res["ms"]


def run_layers(cfg: Config, ceil: RL.Ceilings, prog: _Progress, deadline: float) -> list[dict]:
    records = []
    # Mode-major: with a time budget, every layer's inference comes before any training case.
    for mode, layer in itertools.product(cfg.modes, select_layers(cfg)):
        cost = RL.layer_cost(layer, mode, cfg.dtype)
        rec = _layer_record(layer, mode, cost, ceil)
        records.append(rec)
        impls = _impls(cfg, mode, layer)
        if time.monotonic() > deadline:
            for impl in impls:
                rec["results"][impl] = {"skipped": "time budget"}
            prog.update(len(impls), f"{layer.name} {mode} (skipped)")
            continue
        try:
            nsets = nsets_for(layer, mode, cfg.dtype, cfg.device)
            inp = make_layer_inputs(layer, mode, cfg.dtype, cfg.layout, cfg.device, nsets, cfg.seed)
        except Exception as exc:
            rec["error"] = _short_error(exc)
            prog.update(len(impls), f"{layer.name} {mode} (error)")
            continue
        rec["nsets"] = nsets
        ref = None
        for impl in impls:
            res: dict[str, Any] = {}
            rec["results"][impl] = res
            why = None if impl in REFERENCES else why_skip_backend(impl, cfg.device)
            if why:
                res["skipped"] = why
            elif time.monotonic() > deadline:
                res["skipped"] = "time budget"
            else:
                try:
                    fn = layer_step(inp, impl, cfg.compile_mode)
                    out = fn(0)  # first call: compilation / autotuning; output check
                    if impl == "eager":
                        ref = _detach(out)
                    elif ref is not None and impl != GEMM_REF:
                        err = rel_error(out, ref)
                        res["rel_err_vs_eager"] = err
                        res["check_ok"] = bool(err <= CHECK_TOL[cfg.dtype])
                    del out
                    t = bench_fn(fn, cfg.device, nsets, quick=cfg.quick)
                    res.update(timing_metrics(t, cost, ceil))
                except Exception as exc:
                    res["error"] = _short_error(exc)
                finally:
                    fn = None
            prog.update(1, f"{layer.name} {mode} {impl}")
        _add_speedups(rec["results"])
        del inp, ref
        _empty_cache(cfg.device)
    return records


def _model_impls(cfg: Config, mode: str) -> list[str]:
    """The compiled reference model runs where the layer compile baseline runs in the matching
    mode (inference; fwd_bwd for the training step)."""
    cm = "inference" if mode == "inference" else "fwd_bwd"
    impls = ["eager", *(["compile"] if cm in cfg.compile_modes else []), *cfg.backends]
    if mode == "inference":
        impls += [f"{b}{FROZEN_SUFFIX}" for b in cfg.backends]
        if cfg.graph:
            impls += [f"{i}{GRAPH_SUFFIX}" for i in ("eager", *cfg.backends)]
    return impls


def run_model(
    cfg: Config,
    ceil: RL.Ceilings,
    prog: _Progress,
    deadline: float,
    on_case: Optional[Callable[[dict[str, Any]], Any]] = None,
) -> dict[str, Any]:
    """The MobileNetV1 throughput part; ``on_case(model_so_far)`` after every case."""
    impls_by_mode = {m: _model_impls(cfg, m) for m in MODEL_MODES}
    total = sum(len(v) for v in impls_by_mode.values())
    out: dict[str, Any] = {"batch": cfg.batch, "alpha": cfg.alpha, "resolution": cfg.resolution}
    _, _, why = model_import()
    if why:
        out["error"] = why
        prog.update(total, "model (not available)")
        return out
    try:
        from dwsep.models import model_complexity

        out["complexity"] = {
            k: v
            for k, v in model_complexity(cfg.alpha, cfg.resolution).items()
            if k in ("params", "macs")
        }
    except Exception as exc:
        out["complexity_error"] = _short_error(exc)
    try:
        mi = make_model_inputs(cfg.alpha, cfg.resolution, cfg.batch, cfg.dtype, cfg.layout, cfg.device, cfg.seed)  # fmt: skip
    except Exception as exc:
        out["error"] = f"building the models failed: {_short_error(exc)}"
        prog.update(total, "model (error)")
        return out
    out["nsets"] = len(mi.images)
    for mode in MODEL_MODES:
        cost = RL.model_cost(cfg.alpha, cfg.resolution, cfg.batch, "inference" if mode == "inference" else "fwd_bwd", cfg.dtype)  # fmt: skip
        floor = RL.floor_seconds(cost, ceil)
        sec: dict[str, Any] = {
            "cost": cost.to_dict(),
            "floor_ms": floor * 1e3,
            "floor_images_per_s": cfg.batch / floor,
            "results": {},
        }
        out[mode] = sec
        ref_out = None
        for impl in impls_by_mode[mode]:
            res: dict[str, Any] = {}
            sec["results"][impl] = res
            base_impl = model_impl_base(impl)
            why = None if base_impl in BASELINES else why_skip_backend(base_impl, cfg.device)
            if why is None and impl.endswith(GRAPH_SUFFIX) and cfg.device.type != "cuda":
                why = "CUDA graphs need a CUDA device"
            if why:
                res["skipped"] = why
            elif time.monotonic() > deadline:
                res["skipped"] = "time budget"
            else:
                try:
                    fn = model_step(mi, impl, mode, cfg.model_compile_mode)
                    first = fn(0)
                    if mode == "inference":
                        if impl == "eager":
                            ref_out = _detach(first)
                        elif ref_out is not None:
                            err = rel_error(first, ref_out)
                            res["rel_err_vs_eager"] = err
                            res["check_ok"] = bool(err <= 5 * CHECK_TOL[cfg.dtype])
                    del first
                    t = bench_fn(
                        fn, cfg.device, len(mi.images), quick=cfg.quick, max_calls_per_sample=1
                    )
                    res.update(timing_metrics(t, cost, ceil))
                    res["images_per_s"] = cfg.batch / t.median_s
                    if t.e2e_median_s:
                        res["e2e_images_per_s"] = cfg.batch / t.e2e_median_s
                except Exception as exc:
                    res["error"] = _short_error(exc)
                finally:
                    fn = None
            prog.update(1, f"model {mode} {impl}")
            _empty_cache(cfg.device)
            _add_speedups(sec["results"])
            if on_case is not None:
                on_case(out)
    return out


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def summarize(records: list[dict]) -> list[dict[str, Any]]:
    """Per (op, mode, implementation): geometric mean of the per-layer speedups against each
    baseline, and the ratio of summed times (layers where both were measured)."""
    rows = []
    keys = []
    for r in records:
        for impl in r["results"]:
            k = (r["op"], r["mode"], impl)
            if k not in keys:
                keys.append(k)
    for op, mode, impl in keys:
        if impl == "eager":
            continue
        row: dict[str, Any] = {"op": op, "mode": mode, "impl": impl}
        recs = [r for r in records if r["op"] == op and r["mode"] == mode]
        for base in REFERENCES:
            if base == impl:
                continue
            pairs = [
                (r["results"][base]["ms"], r["results"][impl]["ms"])
                for r in recs
                if r["results"].get(base, {}).get("ms") and r["results"].get(impl, {}).get("ms")
            ]
            row[f"geomean_vs_{base}"] = _geomean([b / i for b, i in pairs])
            row[f"sum_ratio_vs_{base}"] = (
                sum(b for b, _ in pairs) / sum(i for _, i in pairs) if pairs else math.nan
            )
            row[f"n_vs_{base}"] = len(pairs)
            if not pairs and base != "eager":
                for k in ("geomean", "sum_ratio", "n"):
                    row.pop(f"{k}_vs_{base}")
        pct = [r["results"][impl]["pct_roofline"] for r in recs if r["results"].get(impl, {}).get("pct_roofline")]  # fmt: skip
        row["median_pct_roofline"] = sorted(pct)[len(pct) // 2] if pct else math.nan
        bad = [r["name"] for r in recs if r["results"].get(impl, {}).get("check_ok") is False]
        if bad:
            row["check_failed"] = bad
        rows.append(row)
    return rows


def _stamp(report: dict[str, Any], cfg: Config, t_start: float) -> None:
    report["elapsed_s"] = time.monotonic() - t_start
    stem = f"{_dt.date.today().isoformat()}_{slug(report['environment']['device_name'])[:40]}"
    report["results_stem"] = f"{stem}_{dtype_name(cfg.dtype)}_{cfg.layout}_b{cfg.batch}"


def run(cfg: Config, checkpoint: Optional[Callable[[dict], Any]] = None) -> dict[str, Any]:
    """Run the whole report for ``cfg``; returns the JSON-able dict. ``checkpoint(report)`` is
    called with the partial report (``"partial": True``) once the per-layer part is done and
    after every model case, so a run killed during the model part still leaves its layer
    results and the model cases finished so far."""
    t_start = time.monotonic()
    deadline = t_start + cfg.time_budget if cfg.time_budget else math.inf
    if cfg.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.set_device(cfg.device)
    torch.manual_seed(cfg.seed)
    report: dict[str, Any] = {"config": cfg.to_dict()}
    report["environment"] = environment(cfg.device)
    report["source"] = source_revision()
    ceil = RL.measure_ceilings(cfg.device, cfg.dtype, quick=cfg.quick)
    report["ceilings"] = ceil.to_dict()
    layers = select_layers(cfg)
    n_layer_cases = sum(len(_impls(cfg, m, x)) for m in cfg.modes for x in layers)
    n_model = sum(len(_model_impls(cfg, m)) for m in MODEL_MODES) if cfg.model else 0
    prog = _Progress(n_layer_cases + n_model, "dwsep bench")
    try:
        report["layers"] = run_layers(cfg, ceil, prog, deadline)
        report["summary"] = summarize(report["layers"])
        if cfg.model:

            def save_partial(model_so_far: Optional[dict[str, Any]] = None) -> None:
                if checkpoint is None:
                    return
                _stamp(report, cfg, t_start)
                part = {**report, "partial": True}
                if model_so_far is not None:
                    part["model"] = model_so_far
                try:
                    checkpoint(part)
                except Exception as exc:  # a failed checkpoint must not stop the run
                    report["checkpoint_error"] = _short_error(exc)

            save_partial()
            report["model"] = run_model(cfg, ceil, prog, deadline, on_case=save_partial)
    finally:
        prog.close()
    _stamp(report, cfg, t_start)
    return report


# --------------------------------------------------------------------------------------------
# Output


def _finite(obj):
    """JSON without NaN/inf (they become null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def _fmt_time(ms: Optional[float], unit: str) -> str:
    if ms is None:
        return ""
    v = ms * 1e3 if unit == "us" else ms
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _fmt(v: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:{spec}}{suffix}"


def _cell(res: dict[str, Any], unit: str) -> str:
    if "error" in res:
        return "error"
    if "skipped" in res:
        return "skip"
    s = _fmt_time(res.get("ms"), unit)
    if res.get("check_ok") is False:
        s += " !"
    return s


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _shape_str(rec: dict[str, Any]) -> str:
    n, c, h, w = rec["input_shape"]
    if rec["op"] == "dw":
        return f"{n}x{c}x{h}x{w} s{rec['stride']}"
    return f"{n}x{c}x{h}x{w} ->{rec['output_shape'][1]}"


def layer_tables(report: dict[str, Any]) -> str:
    cfg = report["config"]
    unit = "us" if cfg["device"].startswith("cuda") else "ms"
    ulabel = "µs" if unit == "us" else "ms"
    out = []
    for op, title in (("dw", "Depthwise 3x3 + BN + ReLU6"), ("pw", "Pointwise 1x1 + BN + ReLU6")):
        for mode in cfg["modes"]:
            recs = [r for r in report.get("layers", []) if r["op"] == op and r["mode"] == mode]
            if not recs:
                continue
            impls: list[str] = []
            for r in recs:
                impls += [i for i in r["results"] if i not in impls]
            others = [i for i in impls if i not in REFERENCES]
            header = ["layer", "shape", f"floor {ulabel}", f"eager {ulabel}"]
            if "compile" in impls:
                header.append(f"compile {ulabel}")
            if GEMM_REF in impls:
                header.append(f"matmul {ulabel}")
            for b in others:
                header += [f"{b} {ulabel}", f"{b} ×eager", f"{b} GB/s", f"{b} %roof"]
            rows = []
            for r in recs:
                res = r["results"]
                row = [r["name"], _shape_str(r), _fmt_time(r["floor_ms"], unit)]
                row.append(_cell(res.get("eager", {}), unit) if "error" not in r else "error")
                if "compile" in impls:
                    row.append(_cell(res.get("compile", {}), unit))
                if GEMM_REF in impls:
                    row.append(_cell(res.get(GEMM_REF, {}), unit))
                for b in others:
                    x = res.get(b, {})
                    row += [
                        _cell(x, unit),
                        _fmt(x.get("speedup_vs_eager"), ".2f", "×"),
                        _fmt(x.get("GBps"), ".0f"),
                        _fmt(x.get("pct_roofline"), ".0f", "%"),
                    ]
                rows.append(row)
            out.append(f"### {title}: {mode}\n\n" + _table(header, rows))
    return "\n\n".join(out)


def summary_table(report: dict[str, Any]) -> str:
    rows = []
    for s in report.get("summary", []):
        rows.append(
            [
                s["op"],
                s["mode"],
                s["impl"],
                _fmt(s.get("geomean_vs_eager"), ".2f", "×"),
                _fmt(s.get("sum_ratio_vs_eager"), ".2f", "×"),
                _fmt(s.get("geomean_vs_compile"), ".2f", "×"),
                _fmt(s.get("geomean_vs_matmul"), ".2f", "×"),
                _fmt(s.get("median_pct_roofline"), ".0f", "%"),
                str(s.get("n_vs_eager", "")),
                ", ".join(s.get("check_failed", [])),
            ]
        )
    header = [
        "op", "mode", "impl", "geomean ×eager", "Σtime ×eager", "geomean ×compile",
        "geomean ×matmul", "median %roof", "layers", "output check failed",
    ]  # fmt: skip
    return _table(header, rows) if rows else "(no results)"


def model_table(report: dict[str, Any]) -> str:
    m = report.get("model")
    if m is None:
        return "(model part not run)"
    if "error" in m:
        return f"{m['error']}"
    lines = []
    for mode in MODEL_MODES:
        sec = m.get(mode)
        if not sec:
            continue
        rows = []
        for impl, res in sec["results"].items():
            base_impl = model_impl_base(impl)
            label = f"dwsep[{base_impl}]"
            if base_impl in BASELINES:
                label = f"reference model, {base_impl}"
            if impl.endswith(FROZEN_SUFFIX):
                label += ", freeze()"
            if impl.endswith(GRAPH_SUFFIX):
                label += ", CUDA graph"
            if "error" in res or "skipped" in res:
                rows.append([label, "error" if "error" in res else "skip", "", "", "", "", ""])
                continue
            rows.append(
                [
                    label,
                    _fmt(res.get("images_per_s"), ".0f"),
                    _fmt(res.get("e2e_images_per_s"), ".0f"),
                    _fmt(res.get("ms"), ".2f"),
                    _fmt(res.get("speedup_vs_eager"), ".2f", "×"),
                    _fmt(res.get("speedup_vs_compile"), ".2f", "×"),
                    _fmt(res.get("pct_roofline"), ".0f", "%"),
                ]
            )
        head = [
            "implementation", "images/s", "images/s (e2e)", "ms/batch", "×eager", "×compile",
            "%roof",
        ]  # fmt: skip
        lines.append(
            f"#### MobileNetV1 {mode} (batch {m['batch']}, floor {sec['floor_images_per_s']:.0f} "
            f"images/s)\n\n" + _table(head, rows)
        )
    return "\n\n".join(lines)


def _errors(report: dict[str, Any]) -> list[str]:
    errs = []
    for r in report.get("layers", []):
        if "error" in r:
            errs.append(f"{r['name']} {r['mode']}: {r['error']}")
        for impl, res in r["results"].items():
            if "error" in res:
                errs.append(f"{r['name']} {r['mode']} {impl}: {res['error']}")
    m = report.get("model") or {}
    for mode in MODEL_MODES:
        for impl, res in (m.get(mode) or {}).get("results", {}).items():
            if "error" in res:
                errs.append(f"model {mode} {impl}: {res['error']}")
    return errs


def header_text(report: dict[str, Any]) -> str:
    cfg, env, src, ce = (
        report["config"],
        report["environment"],
        report["source"],
        report["ceilings"],
    )
    dirty = {True: " (uncommitted changes)", False: "", None: ""}[src.get("git_kernels_dirty")]
    lines = [
        f"- **device**: {env.get('device_name')} (`{cfg['device']}`)"
        + (
            f", capability {env['capability']}, {env['sm_count']} SMs"
            if "capability" in env
            else ""
        ),
        f"- **config**: dtype {cfg['dtype']}, layout {cfg['layout']}, batch {cfg['batch']}, "
        f"alpha {cfg['alpha']}, resolution {cfg['resolution']}, backends "
        f"{', '.join(cfg['backends']) or '(none)'}, torch.compile baseline in "
        f"{', '.join(cfg['compile_modes']) or 'no'} mode(s) (mode `{cfg['compile_mode']}`, model "
        f"`{cfg.get('model_compile_mode')}`)" + (", quick" if cfg["quick"] else ""),
        f"- **software**: dwsep {env.get('dwsep')}, torch {env.get('torch')}, CUDA "
        f"{env.get('torch_cuda')}, cuDNN {env.get('cudnn', '-')}, triton {env.get('triton')}, "
        f"python {env.get('python')}"
        + (f"; allocator: {env['malloc']}" if "malloc" in env else ""),
        f"- **source**: kernels sha256 `{(src.get('kernels_sha256') or '-')[:16]}` "
        f"(csrc/ + kernels_triton/), last kernel commit `{(src.get('git_kernels_commit') or '-')[:12]}`"
        f"{dirty}, HEAD `{(src.get('git_head') or '-')[:12]}`",
        f"- **ceilings, measured in this run**: copy {ce['copy_GBps']:.0f} GB/s (read + write), "
        f"{ce['matmul_dtype']} matmul {ce['matmul_n']}³ {ce['matmul_TFLOPs']:.1f} TFLOP/s "
        f"(balance {ce['balance_flop_per_byte']:.0f} FLOP/B)",
        f"- **date**: {env.get('date')}, elapsed {report.get('elapsed_s', 0):.0f} s",
    ]
    if report.get("partial"):
        lines.append(
            "- **partial report**: written before the model part ended (with the model cases "
            "finished by then)"
        )
    load, ncpu = env.get("loadavg_1min"), env.get("cpu_count") or 1
    if cfg["device"] == "cpu" and load is not None and load > 0.75 * ncpu:
        lines.append(
            f"- **warning**: the host was busy (1-minute load average {load} on {ncpu} cores "
            "at the start): CPU timings taken on a busy host are unreliable"
        )
    return "\n".join(lines)


METHOD_TEXT = """Times are medians per call. GPU: CUDA events around back-to-back calls queued behind a
blocking kernel (the GPU's own time; the "e2e" numbers in the JSON also include host overhead),
after warm-up (autotuning and compilation excluded), with input sets rotated so together they
exceed twice the L2 cache; `cudnn.benchmark = True`. CPU: `perf_counter` per call after warm-up.
Speedups are ratios against the baselines measured in this run on the same inputs; `matmul`
is the bare GEMM of a pointwise layer (torch.matmul), so ×matmul below 1 means slower than the
GEMM alone. GB/s counts
the floor bytes (each input read once, each output written once; see `dwsep/roofline.py`);
%roof is floor time / measured time, the floor being max(bytes / copy bandwidth, FLOPs / matmul
rate). `!` marks an output that differs from eager's beyond the dtype's check tolerance; such a
time is not a valid comparison."""


def to_markdown(report: dict[str, Any]) -> str:
    parts = [
        "# dwsep benchmark report",
        header_text(report),
        "## Summary (per-layer speedups)",
        summary_table(report),
        "## Per layer",
        layer_tables(report),
        "## MobileNetV1 throughput",
        model_table(report),
        "## Method",
        METHOD_TEXT,
    ]
    errs = _errors(report)
    if errs:
        parts += ["## Errors", "\n".join(f"- {e}" for e in errs)]
    if report.get("plot_error"):
        parts += [f"(plot not written: {report['plot_error']})"]
    return "\n\n".join(parts) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Per-layer speedup bars (one row per mode) and a roofline picture per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, ce = report["config"], report["ceilings"]
    modes = [m for m in cfg["modes"] if any(r["mode"] == m for r in report.get("layers", []))]
    if not modes:
        modes = list(cfg["modes"])[:1]
    fig, axes = plt.subplots(len(modes), 2, figsize=(20, 4.8 * len(modes)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})  # fmt: skip
    bw, rate = ce["copy_bytes_per_s"], ce["matmul_flops_per_s"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, mode in enumerate(modes):
        ax, axr = axes[row]
        recs = [r for r in report.get("layers", []) if r["mode"] == mode]
        impls = []
        for r in recs:
            impls += [i for i in r["results"] if i != "eager" and i not in impls]
        impls.sort(key=lambda i: REFERENCES.index(i) if i in REFERENCES else len(REFERENCES))
        names = [r["name"].split("_")[0] for r in recs]
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            ys = [r["results"].get(impl, {}).get("speedup_vs_eager") or 0.0 for r in recs]
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(recs))]
            ax.bar(xs, ys, width, label=impl, color=colors[k % len(colors)])
            for x, r in zip(xs, recs):
                res = r["results"].get(impl, {})
                if "error" in res or "skipped" in res:
                    ax.text(x, 0.02, "E" if "error" in res else "s", ha="center", fontsize=6,
                            color=colors[k % len(colors)], transform=ax.get_xaxis_transform())  # fmt: skip
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(recs)))
        ax.set_xticklabels(names, rotation=90, fontsize=8)
        ax.set_ylabel("speedup vs eager (×)")
        ax.set_title(f"{mode}: per-layer speedup vs PyTorch eager (same run)")
        if impls:
            ax.legend(fontsize=8)
        # Roofline
        ints = [r["cost"]["intensity"] for r in recs] or [1.0]
        lo, hi = max(min(ints) / 3, 1e-2), max(max(ints) * 3, ce["balance_flop_per_byte"] * 3)
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        axr.plot(xs, [min(bw * x, rate) / 1e12 for x in xs], color="black", lw=1.2,
                 label=f"roof: {bw / 1e9:.0f} GB/s, {rate / 1e12:.3g} TFLOP/s")  # fmt: skip
        for k, impl in enumerate(["eager", *impls]):
            for op, marker in (("dw", "o"), ("pw", "s")):
                pts = [
                    (r["cost"]["intensity"], r["results"][impl]["TFLOPs"])
                    for r in recs
                    if r["op"] == op and r["results"].get(impl, {}).get("TFLOPs")
                ]
                if pts:
                    axr.scatter(*zip(*pts), marker=marker, s=18, color=colors[(k - 1) % len(colors)] if impl != "eager" else "gray",
                                label=f"{impl} {op}")  # fmt: skip
        axr.set_xscale("log")
        axr.set_yscale("log")
        axr.set_xlabel("FLOP / byte (floor bytes)")
        axr.set_ylabel("TFLOP/s")
        axr.set_title(f"{mode}: roofline")
        axr.legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(
        f"dwsep on {env.get('device_name')}: {cfg['dtype']}, {cfg['layout']}, batch {cfg['batch']}, "
        f"alpha {cfg['alpha']}, {cfg['resolution']}px ({env.get('date')})"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Write report.json, report.md and report.png into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    png = out / "report.png"
    try:
        write_plot(report, png)
        paths["png"] = str(png)
    except Exception as exc:
        report["plot_error"] = _short_error(exc)
    js = out / "report.json"
    js.write_text(json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    paths["json"] = str(js)
    md = out / "report.md"
    md.write_text(to_markdown(report))
    paths["md"] = str(md)
    return paths


def main_from_args(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(
        f"dwsep bench: {cfg.device} {dtype_name(cfg.dtype)} {cfg.layout} batch {cfg.batch} "
        f"alpha {cfg.alpha} res {cfg.resolution}, backends {cfg.backends or '(none)'}, "
        f"modes {cfg.modes}, compile baseline in {cfg.compile_modes or 'no'} mode(s)"
        + (", quick" if cfg.quick else ""),
        flush=True,
    )
    report = run(cfg, checkpoint=lambda partial: write_outputs(partial, cfg.out))
    paths = write_outputs(report, cfg.out)
    print()
    print(header_text(report))
    print("\n## Summary\n")
    print(summary_table(report))
    print("\n## Per layer\n")
    print(layer_tables(report))
    print("\n## MobileNetV1 throughput\n")
    print(model_table(report))
    errs = _errors(report)
    if errs:
        print(f"\n{len(errs)} error(s); see report.md")
    print("\nwrote " + ", ".join(paths.values()))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dwsep bench", description="dwsep benchmark report")
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
