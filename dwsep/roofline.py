"""Roofline arithmetic for the fused ops, and the two ceilings measured on the current device.

Every number the benchmarks print as "GB/s", "TFLOP/s" or "% of roofline" comes from here.

Counting (all counts are for one call of one layer at the given batch):

FLOPs
    2 per multiply-add of the convolutions / GEMMs (the usual convention; 9 multiply-adds per
    depthwise output element, including the zero-padded taps at the border; ``Cin`` per
    pointwise output element). BatchNorm, the activation and the reductions are not counted
    (a few operations per element, under 20% of a depthwise layer and ~0 of a pointwise one).

    ========== ================================================================
    inference  the forward convolution
    train_fwd  the forward convolution (computed once; recomputation is a choice)
    fwd_bwd    forward + the input-gradient conv + the weight-gradient conv (3x)
    ========== ================================================================

Bytes, three counts (element size of the activation dtype; per-channel vectors in the
accumulation dtype, fp32, or fp64 for fp64 inputs):

``bytes`` (the floor, used for GB/s and % of roofline)
    Each input read once, each output written once, nothing else: the fewest bytes any
    implementation must move.

    ========== ==================================================================
    inference  read x and the weight, write y                  (x + y + W)
    train_fwd  the same                                         (x + y + W)
    fwd_bwd    forward (x + y + W), then backward: read grad_y, x and W, write
               grad_x and grad_W                                (3x + 2y + 3W)
    ========== ==================================================================

    For training this floor is strict: batch statistics must be complete before any output
    is normalized, so a real schedule makes a second pass (``bytes_fused`` below), and about
    50-70% of this floor is the practical limit in the training modes.

``bytes_fused`` (dwsep's schedule: the passes of the op contract, each reading its inputs
once and writing its outputs once; for context)
    depthwise: inference dw_fwd; train_fwd dw_stats + dw_fwd (x read twice, the conv
    recomputed; the cpu backend instead writes z and reads it back where that measured
    faster, ``ops._cpu_dw_one_pass``: counted here as the GPU schedule); fwd_bwd adds
    dw_bwd_reduce (reads grad_y, y, x) and dw_bwd (reads grad_y, y, x, writes grad_x, grad_W).
    pointwise: inference pw_fwd; train_fwd pw_fwd_stats (writes z) + bn_act (reads z,
    writes y); fwd_bwd adds pw_bwd_reduce (reads grad_y, z) and pw_bwd (reads grad_y, z, x,
    W, writes grad_x, grad_W).

``bytes_eager`` (PyTorch eager with conv, BatchNorm and the activation as separate kernels;
an approximation for context)
    inference: conv (x -> z), batch_norm (z -> z'), relu6 (z' -> y). Training adds a
    statistics read of z. The backward: relu6 backward (reads grad_y and its input, writes),
    BN backward (a reduction pass over grad and z, then an elementwise pass that writes), the
    conv's input gradient (reads grad, W, writes grad_x) and weight gradient (reads grad, x).

Per-channel vectors (each ``C_out`` long, acc dtype), counted the same way in all three:
inference 2 (the folded scale and shift), train_fwd 6 (gamma, beta read; running mean and
var read and written), fwd_bwd 11 (the forward's 6, plus gamma and the saved mean and invstd
read, and the gamma and beta gradients written).

Ceilings (measured in the same run, on the same device, never taken from a datasheet):
    copy bandwidth  a device-to-device copy of a large buffer (1 GiB on a GPU, 256 MiB on a
                    CPU, both far over the last-level cache): bytes read + bytes written over
                    the median time.
    matmul rate     a large square matmul in the benchmark dtype (8192^3 on a GPU, 2048^3 on
                    a CPU; random data, never zeros): 2 n^3 over the median time.

The floor time is ``max(bytes / bandwidth, flops / matmul_rate)``; "% of roofline" is
``floor / measured time``. The matmul rate is a generous compute ceiling for depthwise layers
(they cannot use the matrix units), which are memory-bound by a wide margin anyway (1.8-4.5
FLOP/B against a balance point of a few hundred).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch

from .shapes import DepthwiseLayer, PointwiseLayer, channels, conv_out, mobilenet_v1_layers

MODES = ("inference", "train_fwd", "fwd_bwd")
_VECTORS = {"inference": 2, "train_fwd": 6, "fwd_bwd": 11}

Layer = Union[DepthwiseLayer, PointwiseLayer]


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one call (see the module docstring for what is counted)."""

    flops: float
    bytes: float
    bytes_fused: float
    bytes_eager: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity against the floor bytes, FLOP per byte."""
        return self.flops / self.bytes if self.bytes else math.inf

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops,
            self.bytes + other.bytes,
            self.bytes_fused + other.bytes_fused,
            self.bytes_eager + other.bytes_eager,
        )

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["intensity"] = self.intensity
        return d


ZERO = Cost(0.0, 0.0, 0.0, 0.0)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def acc_size(dtype: torch.dtype) -> int:
    """Bytes of one per-channel vector element: fp64 for fp64 inputs, else fp32."""
    return 8 if dtype == torch.float64 else 4


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _cost(
    kind: str, mode: str, x: int, y: int, w: int, cout: int, fwd_flops: float, e: int, a: int
) -> Cost:
    """Shared counting for a conv + BN + act op. ``x``, ``y``, ``w``: elements of the input,
    output and weight; ``kind``: ``"recompute"`` (depthwise: the training schedule reads x
    twice) or ``"store_z"`` (pointwise: the training schedule writes z and reads it back)."""
    _check_mode(mode)
    vec = _VECTORS[mode] * cout * a
    if mode == "inference":
        floor = x + y + w
        fused = x + y + w
        eager = (x + w + y) + 2 * y + 2 * y  # conv, BN (read, write), relu6 (read, write)
        flops = fwd_flops
    else:
        floor_fwd = x + y + w
        if kind == "recompute":
            fused_fwd = (x + w) + (x + w + y)  # dw_stats; dw_fwd
        else:
            fused_fwd = (x + w + y) + 2 * y  # pw_fwd_stats writes z; bn_act reads z, writes y
        eager_fwd = (x + w + y) + y + 2 * y + 2 * y  # conv; BN stats; BN normalize; relu6
        if mode == "train_fwd":
            floor, fused, eager, flops = floor_fwd, fused_fwd, eager_fwd, fwd_flops
        else:
            floor = floor_fwd + (y + x + w) + (x + w)  # read grad_y, x, W; write grad_x, grad_W
            if kind == "recompute":
                # dw_bwd_reduce reads grad_y, y, x, W; dw_bwd reads them again, writes gx, gW
                fused = fused_fwd + (2 * y + x + w) + (2 * y + x + w) + (x + w)
            else:
                # pw_bwd_reduce reads grad_y, z; pw_bwd reads grad_y, z, x, W, writes gx, gW
                fused = fused_fwd + 2 * y + (2 * y + x + w) + (x + w)
            eager = (
                eager_fwd
                + 3 * y  # relu6 backward: read grad_y and its input, write
                + 2 * y  # BN backward reduction pass: read grad and z
                + 3 * y  # BN backward elementwise pass: read grad and z, write
                + (y + w + x)  # conv input gradient: read grad and W, write grad_x
                + (y + x + w)  # conv weight gradient: read grad and x, write grad_W
            )
            flops = 3 * fwd_flops
    return Cost(
        float(flops), float(floor * e + vec), float(fused * e + vec), float(eager * e + vec)
    )


def depthwise_cost(layer: DepthwiseLayer, mode: str, dtype: torch.dtype) -> Cost:
    """Cost of one fused depthwise 3x3 conv + BN + act call on ``layer`` (batch included)."""
    n, c, h, w = layer.input_shape
    ho, wo = layer.out_hw
    x, y = n * c * h * w, n * c * ho * wo
    return _cost(
        "recompute", mode, x, y, 9 * c, c, 2.0 * 9 * y, element_size(dtype), acc_size(dtype)
    )


def pointwise_cost(layer: PointwiseLayer, mode: str, dtype: torch.dtype) -> Cost:
    """Cost of one fused pointwise 1x1 conv (GEMM) + BN + act call on ``layer``."""
    n, cin, h, w = layer.input_shape
    cout = layer.out_channels
    m = n * h * w
    return _cost(
        "store_z",
        mode,
        m * cin,
        m * cout,
        cin * cout,
        cout,
        2.0 * m * cin * cout,
        element_size(dtype),
        acc_size(dtype),
    )


def layer_cost(layer: Layer, mode: str, dtype: torch.dtype) -> Cost:
    if isinstance(layer, DepthwiseLayer):
        return depthwise_cost(layer, mode, dtype)
    if isinstance(layer, PointwiseLayer):
        return pointwise_cost(layer, mode, dtype)
    raise TypeError(f"layer must be a DepthwiseLayer or PointwiseLayer, got {type(layer).__name__}")


def stem_cost(
    alpha: float, resolution: int, batch: int, mode: str, dtype: torch.dtype, in_chans: int = 3
) -> Cost:
    """The 3x3 stride-2 stem conv + BN + act, counted like a fused op that keeps z."""
    cs = channels(32, alpha)
    ho = conv_out(resolution, 2)
    x = batch * in_chans * resolution * resolution
    y = batch * cs * ho * ho
    flops = 2.0 * 9 * in_chans * y
    return _cost(
        "store_z", mode, x, y, 9 * in_chans * cs, cs, flops, element_size(dtype), acc_size(dtype)
    )


def head_cost(
    alpha: float, resolution: int, batch: int, mode: str, dtype: torch.dtype, classes: int = 1000
) -> Cost:
    """Global average pool + Linear: read the last activation, the FC weight; write logits.
    Training adds reading grad_logits and the FC weight again, and writing the pooled-feature
    gradient spread back over the last activation and the FC weight gradient."""
    _check_mode(mode)
    _, pws = mobilenet_v1_layers(alpha, resolution, batch)
    last = pws[-1]
    c = last.out_channels
    act = batch * c * last.height * last.width
    fc = c * classes + classes
    e = element_size(dtype)
    if mode == "fwd_bwd":
        elems = act + fc + batch * classes + batch * classes + fc + act + fc
        flops = 3 * 2.0 * batch * c * classes
    else:
        elems = act + fc + batch * classes
        flops = 2.0 * batch * c * classes
    b = float(elems * e)
    return Cost(flops, b, b, b)


def model_cost(
    alpha: float, resolution: int, batch: int, mode: str, dtype: torch.dtype, classes: int = 1000
) -> Cost:
    """MobileNetV1 as a sequence of separately fused ops (stem, 13 dw, 13 pw, head)."""
    dws, pws = mobilenet_v1_layers(alpha, resolution, batch)
    total = stem_cost(alpha, resolution, batch, mode, dtype) + head_cost(
        alpha, resolution, batch, mode, dtype, classes
    )
    for layer in (*dws, *pws):
        total = total + layer_cost(layer, mode, dtype)
    return total


# --------------------------------------------------------------------------------------------
# Ceilings


@dataclass
class Ceilings:
    """The two roofline ceilings, measured on ``device`` in this run."""

    device: str
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    matmul_dtype: str
    matmul_n: int
    copy_buffer_bytes: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def balance(self) -> float:
        """FLOP/B where the two ceilings meet."""
        return self.matmul_flops_per_s / self.copy_bytes_per_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["copy_GBps"] = self.copy_bytes_per_s / 1e9
        d["matmul_TFLOPs"] = self.matmul_flops_per_s / 1e12
        d["balance_flop_per_byte"] = self.balance
        return d


def measure_copy_bandwidth(
    device: torch.device | str, nbytes: int | None = None, quick: bool = False
) -> tuple[float, int, dict[str, Any]]:
    """Copy bandwidth (bytes read + bytes written per second) of a large device-to-device copy.

    Returns (bytes/s, buffer bytes, details)."""
    from .timing import bench_fn

    dev = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
        if quick and dev.type != "cuda":
            nbytes = 128 << 20
    n = nbytes // 4
    src = torch.rand(n, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = bench_fn(
        lambda i: dst.copy_(src), dev, nsets=1, quick=quick, target_s=0.3 if quick else 1.0
    )
    return 2.0 * n * 4 / t.median_s, n * 4, {"copy": t.to_dict()}


def measure_matmul_rate(
    device: torch.device | str, dtype: torch.dtype, n: int | None = None, quick: bool = False
) -> tuple[float, int, dict[str, Any]]:
    """Rate (FLOP/s) of an n x n x n matmul in ``dtype`` on random data. Returns
    (flop/s, n, details). fp32 on a GPU follows torch's current TF32 setting."""
    from .timing import bench_fn

    dev = torch.device(device)
    if n is None:
        n = 8192 if dev.type == "cuda" else (1024 if quick else 2048)
    a = torch.randn(n, n, device=dev, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=dev, dtype=torch.float32).to(dtype)
    t = bench_fn(
        lambda i: torch.mm(a, b), dev, nsets=1, quick=quick, target_s=0.3 if quick else 1.0
    )
    return 2.0 * n**3 / t.median_s, n, {"matmul": t.to_dict()}


def measure_ceilings(
    device: torch.device | str, dtype: torch.dtype = torch.float32, quick: bool = False
) -> Ceilings:
    """Measure both ceilings on ``device`` now (in the run that reports against them)."""
    dev = torch.device(device)
    bw, nbytes, d1 = measure_copy_bandwidth(dev, quick=quick)
    rate, n, d2 = measure_matmul_rate(dev, dtype, quick=quick)
    details = {**d1, **d2}
    if dev.type == "cuda":
        details["allow_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        details["threads"] = torch.get_num_threads()
    return Ceilings(
        device=str(dev),
        copy_bytes_per_s=bw,
        matmul_flops_per_s=rate,
        matmul_dtype=str(dtype).replace("torch.", ""),
        matmul_n=n,
        copy_buffer_bytes=nbytes,
        details=details,
    )


def floor_seconds(cost: Cost, ceil: Ceilings) -> float:
    """Roofline floor: max(bytes / bandwidth, flops / matmul rate)."""
    return max(cost.bytes / ceil.copy_bytes_per_s, cost.flops / ceil.matmul_flops_per_s)


def bound(cost: Cost, ceil: Ceilings) -> str:
    """ "memory" or "compute": which ceiling sets the floor."""
    mem = cost.bytes / ceil.copy_bytes_per_s
    return "memory" if mem >= cost.flops / ceil.matmul_flops_per_s else "compute"


def achieved(cost: Cost, seconds: float, ceil: Ceilings | None = None) -> dict[str, float]:
    """GB/s (floor bytes over the measured time), TFLOP/s, and, with ``ceil``, the floor and
    the percentage of it reached (100 = at the roofline)."""
    out = {"GBps": cost.bytes / seconds / 1e9, "TFLOPs": cost.flops / seconds / 1e12}
    if ceil is not None:
        fl = floor_seconds(cost, ceil)
        out["floor_ms"] = fl * 1e3
        out["pct_roofline"] = 100.0 * fl / seconds
    return out


def percent_of_roofline(cost: Cost, ceil: Ceilings, seconds: float) -> float:
    return 100.0 * floor_seconds(cost, ceil) / seconds
