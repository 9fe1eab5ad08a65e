"""The benchmark arithmetic (bytes, FLOPs, roofline floor) against hand counts, the timing
helpers, and a smoke run of ``python -m dwsep bench --quick`` on a tiny configuration."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from dwsep import report as R
from dwsep import roofline as RL
from dwsep.shapes import mobilenet_v1_layers
from dwsep.timing import bench_fn, cache_bytes, rotation_sets

ROOT = Path(__file__).resolve().parent.parent


def _layers(alpha=1.0, res=224, batch=1):
    return mobilenet_v1_layers(alpha, res, batch)


def test_depthwise_stride1_bf16_inference_by_hand():
    dw0 = _layers()[0][0]  # 32 channels, 112x112, stride 1
    c = RL.depthwise_cost(dw0, "inference", torch.bfloat16)
    # x: 32*112*112 = 401408 elements, y the same, weight 32*9 = 288; bf16 = 2 bytes;
    # 2 fp32 vectors of 32 (scale, shift) = 256 bytes.
    assert c.bytes == (401408 + 401408 + 288) * 2 + 256 == 1606464
    assert c.flops == 2 * 9 * 401408 == 7225344
    assert c.bytes_fused == c.bytes
    # eager: conv (x, w -> z), BN (z -> z'), relu6 (z' -> y): x + w + 5y
    assert c.bytes_eager == (401408 + 288 + 5 * 401408) * 2 + 256


def test_depthwise_stride2_fp32_all_modes_by_hand():
    dw1 = _layers()[0][1]  # 64 channels, 112x112 -> 56x56
    x, y, w = 64 * 112 * 112, 64 * 56 * 56, 64 * 9
    assert (x, y, w) == (802816, 200704, 576)
    inf = RL.depthwise_cost(dw1, "inference", torch.float32)
    assert inf.bytes == 4 * (x + y + w) + 2 * 64 * 4 == 4016896
    assert inf.flops == 18 * y == 3612672
    tr = RL.depthwise_cost(dw1, "train_fwd", torch.float32)
    assert tr.flops == inf.flops
    assert tr.bytes == 4 * (x + y + w) + 6 * 64 * 4
    # dw_stats reads x; dw_fwd reads x again and writes y
    assert tr.bytes_fused == 4 * (2 * x + y + 2 * w) + 6 * 64 * 4 == 7231488
    fb = RL.depthwise_cost(dw1, "fwd_bwd", torch.float32)
    assert fb.flops == 3 * 3612672
    # forward x + y + w, backward reads grad_y, x, w and writes grad_x, grad_w
    assert fb.bytes == 4 * (3 * x + 2 * y + 3 * w) + 11 * 64 * 4 == 11249152
    # fused: fwd (2x + y + 2w), bwd_reduce (2y + x + w), bwd (2y + x + w, writes x + w)
    assert fb.bytes_fused == 4 * (5 * x + 5 * y + 5 * w) + 11 * 64 * 4


def test_pointwise_last_layer_by_hand():
    pw12 = _layers(batch=256)[1][12]  # 1024 -> 1024 at 7x7, batch 256
    m = 256 * 7 * 7
    c = RL.pointwise_cost(pw12, "inference", torch.bfloat16)
    assert c.flops == 2 * 12544 * 1024 * 1024 == 26306674688
    assert c.bytes == 2 * (m * 1024 + m * 1024 + 1024 * 1024) + 2 * 1024 * 4 == 53485568
    assert c.intensity == pytest.approx(26306674688 / 53485568)
    tr = RL.pointwise_cost(pw12, "train_fwd", torch.bfloat16)
    # pw_fwd_stats writes z; bn_act reads z and writes y
    assert tr.bytes_fused == 2 * (m * 1024 + 3 * m * 1024 + 1024 * 1024) + 6 * 1024 * 4
    fb = RL.pointwise_cost(pw12, "fwd_bwd", torch.bfloat16)
    assert fb.flops == 3 * c.flops


def test_model_flops_match_the_paper():
    # Howard et al. 2017, Table 1/8: 569M multiply-adds at alpha 1, 224x224 (1000 classes).
    c = RL.model_cost(1.0, 224, 1, "inference", torch.bfloat16)
    assert c.flops / 2 == pytest.approx(568.7e6, rel=2e-3)
    # 325M at alpha 0.75 and 150M at 0.5 (Table 6)
    assert RL.model_cost(0.75, 224, 1, "inference", torch.float32).flops / 2 == pytest.approx(
        325e6, rel=0.01
    )
    assert RL.model_cost(0.5, 224, 1, "inference", torch.float32).flops / 2 == pytest.approx(
        149e6, rel=0.01
    )


def test_floor_and_percent_of_roofline():
    ceil = RL.Ceilings("test", 1e12, 1e14, "bfloat16", 8192, 1 << 30)
    assert ceil.balance == 100.0
    dw0 = _layers(batch=256)[0][0]
    c = RL.depthwise_cost(dw0, "inference", torch.bfloat16)
    assert RL.bound(c, ceil) == "memory"
    assert RL.floor_seconds(c, ceil) == pytest.approx(c.bytes / 1e12)
    pw12 = _layers(batch=256)[1][12]
    p = RL.pointwise_cost(pw12, "inference", torch.bfloat16)
    assert RL.bound(p, ceil) == "compute"  # intensity ~492 > balance 100
    assert RL.floor_seconds(p, ceil) == pytest.approx(26306674688 / 1e14)
    t = 2 * RL.floor_seconds(p, ceil)
    assert RL.percent_of_roofline(p, ceil, t) == pytest.approx(50.0)
    a = RL.achieved(p, t, ceil)
    assert a["GBps"] == pytest.approx(p.bytes / t / 1e9)
    assert a["TFLOPs"] == pytest.approx(p.flops / t / 1e12)
    assert a["pct_roofline"] == pytest.approx(50.0)
    assert a["floor_ms"] == pytest.approx(t / 2 * 1e3)


def test_bad_mode_and_layer():
    dw0 = _layers()[0][0]
    with pytest.raises(ValueError, match="mode must be one of"):
        RL.depthwise_cost(dw0, "backward", torch.float32)
    with pytest.raises(TypeError, match="DepthwiseLayer or PointwiseLayer"):
        RL.layer_cost(object(), "inference", torch.float32)


def test_rotation_sets():
    llc = cache_bytes("cpu")
    assert llc > 0
    assert rotation_sets(llc / 4, "cpu") == 8  # 2x the cache in sets of a quarter of it
    assert rotation_sets(10 * llc, "cpu") == 1
    assert rotation_sets(1, "cpu", max_sets=16) == 16


def test_bench_fn_cpu_rotates_and_measures():
    seen = []

    def fn(i):
        seen.append(i)
        time.sleep(0.002)

    t = bench_fn(fn, "cpu", nsets=3, quick=True)
    assert set(seen) == {0, 1, 2}
    assert t.samples >= 3
    assert 0.002 <= t.median_s < 0.05
    assert t.min_s <= t.median_s <= t.max_s
    assert "perf_counter" in t.method


def test_speedups_and_summary():
    results = {"eager": {"ms": 2.0}, "compile": {"ms": 1.0}, "torch": {"ms": 0.5}}
    R._add_speedups(results)
    assert results["torch"]["speedup_vs_eager"] == pytest.approx(4.0)
    assert results["torch"]["speedup_vs_compile"] == pytest.approx(2.0)
    recs = [
        {"op": "dw", "mode": "inference", "name": "a", "results": {"eager": {"ms": 2.0}, "x": {"ms": 1.0}}},
        {"op": "dw", "mode": "inference", "name": "b", "results": {"eager": {"ms": 8.0}, "x": {"ms": 1.0}}},
    ]  # fmt: skip
    (row,) = R.summarize(recs)
    assert row["impl"] == "x"
    assert row["geomean_vs_eager"] == pytest.approx(4.0)  # sqrt(2 * 8)
    assert row["sum_ratio_vs_eager"] == pytest.approx(5.0)  # 10 / 2
    assert row["n_vs_eager"] == 2


def test_rel_error():
    a = torch.randn(100, dtype=torch.float64)
    assert R.rel_error(a, a) == 0.0
    assert R.rel_error(a * (1 + 1e-3), a) == pytest.approx(1e-3)
    bad = a.clone()
    bad[3] = float("nan")
    assert R.rel_error(bad, a) == math.inf


def test_parse_options():
    assert R.parse_dtype("bf16") is torch.bfloat16
    assert R.parse_layout("NHWC") == "channels_last"
    with pytest.raises(ValueError, match="dtype must be"):
        R.parse_dtype("int8")
    with pytest.raises(ValueError, match="layout must be"):
        R.parse_layout("nc")


def test_source_revision_hashes_kernel_sources():
    rev = R.source_revision(ROOT)
    if not (ROOT / "csrc").is_dir():
        pytest.skip("no csrc/ next to the package (installed copy)")
    assert rev["kernels_files"] > 0
    assert len(rev["kernels_sha256"]) == 64


def test_malloc_setup_named_in_cpu_reports(monkeypatch):
    """CPU timings depend on the allocator (page faults on freed outputs): the report says which
    settings it ran under."""
    for k in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD", "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k, raising=False)
    assert R.malloc_setup() == "glibc malloc defaults"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libfoo.so /usr/lib/x86_64/libjemalloc.so.2")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.x=1:glibc.malloc.trim_threshold=99")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    assert R.malloc_setup() == (
        "LD_PRELOAD libjemalloc.so.2, GLIBC_TUNABLES glibc.malloc.trim_threshold=99, "
        "MALLOC_ARENA_MAX=2, MALLOC_TRIM_THRESHOLD_=4096"
    )
    env = R.environment(torch.device("cpu"))
    assert env["malloc"] == R.malloc_setup()


def test_bench_quick_smoke(tmp_path):
    """`python -m dwsep bench --quick` on a tiny config writes valid JSON, Markdown and PNG."""
    out = tmp_path / "rep"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "dwsep", "bench", "--quick", "--device", "cpu",
        "--alpha", "0.25", "--resolution", "32", "--batch", "2", "--backend", "torch",
        "--compile", "none", "--layers", "dw0,dw1,pw12", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["dtype"] == "fp32" and rep["config"]["batch"] == 2
    assert rep["ceilings"]["copy_GBps"] > 0 and rep["ceilings"]["matmul_TFLOPs"] > 0
    names = {(r["name"], r["mode"]) for r in rep["layers"]}
    assert len(names) == 3 * 3
    for r in rep["layers"]:
        for impl in ("eager", "torch"):
            res = r["results"][impl]
            assert "error" not in res, res
            assert res["ms"] > 0 and res["GBps"] > 0 and 0 < res["pct_roofline"]
        # the torch backend is the same math as eager: the check must pass
        assert r["results"]["torch"]["check_ok"] is True
        assert r["results"]["torch"]["speedup_vs_eager"] > 0
    assert {(s["op"], s["mode"]) for s in rep["summary"]} == {
        (op, m) for op in ("dw", "pw") for m in R.MODES
    }
    model = rep["model"]
    assert "error" in model or model["inference"]["results"]["eager"]["images_per_s"] > 0
    if "error" in model:
        assert "MobileNetV1 not available" in model["error"] or "failed" in model["error"]
    md = (out / "report.md").read_text()
    assert "# dwsep benchmark report" in md and "dw00_c8_16x16_s1" in md
    assert "allocator: " in md and rep["environment"]["malloc"]
    if importlib.util.find_spec("matplotlib") is None:  # optional: the [bench] extra
        assert "plot not written" in md and not (out / "report.png").exists()
    else:
        png = (out / "report.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "wrote" in proc.stdout


def test_checkpoints_keep_the_model_cases_done(monkeypatch):
    """run() hands a partial report to ``checkpoint`` after the layer part and after every model
    case, so a run killed in the model part keeps what it measured; each renders as Markdown."""
    import argparse

    p = argparse.ArgumentParser()
    R.add_arguments(p)
    args = p.parse_args(
        ["--quick", "--device", "cpu", "--alpha", "0.25", "--resolution", "32", "--batch", "1",
         "--backend", "torch", "--compile", "none", "--layers", "none"]
    )  # fmt: skip
    cfg = R.config_from_args(args)
    seen = []
    # a copy: the live report is still being filled in (write_outputs writes it out at once)
    rep = R.run(
        cfg,
        checkpoint=lambda part: seen.append((json.loads(json.dumps(part)), R.to_markdown(part))),
    )
    n_cases = sum(len(R._model_impls(cfg, m)) for m in R.MODEL_MODES)
    assert len(seen) == 1 + n_cases
    assert all(part["partial"] for part, _ in seen) and "partial" not in rep
    assert "model" not in seen[0][0] and "(model part not run)" in seen[0][1]
    done = [
        sum(len(sec["results"]) for m, sec in part["model"].items() if m in R.MODEL_MODES)
        for part, _ in seen[1:]
    ]
    assert done == list(range(1, n_cases + 1))
    last, md = seen[-1]
    assert "partial report" in md and "MobileNetV1 inference" in md
    assert last["model"]["inference"]["results"]["eager"]["images_per_s"] > 0


def test_graph_option_adds_graphed_inference_cases():
    """Inference always has '<backend>+frozen' cases (MobileNetV1.freeze()); --graph adds
    '<impl>+graph' ones (eager and each backend, never the compiled model or a training step);
    off a CUDA device those are skipped with the reason, and the graphed step refuses what it
    cannot capture."""
    import argparse

    p = argparse.ArgumentParser()
    R.add_arguments(p)
    base = ["--quick", "--device", "cpu", "--alpha", "0.25", "--resolution", "32", "--batch", "1",
            "--backend", "torch", "--compile", "none", "--layers", "none"]  # fmt: skip
    assert R.config_from_args(p.parse_args(base)).graph is False
    cfg = R.config_from_args(p.parse_args([*base, "--graph"]))
    assert cfg.graph and cfg.to_dict()["graph"] is True
    assert R._model_impls(cfg, "inference") == [
        "eager", "torch", "torch+frozen", "eager+graph", "torch+graph"
    ]  # fmt: skip
    assert R._model_impls(cfg, "train_step") == ["eager", "torch"]
    rep = R.run(cfg)
    res = rep["model"]["inference"]["results"]
    for impl in ("eager+graph", "torch+graph"):
        assert res[impl] == {"skipped": "CUDA graphs need a CUDA device"}
    assert res["torch"]["images_per_s"] > 0 and res["torch+frozen"]["images_per_s"] > 0
    assert res["torch+frozen"]["check_ok"] is True  # checked against eager like the others
    md = R.to_markdown(rep)
    assert "reference model, eager, CUDA graph" in md and "dwsep[torch], CUDA graph" in md
    assert "dwsep[torch], freeze()" in md
    mi = R.make_model_inputs(0.25, 32, 1, torch.float32, "contiguous", torch.device("cpu"), 0)
    with pytest.raises(ValueError, match="CUDA tensors"):
        R.model_step(mi, "torch+graph", "inference")
    with pytest.raises(ValueError, match="inference only"):
        R.model_step(mi, "torch+graph", "train_step")
    with pytest.raises(ValueError, match="not 'compile'"):
        R.model_step(mi, "compile+graph", "inference")
    with pytest.raises(ValueError, match="inference only"):
        R.model_step(mi, "torch+frozen", "train_step")


def test_select_layers_none_and_names():
    def cfg(layers):
        return types.SimpleNamespace(alpha=1.0, resolution=224, batch=2, layers=layers)

    assert len(R.select_layers(cfg(None))) == 26
    assert R.select_layers(cfg(["none"])) == []  # --layers none: the model part alone
    names = [x.name for x in R.select_layers(cfg(["dw0", "pw"]))]
    assert len(names) == 14 and names[0] == "dw00_c32_112x112_s1"
    with pytest.raises(SystemExit, match="selects no layer"):
        R.select_layers(cfg(["dw99"]))


def test_main_help():
    from dwsep.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0


class _FakeEvent:
    """A CUDA event stand-in on the host clock (the fake "GPU" runs synchronously)."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_bench_fn_cuda_control_flow_with_fake_events(monkeypatch):
    """The GPU path of bench_fn (warm-up, probe, blocking-kernel sizing, samples, e2e) run
    against fake events, so its bookkeeping is checked on a machine without a GPU. It proves
    nothing about real GPU timings."""
    import contextlib

    import dwsep.timing as T

    sleeps = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: sleeps.append(cycles), raising=False)
    monkeypatch.setattr(T, "_SLEEP_CYCLES_PER_S", {0: 1.5e9})
    seen = []

    def fn(i):
        seen.append(i)
        time.sleep(0.001)

    t = bench_fn(fn, torch.device("cuda", 0), nsets=4, quick=True)
    assert set(seen) == {0, 1, 2, 3}
    assert t.calls_per_sample == 1  # 1 ms per call: one call fills the 1 ms sample target
    assert t.samples >= 5 and len(sleeps) == t.samples
    assert all(c > 0 for c in sleeps)
    assert 0.001 <= t.median_s < 0.02
    assert t.e2e_median_s is not None and t.e2e_median_s >= 0.001
    assert "CUDA events" in t.method and "blocking kernel" in t.method
