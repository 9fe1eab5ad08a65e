"""Per-kernel GPU time of MobileNetV1 layers, from the PyTorch profiler: which kernel of a fused
op (statistics, finalize, backward reduction, backward) costs what, next to eager's kernels.

    python bench/profile_layers.py                         # dw2 and pw6, fwd_bwd, bf16 NHWC b256
    python bench/profile_layers.py --layers dw2,dw6 --modes train_fwd,fwd_bwd --impls cuda,triton
    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        python bench/profile_layers.py --ncu --layers pw2 --modes inference --impls cuda,triton

Prints one table per (layer, mode, implementation): the kernels by self GPU time per call. The
profiler adds little per kernel, but these are not the benchmark's numbers (those come from
``python -m dwsep bench``); use them to see where the time goes. Needs a CUDA device
(``--device cpu`` dry-runs it on CPU tensors).
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from dwsep import report as R

CALLS = 5


def _layers(names: str, batch: int) -> list:
    """The MobileNetV1-1.0-224 layers that ``dwsep bench --layers`` would select."""
    cfg = SimpleNamespace(alpha=1.0, resolution=224, batch=batch, layers=names.split(","))
    return R.select_layers(cfg)


def _self_us(evt, device: str) -> float:
    attrs = ("self_cpu_time_total",)
    if device == "cuda":
        attrs = ("self_device_time_total", "self_cuda_time_total")
    for attr in attrs:
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def _warm_step(layer, mode: str, impl: str, dtype: torch.dtype, layout: str, device: str):
    """The case's step function, called three times (compile, autotune, warm up) and synced."""
    inp = R.make_layer_inputs(layer, mode, dtype, layout, device, nsets=1)
    fn = R.layer_step(inp, impl)
    for _ in range(3):
        fn(0)
    if device == "cuda":
        torch.cuda.synchronize()
    return fn


def profile_case(
    layer, mode: str, impl: str, dtype: torch.dtype, layout: str, rows: int, device: str = "cuda"
) -> str:
    fn = _warm_step(layer, mode, impl, dtype, layout, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    act = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[act]) as prof:
        for _ in range(CALLS):
            fn(0)
        sync()
    evts = [e for e in prof.key_averages() if _self_us(e, device) > 0]
    evts.sort(key=lambda e: _self_us(e, device), reverse=True)
    total = sum(_self_us(e, device) for e in evts) / CALLS
    where = "GPU" if device == "cuda" else "CPU (self, all ops)"
    lines = [f"### {layer.name} {mode} {impl}: {total:.1f} us of {where} time per call", ""]
    lines += ["| kernel | calls/call | us/call | share |", "|---|---|---|---|"]
    for e in evts[:rows]:
        us = _self_us(e, device) / CALLS
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        name = name.replace("|", "/")
        lines.append(f"| `{name}` | {e.count / CALLS:g} | {us:.1f} | {us / total:.0%} |")
    return "\n".join(lines) + "\n"


def ncu_case(layer, mode: str, impl: str, dtype: torch.dtype, layout: str, device: str) -> str:
    """One call of the case inside cudaProfilerStart/Stop, after the warm-up (compilation,
    autotuning): run the script under ``ncu --profile-from-start off`` and only these calls'
    kernels are profiled, in the order the cases are printed."""
    fn = _warm_step(layer, mode, impl, dtype, layout, device)
    if device == "cuda":
        torch.cuda.cudart().cudaProfilerStart()
    fn(0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    return f"### {layer.name} {mode} {impl}: one call profiled"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--layers", default="dw2,pw6", help="as dwsep bench --layers (dw0..pw12, dw, pw)"
    )
    ap.add_argument("--modes", default="fwd_bwd", help="comma list of inference,train_fwd,fwd_bwd")
    ap.add_argument("--impls", default="eager,cuda,triton", help="eager and/or dwsep backends")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--layout", default="channels_last")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rows", type=int, default=12, help="kernels shown per table")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to dry-run this script")
    ap.add_argument(
        "--ncu",
        action="store_true",
        help="no profiler tables: bracket one warm call per case with cudaProfilerStart/Stop, "
        "for `ncu --profile-from-start off` (bench/gpu_check.sh, step ncu)",
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_layers: needs a CUDA device (or --device cpu)", file=sys.stderr)
        return 2
    dtype, layout = R.parse_dtype(args.dtype), R.parse_layout(args.layout)
    torch.backends.cudnn.benchmark = True
    dev_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"# Per-kernel time: {dev_name}, {args.dtype} {layout}, batch {args.batch}\n")
    failed = 0
    for layer in _layers(args.layers, args.batch):
        for mode in args.modes.split(","):
            for impl in args.impls.split(","):
                try:
                    if args.ncu:
                        text = ncu_case(layer, mode, impl, dtype, layout, args.device)
                    else:
                        text = profile_case(
                            layer, mode, impl, dtype, layout, args.rows, args.device
                        )
                    print(text, flush=True)
                except Exception as exc:  # report and go on with the other cases
                    failed += 1
                    print(f"### {layer.name} {mode} {impl}: FAILED: {exc!r}\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
