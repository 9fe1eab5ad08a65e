"""pytest-benchmark suite for dwsep: ``pytest bench/ --benchmark-only``.

Per-layer cases (MobileNetV1's depthwise and pointwise layers from ``dwsep.shapes``) for each
available dwsep backend and the two baselines (``eager``: F.conv2d + F.batch_norm + F.relu6,
``compile``: torch.compile of the same function), in three modes (inference forward, training
forward, forward+backward), plus whole-model inference and training-step throughput.

Runs on any machine: CUDA cases when a GPU is present, CPU cases otherwise. The default is a
small representative subset that finishes in minutes; ``--full`` runs the whole sweep.

Defaults (each can be overridden with the ``--bench-*`` options below):

========== ================================================ ==========================================
           CPU (no GPU)                                     GPU
========== ================================================ ==========================================
default    alpha 0.5, 224 px, batch 4, fp32, both layouts;  alpha 1, 224 px, batch 256, bf16,
           dw layers 0,1,11 and pw 0,12; no compile         channels_last; dw 0,1,3,6,12, pw 0,2,5,6,12;
           baseline; model alpha 0.25, 128 px, batch 4      compile baseline in inference; model alpha 1
--full     alpha 1, batch 8, all 26 layers, fp32, both      all 26 layers, fp32/fp16/bf16, both
           layouts, compile baseline in every mode          layouts, compile baseline in every mode
========== ================================================ ==========================================

Timing: GPU cases are timed with CUDA events by ``dwsep.timing.bench_fn`` (warm-up first, input
sets rotated past the L2, calls queued behind a blocking kernel, median); those numbers go in
``extra_info`` and drive every derived figure, while pytest-benchmark's own table shows the
host-synchronized wall time per call. CPU cases: pytest-benchmark's pedantic rounds (perf_counter)
are the measurement. Every case records in ``extra_info``: bytes (floor, fused schedule, eager),
FLOPs, achieved GB/s and TFLOP/s, the roofline floor and the percentage reached (ceilings measured
once per session on this device), and the speedup against the baselines measured in this session.
Triton on CPU runs only in its interpreter, so those cases are skipped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import pytest
import torch

import dwsep
from dwsep import report as R
from dwsep import roofline as RL
from dwsep.shapes import DepthwiseLayer, mobilenet_v1_layers
from dwsep.timing import bench_fn


def pytest_addoption(parser):
    g = parser.getgroup("dwsep-bench", "dwsep benchmark suite (bench/)")
    g.addoption(
        "--full",
        action="store_true",
        default=False,
        help="the full sweep: all 26 layers, every dtype (GPU), both layouts, compile everywhere",
    )
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if present)")
    g.addoption("--bench-alpha", type=float, default=None, help="width multiplier")
    g.addoption("--bench-resolution", type=int, default=None, help="input resolution")
    g.addoption("--bench-batch", type=int, default=None, help="batch size")
    g.addoption("--bench-dtype", default=None, help="comma list of fp32,fp16,bf16")
    g.addoption("--bench-layout", default=None, help="comma list of nchw,channels_last")
    g.addoption("--bench-backend", default=None, help="comma list of dwsep backends")
    g.addoption("--bench-modes", default=None, help="comma list of inference,train_fwd,fwd_bwd")
    g.addoption("--bench-layers", default=None, help="comma list, e.g. dw0,dw5,pw12 or dw,pw")
    g.addoption(
        "--bench-compile",
        default=None,
        choices=("none", "inference", "all"),
        help="modes with the torch.compile baseline",
    )
    g.addoption("--bench-compile-mode", default="default", help="torch.compile mode")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: the full benchmark sweep (select with --full)")


@dataclass
class Settings:
    device: torch.device
    full: bool
    alpha: float
    resolution: int
    batch: int
    dtypes: list[torch.dtype]
    layouts: list[str]
    backends: list[str]
    modes: list[str]
    layers: list[str]
    compile_modes: list[str]
    compile_mode: str
    model_alpha: float
    model_resolution: int
    model_batch: int
    extra: dict[str, Any] = field(default_factory=dict)


def _split(s: Optional[str]) -> list[str]:
    return [t.strip() for t in (s or "").split(",") if t.strip()]


def get_settings(config) -> Settings:
    cached = getattr(config, "_dwsep_bench_settings", None)
    if cached is not None:
        return cached
    opt = config.getoption
    dev = R.resolve_device(opt("--bench-device") or R.default_device())
    cuda = dev.type == "cuda"
    full = bool(opt("--full"))
    if cuda:
        alpha, res, batch = 1.0, 224, 256
        dtypes = ["fp32", "fp16", "bf16"] if full else ["bf16"]
        layouts = ["nchw", "channels_last"] if full else ["channels_last"]
        layers = [] if full else ["dw0", "dw1", "dw3", "dw6", "dw12", "pw0", "pw2", "pw5", "pw6", "pw12"]  # fmt: skip
        compile_modes = list(R.MODES) if full else ["inference"]
        m_alpha, m_res, m_batch = 1.0, 224, 256
    else:
        alpha, res, batch = (1.0, 224, 8) if full else (0.5, 224, 4)
        dtypes = ["fp32"]
        layouts = ["nchw", "channels_last"]
        layers = [] if full else ["dw0", "dw1", "dw11", "pw0", "pw12"]
        compile_modes = list(R.MODES) if full else []
        m_alpha, m_res, m_batch = (1.0, 224, 8) if full else (0.25, 128, 4)
    if opt("--bench-alpha") is not None:
        alpha = m_alpha = opt("--bench-alpha")
    if opt("--bench-resolution") is not None:
        res = m_res = opt("--bench-resolution")
    if opt("--bench-batch") is not None:
        batch = m_batch = opt("--bench-batch")
    if opt("--bench-dtype"):
        dtypes = _split(opt("--bench-dtype"))
    if opt("--bench-layout"):
        layouts = _split(opt("--bench-layout"))
    if opt("--bench-layers"):
        layers = _split(opt("--bench-layers"))
    cm = opt("--bench-compile")
    if cm is not None:
        compile_modes = {"none": [], "inference": ["inference"], "all": list(R.MODES)}[cm]
    backends = _split(opt("--bench-backend")) or list(dwsep.available_backends(dev))
    if not cuda and dwsep.triton_version() is not None and "triton" not in backends:
        backends.append("triton")  # listed so that its cases show the skip reason
    s = Settings(
        device=dev,
        full=full,
        alpha=alpha,
        resolution=res,
        batch=batch,
        dtypes=[R.parse_dtype(d) for d in dtypes],
        layouts=[R.parse_layout(x) for x in layouts],
        backends=backends,
        modes=_split(opt("--bench-modes")) or list(R.MODES),
        layers=layers,
        compile_modes=compile_modes,
        compile_mode=opt("--bench-compile-mode"),
        model_alpha=m_alpha,
        model_resolution=m_res,
        model_batch=m_batch,
    )
    config._dwsep_bench_settings = s
    return s


@dataclass(frozen=True)
class LayerCase:
    layer: Any
    mode: str
    dtype: torch.dtype
    layout: str
    impl: str

    @property
    def id(self) -> str:
        return f"{self.layer.name}-{self.mode}-{R.dtype_name(self.dtype)}-{self.layout}-{self.impl}"

    @property
    def key(self) -> tuple:
        return (self.layer.name, self.mode, self.dtype, self.layout)


@dataclass(frozen=True)
class ModelCase:
    """A whole-model case: MobileNetV1 (dwsep's model vs the reference model)."""

    mode: str
    dtype: torch.dtype
    layout: str
    impl: str
    MODEL: ClassVar[str] = "mobilenetv1"
    KEY: ClassVar[str] = "model"

    @property
    def id(self) -> str:
        return f"{self.MODEL}-{self.mode}-{R.dtype_name(self.dtype)}-{self.layout}-{self.impl}"

    @property
    def key(self) -> tuple:
        return (self.KEY, self.mode, self.dtype, self.layout)


# Existing models converted by dwsep.nn.fuse_conv_bn_act; the timm ones run with --full.
CONVERT_MODELS = ("tv-mobilenetv2", "timm-mobilenetv2_100", "timm-efficientnet_b0")


@dataclass(frozen=True)
class ConvertCase(ModelCase):
    """An existing model (``model``, one of CONVERT_MODELS: torchvision's MobileNetV2, timm's
    mobilenetv2_100 or efficientnet_b0) as is ("eager"), converted by
    dwsep.nn.fuse_conv_bn_act (run on a dwsep backend) or frozen by dwsep.nn.freeze
    ("<backend>+frozen", inference): inference, or a training step."""

    model: str = "tv-mobilenetv2"

    @property
    def id(self) -> str:
        return f"{self.model}-{self.mode}-{R.dtype_name(self.dtype)}-{self.layout}-{self.impl}"

    @property
    def key(self) -> tuple:
        return (self.model, self.mode, self.dtype, self.layout)


def convert_cases(s: Settings) -> list[ConvertCase]:
    cases = []
    for model, mode in itertools.product(CONVERT_MODELS, R.MODEL_MODES):
        impls = ["eager", *s.backends]
        if mode == "inference":  # dwsep.nn.freeze(): BN folded once, one launch per layer
            impls += [f"{b}{R.FROZEN_SUFFIX}" for b in s.backends]
        cases += [ConvertCase(mode, s.dtypes[-1], s.layouts[-1], i, model) for i in impls]
    return cases


def _selected(layer, layers: list[str]) -> bool:
    if not layers:
        return True
    tag = ("dw" if isinstance(layer, DepthwiseLayer) else "pw") + str(layer.index)
    return tag in layers or tag[:2] in layers or layer.name in layers


def layer_cases(s: Settings, kind: str) -> list[LayerCase]:
    dws, pws = mobilenet_v1_layers(s.alpha, s.resolution, s.batch)
    layers = [x for x in (dws if kind == "dw" else pws) if _selected(x, s.layers)]
    cases = []
    for layer, mode, dtype, layout in itertools.product(layers, s.modes, s.dtypes, s.layouts):
        impls = ["eager", *(["compile"] if mode in s.compile_modes else [])]
        if kind == "pw" and mode == "inference":
            impls.append(R.GEMM_REF)
        impls += s.backends
        cases += [LayerCase(layer, mode, dtype, layout, impl) for impl in impls]
    return cases


def model_cases(s: Settings) -> list[ModelCase]:
    cases = []
    for mode in R.MODEL_MODES:
        impls = ["eager", *(["compile"] if s.compile_modes else []), *s.backends]
        if mode == "inference":  # MobileNetV1.freeze(): BN folded once, one launch per layer
            impls += [f"{b}{R.FROZEN_SUFFIX}" for b in s.backends]
        cases += [ModelCase(mode, s.dtypes[-1], s.layouts[-1], impl) for impl in impls]
    return cases


def pytest_generate_tests(metafunc):
    s = get_settings(metafunc.config)
    for name, kind in (("dw_case", "dw"), ("pw_case", "pw")):
        if name in metafunc.fixturenames:
            cases = layer_cases(s, kind)
            metafunc.parametrize(name, cases, ids=[c.id for c in cases])
    if "model_case" in metafunc.fixturenames:
        cases = model_cases(s)
        metafunc.parametrize("model_case", cases, ids=[c.id for c in cases])
    if "convert_case" in metafunc.fixturenames:
        cases = [
            pytest.param(c, marks=pytest.mark.full) if c.model != CONVERT_MODELS[0] else c
            for c in convert_cases(s)
        ]
        metafunc.parametrize("convert_case", cases, ids=[c.id for c in convert_cases(s)])


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="part of the full sweep: run with --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


class BenchSession:
    """Per-session state: the ceilings (measured once, lazily, per dtype) and the baseline
    times measured in this session (for the speedups)."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.ceilings: dict[torch.dtype, RL.Ceilings] = {}
        self.baselines: dict[tuple, float] = {}

    def ceil(self, dtype: torch.dtype) -> RL.Ceilings:
        if dtype not in self.ceilings:
            self.ceilings[dtype] = RL.measure_ceilings(self.s.device, dtype, quick=not self.s.full)
        return self.ceilings[dtype]

    # -- timing ------------------------------------------------------------------------------

    def _measure(self, benchmark, fn, nsets: int) -> tuple[Optional[float], dict[str, Any]]:
        """Time ``fn(i)``: returns (seconds per call, info). GPU: CUDA events (bench_fn), plus
        pytest-benchmark's synchronized wall time; CPU: pytest-benchmark's pedantic rounds."""
        dev = self.s.device
        counter = itertools.count(1)
        if dev.type == "cuda":
            t = bench_fn(fn, dev, nsets, quick=not self.s.full)

            def target():
                fn(next(counter) % nsets)
                torch.cuda.synchronize(dev)

            benchmark.pedantic(target, rounds=max(5, min(50, t.samples)), warmup_rounds=1)
            info = {"timing_method": t.method, "timing": t.to_dict()}
            if t.e2e_median_s is not None:
                info["e2e_ms"] = t.e2e_median_s * 1e3
            return t.median_s, info
        fn(0)  # the first call after the check call can still set things up
        a = _now()
        fn(nsets - 1)
        first = max(_now() - a, 1e-6)
        budget = 1.5 if self.s.full else 0.3
        rounds = int(min(200 if self.s.full else 30, max(3, budget / first)))
        warm = max(1, min(nsets, 5))
        benchmark.pedantic(lambda: fn(next(counter) % nsets), rounds=rounds, warmup_rounds=warm)
        st = getattr(benchmark, "stats", None)
        if st is None:  # --benchmark-disable
            return None, {"timing_method": "benchmark disabled"}
        med = st.stats.median
        return med, {
            "timing_method": f"pytest-benchmark pedantic, perf_counter, median of {rounds} rounds, "
            f"{nsets} input set(s) rotated, {torch.get_num_threads()} thread(s)"
        }

    def _time_baseline(self, key: tuple, make_fn, nsets: int) -> Optional[float]:
        """The eager baseline for ``key``, measured now (outside pytest-benchmark) if this
        session has not measured it yet."""
        if key not in self.baselines:
            fn = make_fn()
            fn(0)
            t = bench_fn(fn, self.s.device, nsets, quick=not self.s.full)
            self.baselines[key] = t.median_s
        return self.baselines.get(key)

    # -- cases -------------------------------------------------------------------------------

    def run_layer(self, benchmark, case: LayerCase) -> None:
        try:
            self._run_layer(benchmark, case)
        finally:
            _empty_cache(self.s.device)

    def run_model(self, benchmark, case: ModelCase) -> None:
        try:
            self._run_model(benchmark, case)
        finally:
            _empty_cache(self.s.device)

    def run_convert(self, benchmark, case: ConvertCase, setup) -> None:
        """``setup(impl)`` -> (step function over input sets, nsets, cost, info), a fresh
        model copy for a training step; the eager step's first output (a training step: its
        loss, from the same weights) is the check, its time the baseline."""
        try:
            _skip_unavailable(case.impl, self.s.device)
            fn, nsets, cost, info = setup(case.impl)
            eager, _, _, _ = setup("eager")
            out = fn(0)
            err = 0.0 if case.impl == "eager" else R.rel_error(out, R._detach(eager(0)))
            del out
            sec, tinfo = self._measure(benchmark, fn, nsets)
            if case.impl == "eager" and sec is not None:
                self.baselines[(*case.key, "eager")] = sec
            base = self._time_baseline((*case.key, "eager"), lambda: eager, nsets)
            info.update(tinfo)
            if sec:
                info["images_per_s"] = info["batch"] / sec
            self._record(benchmark, case, cost, sec, info, base, err, nsets)
            _check_output(case, err, slack=5.0)
        finally:
            _empty_cache(self.s.device)

    def _run_layer(self, benchmark, case: LayerCase) -> None:
        s, dev = self.s, self.s.device
        _skip_unavailable(case.impl, dev)
        nsets = R.nsets_for(case.layer, case.mode, case.dtype, dev)
        inp = R.make_layer_inputs(case.layer, case.mode, case.dtype, case.layout, dev, nsets)
        ref = R._detach(R.layer_step(inp, "eager")(0))
        fn, out = _first_call(lambda: R.layer_step(inp, case.impl, s.compile_mode), case.impl)
        err = R.rel_error(out, ref) if case.impl not in ("eager", R.GEMM_REF) else 0.0
        del out
        cost = RL.layer_cost(case.layer, case.mode, case.dtype)
        sec, info = self._measure(benchmark, fn, nsets)
        if case.impl in R.REFERENCES and sec is not None:
            self.baselines[(*case.key, case.impl)] = sec
        base = self._time_baseline((*case.key, "eager"), lambda: R.layer_step(inp, "eager"), nsets)
        self._record(benchmark, case, cost, sec, info, base, err, nsets)
        _check_output(case, err)

    def _run_model(self, benchmark, case: ModelCase) -> None:
        s, dev = self.s, self.s.device
        _, _, why = R.model_import()
        if why:
            pytest.skip(why)
        _skip_unavailable(case.impl, dev)
        mi = R.make_model_inputs(
            s.model_alpha, s.model_resolution, s.model_batch, case.dtype, case.layout, dev
        )
        fn, out = _first_call(lambda: R.model_step(mi, case.impl, case.mode, s.compile_mode), case.impl)  # fmt: skip
        err = 0.0
        if case.mode == "inference" and case.impl != "eager":
            err = R.rel_error(out, R._detach(R.model_step(mi, "eager", "inference")(0)))
        del out
        mode = "inference" if case.mode == "inference" else "fwd_bwd"
        cost = RL.model_cost(s.model_alpha, s.model_resolution, s.model_batch, mode, case.dtype)
        nsets = len(mi.images)
        sec, info = self._measure(benchmark, fn, nsets)
        if case.impl in R.BASELINES and sec is not None:
            self.baselines[(*case.key, case.impl)] = sec
        base = self._time_baseline(
            (*case.key, "eager"), lambda: R.model_step(mi, "eager", case.mode), nsets
        )
        if sec:
            info["images_per_s"] = s.model_batch / sec
        info.update(alpha=s.model_alpha, resolution=s.model_resolution, batch=s.model_batch)
        self._record(benchmark, case, cost, sec, info, base, err, nsets)
        _check_output(case, err, slack=5.0)

    def _record(self, benchmark, case, cost, sec, info, base, err, nsets) -> None:
        ceil = self.ceil(case.dtype)
        ei = benchmark.extra_info
        ei.update(
            device=dwsep.build_info()["device"],
            dtype=R.dtype_name(case.dtype),
            layout=case.layout,
            mode=case.mode,
            impl=case.impl,
            nsets=nsets,
            flops=cost.flops,
            bytes=cost.bytes,
            bytes_fused=cost.bytes_fused,
            bytes_eager=cost.bytes_eager,
            floor_ms=RL.floor_seconds(cost, ceil) * 1e3,
            bound=RL.bound(cost, ceil),
            copy_GBps=ceil.copy_bytes_per_s / 1e9,
            matmul_TFLOPs=ceil.matmul_flops_per_s / 1e12,
            rel_err_vs_eager=err,
        )
        if isinstance(case, LayerCase):
            ei.update(
                layer=case.layer.name,
                input_shape=list(case.layer.input_shape),
                output_shape=list(R.output_shape(case.layer)),
            )
        ei.update(info)
        if sec:
            ei["time_ms"] = sec * 1e3
            a = RL.achieved(cost, sec, ceil)
            ei.update(GBps=a["GBps"], TFLOPs=a["TFLOPs"], pct_roofline=a["pct_roofline"])
            for b in R.REFERENCES:
                bt = base if b == "eager" else self.baselines.get((*case.key, b))
                if bt:
                    ei[f"baseline_{b}_ms"] = bt * 1e3
                    ei[f"speedup_vs_{b}"] = bt / sec


def _empty_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _now() -> float:
    import time

    return time.perf_counter()


def _skip_unavailable(impl: str, dev: torch.device) -> None:
    if impl in R.REFERENCES:
        return
    why = R.why_skip_backend(R.model_impl_base(impl), dev)
    if why:
        pytest.skip(why)


def _first_call(make, impl: str):
    """Build the step and run it once (compilation, autotuning). A failing torch.compile
    baseline skips the case with the error; a failing dwsep backend fails it."""
    try:
        fn = make()
        return fn, fn(0)
    except Exception as exc:
        msg = R._short_error(exc, 500)
        if impl == "compile":
            pytest.skip(f"torch.compile baseline failed here: {msg}")
        if impl == "eager":
            raise
        pytest.fail(f"dwsep backend {impl!r} failed: {msg}", pytrace=False)


def _check_output(case, err: float, slack: float = 1.0) -> None:
    tol = R.CHECK_TOL[case.dtype] * slack
    if not (err <= tol):
        pytest.fail(
            f"{case.id}: output differs from eager's by {err:.3g} (relative), over the "
            f"{R.dtype_name(case.dtype)} check tolerance {tol:g}: its timing is not a valid comparison"
        )


@pytest.fixture(scope="session")
def bench_session(request) -> BenchSession:
    s = get_settings(request.config)
    if s.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return BenchSession(s)


def pytest_report_header(config):
    s = get_settings(config)
    return (
        f"dwsep bench: device {s.device}, alpha {s.alpha}, {s.resolution}px, batch {s.batch}, "
        f"dtypes {[R.dtype_name(d) for d in s.dtypes]}, layouts {s.layouts}, backends "
        f"{s.backends}, compile baseline in {s.compile_modes or 'no'} mode(s)"
        + (" [full sweep]" if s.full else " [default subset; --full for the sweep]")
    )
