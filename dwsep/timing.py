"""Timing for the benchmarks and the report.

``bench_fn(fn, device, nsets)`` times ``fn(i)``, where ``i`` picks one of ``nsets`` input sets
that the caller prepared. Calls rotate through the sets, so when their total is larger than
the last-level cache (use :func:`rotation_sets`), each call reads its inputs from memory, as in
a real network, instead of from a cache that the previous call warmed.

GPU (CUDA events):
  * Warm-up first (at least one full rotation, and every call until the warm-up time has
    passed), so Triton autotuning, torch.compile, cuDNN's algorithm search
    (``cudnn.benchmark``) and lazy initialisation stay out of the numbers.
  * Each sample is ``calls`` back-to-back calls between two CUDA events, queued behind a
    blocking kernel (``torch.cuda._sleep``) that holds the GPU while the host enqueues them:
    the sample then measures the GPU's own time for the calls, not the host's launch overhead
    (the same idea as nvbench's "blocking kernel"). The median over samples, per call, is
    ``median_s``.
  * ``e2e_median_s`` is measured without the blocking kernel (start from an idle GPU, issue
    the calls, event to event): when the host's per-call overhead is larger than the GPU time
    it shows here, as a user of eager mode would see it.

CPU: ``time.perf_counter`` around each call, after warm-up, median of the calls.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

_FALLBACK_L2 = 50 << 20  # H100
_FALLBACK_LLC = 32 << 20


@dataclass
class Timing:
    """Seconds per call (median, quartiles, extremes over samples)."""

    median_s: float
    min_s: float
    q25_s: float
    q75_s: float
    max_s: float
    mean_s: float
    samples: int
    calls_per_sample: int
    nsets: int
    warmup_calls: int
    method: str
    e2e_median_s: Optional[float] = None

    @property
    def spread(self) -> float:
        """Inter-quartile range over the median (0.05 = 5%)."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["median_ms"] = self.median_s * 1e3
        d["spread"] = self.spread
        if self.e2e_median_s is not None:
            d["e2e_median_ms"] = self.e2e_median_s * 1e3
        return d


def cache_bytes(device: torch.device | str) -> int:
    """The last-level cache that repeated calls could be served from: the GPU's L2, or the
    CPU's largest cache (from sysfs)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(dev)
            size = int(getattr(props, "L2_cache_size", 0) or 0)
            return size if size > 0 else _FALLBACK_L2
        except Exception:
            return _FALLBACK_L2
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    txt = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:].upper(), 1)
            num = txt[:-1] if txt[-1:].isalpha() else txt
            if num.isdigit():
                best = max(best, int(num) * mult)
    except OSError:
        pass
    return best or _FALLBACK_LLC


def rotation_sets(
    bytes_per_set: float, device: torch.device | str, factor: float = 2.0, max_sets: int = 64
) -> int:
    """How many input sets to rotate so that together they exceed ``factor`` times the
    last-level cache (1 when a single set already does)."""
    if bytes_per_set <= 0:
        return 1
    need = factor * cache_bytes(device)
    return int(min(max_sets, max(1, math.ceil(need / bytes_per_set))))


_SLEEP_CYCLES_PER_S: dict[int, float] = {}


def _sleep_rate(dev: torch.device) -> float:
    """Cycles per second of ``torch.cuda._sleep`` on ``dev`` (calibrated once)."""
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SLEEP_CYCLES_PER_S:
        cycles = 20_000_000
        torch.cuda._sleep(1000)
        torch.cuda.synchronize(dev)
        rates = []
        for _ in range(3):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            torch.cuda._sleep(cycles)
            b.record()
            b.synchronize()
            rates.append(cycles / (a.elapsed_time(b) / 1e3))
        _SLEEP_CYCLES_PER_S[idx] = statistics.median(rates)
    return _SLEEP_CYCLES_PER_S[idx]


def _summary(per_call: list[float]) -> tuple[float, float, float, float, float, float]:
    xs = sorted(per_call)
    n = len(xs)
    med = statistics.median(xs)
    if n >= 4:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        q25, q75 = q[0], q[2]
    else:
        q25, q75 = xs[0], xs[-1]
    return med, xs[0], q25, q75, xs[-1], statistics.fmean(xs)


def _defaults(quick: bool, cuda: bool) -> dict[str, float]:
    if cuda:
        return (
            {"target_s": 0.15, "warmup_s": 0.05, "min_samples": 5, "max_samples": 40}
            if quick
            else {"target_s": 0.6, "warmup_s": 0.2, "min_samples": 10, "max_samples": 100}
        )
    return (
        {"target_s": 0.1, "warmup_s": 0.0, "min_samples": 3, "max_samples": 30}
        if quick
        else {"target_s": 1.5, "warmup_s": 0.2, "min_samples": 5, "max_samples": 200}
    )


def bench_fn(
    fn: Callable[[int], Any],
    device: torch.device | str,
    nsets: int = 1,
    *,
    quick: bool = False,
    target_s: Optional[float] = None,
    warmup_s: Optional[float] = None,
    min_samples: Optional[int] = None,
    max_samples: Optional[int] = None,
    max_calls_per_sample: int = 20,
    e2e: bool = True,
) -> Timing:
    """Time ``fn(i)`` (``i`` in ``range(nsets)``, rotated) on ``device``; see the module doc."""
    dev = torch.device(device)
    cfg = _defaults(quick, dev.type == "cuda")
    target_s = cfg["target_s"] if target_s is None else target_s
    warmup_s = cfg["warmup_s"] if warmup_s is None else warmup_s
    min_samples = int(cfg["min_samples"] if min_samples is None else min_samples)
    max_samples = int(cfg["max_samples"] if max_samples is None else max(max_samples, 1))
    min_samples = min(min_samples, max_samples)
    nsets = max(1, int(nsets))
    if dev.type == "cuda":
        return _bench_cuda(
            fn, dev, nsets, target_s, warmup_s, min_samples, max_samples, max_calls_per_sample, e2e
        )
    return _bench_cpu(fn, nsets, target_s, warmup_s, min_samples, max_samples)


def _bench_cpu(fn, nsets, target_s, warmup_s, min_samples, max_samples) -> Timing:
    # Warm-up: one call (allocations, oneDNN primitives), then more until warmup_s has passed.
    t0 = time.perf_counter()
    warm = 0
    while warm < 1 or (warm < nsets and time.perf_counter() - t0 < warmup_s):
        fn(warm % nsets)
        warm += 1
        if warm >= 1000:
            break
    per_call: list[float] = []
    total = 0.0
    i = warm
    while len(per_call) < max_samples and (len(per_call) < min_samples or total < target_s):
        a = time.perf_counter()
        fn(i % nsets)
        dt = time.perf_counter() - a
        per_call.append(dt)
        total += dt
        i += 1
    med, lo, q25, q75, hi, mean = _summary(per_call)
    return Timing(
        med, lo, q25, q75, hi, mean, len(per_call), 1, nsets, warm,
        f"perf_counter per call, median of {len(per_call)}, {nsets} input set(s) rotated, "
        f"{torch.get_num_threads()} thread(s)",
    )  # fmt: skip


def _bench_cuda(
    fn, dev, nsets, target_s, warmup_s, min_samples, max_samples, max_calls, e2e
) -> Timing:
    with torch.cuda.device(dev):
        torch.cuda.synchronize(dev)
        # Warm-up: a full rotation (autotuning / compilation happen here), then until warmup_s.
        t0 = time.perf_counter()
        warm = 0
        while True:
            for _ in range(max(2, nsets)):
                fn(warm % nsets)
                warm += 1
            torch.cuda.synchronize(dev)
            if time.perf_counter() - t0 >= warmup_s or warm >= 400:
                break
        # Estimate the host's issue time and the GPU time per call.
        probe = max(2, min(nsets, max_calls))
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        a.record()
        for j in range(probe):
            fn((warm + j) % nsets)
        host = (time.perf_counter() - h0) / probe
        b.record()
        b.synchronize()
        warm += probe
        gpu_est = max(a.elapsed_time(b) / 1e3 / probe, 1e-7)
        calls = int(min(max_calls, max(1, math.ceil(1e-3 / gpu_est))))
        samples = int(min(max_samples, max(min_samples, math.ceil(target_s / (calls * gpu_est)))))
        have_sleep = hasattr(torch.cuda, "_sleep")
        cycles = 0
        if have_sleep:
            sleep_s = min(0.5, 1.5 * calls * host + 1e-4)
            cycles = int(sleep_s * _sleep_rate(dev))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
        i = warm
        for s in range(samples):
            if have_sleep:
                torch.cuda._sleep(cycles)
            starts[s].record()
            for _ in range(calls):
                fn(i % nsets)
                i += 1
            ends[s].record()
        torch.cuda.synchronize(dev)
        per_call = [starts[s].elapsed_time(ends[s]) / 1e3 / calls for s in range(samples)]
        e2e_med = None
        if e2e:
            vals = []
            for _ in range(3):
                torch.cuda.synchronize(dev)
                a.record()
                for _ in range(calls):
                    fn(i % nsets)
                    i += 1
                b.record()
                b.synchronize()
                vals.append(a.elapsed_time(b) / 1e3 / calls)
            e2e_med = statistics.median(vals)
    med, lo, q25, q75, hi, mean = _summary(per_call)
    how = "queued behind a blocking kernel" if have_sleep else "no blocking kernel available"
    return Timing(
        med, lo, q25, q75, hi, mean, samples, calls, nsets, warm,
        f"CUDA events, {calls} call(s) per sample {how}, median of {samples} samples, "
        f"{nsets} input set(s) rotated",
        e2e_med,
    )  # fmt: skip
