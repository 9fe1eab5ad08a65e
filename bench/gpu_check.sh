#!/usr/bin/env bash
# One command on a GPU machine (issue 7): build, test, sanitize and benchmark dwsep, writing
# everything into OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Steps (each under its own `timeout`; a failing step is recorded and the next one still runs;
# the whole run stays inside GPU_CHECK_TOTAL_S, 570 s by default):
#   1. build    pip install -e . --no-build-isolation --no-deps against this machine's torch,
#               CUDA_HOME from nvcc (or /usr/local/cuda), TORCH_CUDA_ARCH_LIST = this GPU's
#               capability. Skipped when an up-to-date CUDA build is already in the tree
#               (GPU_CHECK_REBUILD=1 forces it, from an empty build/). Falls back to
#               `setup.py build_ext --inplace`.
#   2. tests    pytest -m "gpu and not slow" tests/ (every test that runs a CUDA tensor; CI runs
#               the CPU ones), Triton autotuning off (tests/conftest.py), pytest-xdist with
#               GPU_CHECK_XDIST workers and pytest-timeout when installed. Each result is logged as
#               it lands (DWSEP_TEST_LOG), so a run cut off by its timeout still names its
#               failures, with their tracebacks, in summary.md.
#   tests_slow  (not in the default steps) pytest -m "gpu and slow": every Triton autotune config
#               (tests/test_triton_configs.py), >2^31-element tensors, the model in full.
#   3. sanitize compute-sanitizer memcheck and racecheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1, over a
#               focused driver that runs every fused op of the cuda backend (forward, training
#               forward, backward) on small odd shapes, all dtypes, both layouts, stride 1 and 2.
#               SANITIZE_TRITON=1 adds a memcheck pass over the triton backend.
#   4. profile  bench/profile_layers.py: per-kernel GPU time of PROFILE_LAYERS (dw2,pw6) in
#               PROFILE_MODES (fwd_bwd) for eager, cuda and triton -> OUTDIR/profile.md.
#   ncu         (not in the default steps) Nsight Compute on one warm call of each of
#               NCU_LAYERS (pw2,pw6,dw2) x NCU_MODES (inference) x NCU_IMPLS (cuda,triton):
#               speed of light, occupancy, launch, warp-state and memory sections per kernel,
#               clocks left alone; appended to OUTDIR/profile.md. The first thing to run where
#               a kernel is far from its roofline and the source does not say why.
#   5. bench    python -m dwsep bench --out OUTDIR (BENCH_ARGS, default "--quick --graph"), with
#               a time budget from what is left.
#
# OUTDIR gets few files (the device machine returns at most 8): summary.md (steps, test results
# with every failure's report, sanitizer summaries, kernel source hash, nvidia-smi),
# report.json / report.md / report.png (the benchmark), profile.md, logs.tar.gz (every full
# log) and, with GPU_CHECK_EXPORT_SO=1, the built extension split in two (so.part-aa, -ab; each
# returned file must stay under 16 MiB): `cat so.part-* > dwsep/_C.<tag>.so` here, carry it to the
# next call and set GPU_CHECK_REUSE_SO=1 there to skip the two-minute build.
#
# Knobs: GPU_CHECK_STEPS (default "build,tests,sanitize,profile,bench"), GPU_CHECK_TOTAL_S (570),
# GPU_CHECK_XDIST (8; 0 = no xdist), GPU_CHECK_TEST_MARK ("gpu and not slow"), PYTEST_ARGS
# (extra pytest args), BENCH_ARGS ("--quick --graph"), PROFILE_LAYERS, PROFILE_MODES, SANITIZE_TRITON
# (0), NCU_LAYERS, NCU_MODES, NCU_IMPLS, GPU_CHECK_EXPORT_SO (0), GPU_CHECK_REUSE_SO (0), PYTHON
# (python3), CUDA_HOME,
# TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -u

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-570}
STEPS=${GPU_CHECK_STEPS:-build,tests,sanitize,profile,bench}
PY=${PYTHON:-python3}
LOGS=$(mktemp -d)/logs
mkdir -p "$LOGS"
SUMMARY="$OUT/summary.md"
STEP_ROWS=""
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((TOTAL - $(elapsed))); }
want() { [[ ",$STEPS," == *",$1,"* ]]; }

# budget WANT RESERVE: min(WANT, remaining - RESERVE), at least 0
budget() {
    local w=$1 r=$(($(remaining) - ${2:-15}))
    ((r < w)) && w=$r
    ((w < 0)) && w=0
    echo "$w"
}

# run_step NAME TIMEOUT LOG CMD...: runs CMD under timeout, logs, records a summary row
run_step() {
    local name=$1 t=$2 log=$3 rc status t0
    shift 3
    if ((t < 5)); then
        STEP_ROWS+="| $name | skipped: out of time | 0 | |"$'\n'
        echo "== $name: skipped (out of time)"
        return 99
    fi
    echo "== $name (timeout ${t}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$t" "$@" >"$LOGS/$log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${t}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    STEP_ROWS+="| $name | $status | $(($(date +%s) - t0)) | $log |"$'\n'
    echo "   -> $status ($(($(date +%s) - t0)) s)"
    tail -n 3 "$LOGS/$log" | sed 's/^/   | /'
    return $rc
}

# ------------------------------------------------------------------ environment
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi 2>&1
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1
    echo
    (nvcc --version || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) 2>&1
    echo
    $PY -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
    which compute-sanitizer 2>&1
    nproc
} >"$LOGS/environment.txt" 2>&1

is_toolkit() { [[ -x "$1/bin/nvcc" && -f "$1/include/cuda_runtime.h" ]]; }
if [[ -z "${CUDA_HOME:-}" ]]; then
    for cand in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")" /usr/local/cuda; do
        if is_toolkit "$cand"; then
            CUDA_HOME=$cand
            break
        fi
    done
fi
if [[ -n "${CUDA_HOME:-}" ]]; then
    export CUDA_HOME
    export PATH="$CUDA_HOME/bin:$PATH"
fi
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; M, m = torch.cuda.get_device_capability(0); print(f'{M}.{m}')" 2>/dev/null || echo "9.0")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "CUDA_HOME=${CUDA_HOME:-(setup.py finds it)} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" | tee -a "$LOGS/environment.txt"

cuda_build_ok() {
    $PY - <<'EOF' >"$LOGS/build_info.json" 2>&1
import json, sys
import dwsep
info = dwsep.build_info()
print(json.dumps(info, indent=1))
sys.exit(0 if info["extension_loaded"] and info["cuda_compiled"] else 1)
EOF
}

# ------------------------------------------------------------------ 1. build
if want build; then
    so=$(ls dwsep/_C*.so 2>/dev/null | head -n1)
    newer=""
    [[ -n "$so" ]] && newer=$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -n1)
    [[ "${GPU_CHECK_REUSE_SO:-0}" == 1 ]] && newer=""
    if [[ -n "$so" && -z "$newer" && "${GPU_CHECK_REBUILD:-0}" != 1 ]] && cuda_build_ok; then
        STEP_ROWS+="| build | ok (reused $so, newer than csrc/) | 0 | build_info.json |"$'\n'
        echo "== build: reusing $so"
    else
        export DWSEP_BUILD_CUDA=1
        # A forced rebuild starts from scratch, so that compile flags given through the
        # environment (NVCC_APPEND_FLAGS, e.g. -DDWSEP_DW_NHWC_PREFETCH=0 for an A/B run), which
        # ninja does not see, reach every object.
        [[ "${GPU_CHECK_REBUILD:-0}" == 1 ]] && rm -rf build
        if ! run_step build "$(budget 300 270)" build.log \
            $PY -m pip install -v -e . --no-build-isolation --no-deps || ! cuda_build_ok; then
            run_step build_inplace "$(budget 300 270)" build_inplace.log \
                $PY setup.py build_ext --inplace
        fi
        cuda_build_ok || echo "build check: the CUDA extension does not load (see build_info.json)"
    fi
    so=$(ls dwsep/_C*.so 2>/dev/null | head -n1)
    if [[ "${GPU_CHECK_EXPORT_SO:-0}" == 1 && -n "$so" ]]; then
        cp "$so" "$LOGS/so.tmp" && strip -g "$LOGS/so.tmp" 2>/dev/null
        split -b 15M "$LOGS/so.tmp" "$OUT/so.part-" && rm -f "$LOGS/so.tmp"
        echo "$(basename "$so")" >"$LOGS/so_name.txt"
    fi
fi

# ------------------------------------------------------------------ 2. tests
TEST_LINE="not run"
export DWSEP_TEST_LOG="$LOGS/test_events.log"
run_tests() { # NAME MARK WANT_S RESERVE_S
    local name=$1 mark=$2 w=$3 r=$4 xd=() to=()
    if [[ "${GPU_CHECK_XDIST:-8}" != 0 ]] && $PY -c "import xdist" 2>/dev/null; then
        xd=(-n "${GPU_CHECK_XDIST:-8}" --dist load)
    fi
    $PY -c "import pytest_timeout" 2>/dev/null && to=(--timeout 150)
    echo "== $name: pytest -m \"$mark\"" >>"$DWSEP_TEST_LOG"
    # shellcheck disable=SC2086
    run_step "$name" "$(budget "$w" "$r")" "$name.log" \
        $PY -m pytest tests/ -q -ra -m "$mark" -p no:cacheprovider --junitxml="$LOGS/$name.xml" \
        ${xd[@]+"${xd[@]}"} ${to[@]+"${to[@]}"} ${PYTEST_ARGS:-}
    TEST_LINE+=$'\n'"$name: $(grep -E "[0-9]+ (passed|failed|error)" "$LOGS/$name.log" | tail -n 1)"
    TEST_LINE+=" (logged: $(grep -cE '^[0-9:]+ PASSED' "$DWSEP_TEST_LOG") passed, $(grep -cE '^[0-9:]+ FAILED' "$DWSEP_TEST_LOG") failed so far)"
}
if want tests || want tests_slow; then
    TEST_LINE=""
    : >"$DWSEP_TEST_LOG"
fi
want tests && run_tests tests "${GPU_CHECK_TEST_MARK:-gpu and not slow}" 260 170
want tests_slow && run_tests tests_slow "gpu and slow" 240 30

# ------------------------------------------------------------------ 3. sanitizers
cat >"$LOGS/sanitize_driver.py" <<'EOF'
"""Runs every fused op of one dwsep backend on small odd shapes (forward, training forward,
backward), for compute-sanitizer. Usage: python sanitize_driver.py BACKEND [small]."""
import os
import sys

import torch

import dwsep
from dwsep import functional as DF

backend = sys.argv[1]
small = len(sys.argv) > 2 and sys.argv[2] == "small"
dev = os.environ.get("SANITIZE_DEVICE", "cuda")  # "cpu" only to dry-run this driver
torch.manual_seed(0)
dtypes = [torch.float32, torch.bfloat16] if small else [torch.float32, torch.float16, torch.bfloat16, torch.float64]
layouts = [torch.contiguous_format, torch.channels_last]
dw_shapes = [(2, 3, 7, 7, 1), (2, 13, 13, 17, 2), (1, 40, 17, 13, 2), (2, 8, 2, 2, 1), (1, 1, 1, 1, 1), (2, 72, 9, 9, 2), (0, 8, 5, 5, 1)]
pw_shapes = [(2, 3, 13, 7, 7), (2, 40, 8, 5, 3), (1, 1, 1, 1, 1), (2, 72, 136, 9, 9), (0, 8, 8, 3, 3)]
if small:
    dw_shapes, pw_shapes = dw_shapes[:3], pw_shapes[:2] + pw_shapes[3:4]
runs = 0


def bn(c, dt):
    vdt = torch.float64 if dt == torch.float64 else torch.float32
    mk = lambda: torch.randn(c, device=dev, dtype=vdt)
    return mk() * 0.1, torch.rand(c, device=dev, dtype=vdt) + 0.5, (1 + 0.1 * mk()), 0.1 * mk()


with dwsep.use_backend(backend):
    for dt in dtypes:
        for fmt in layouts:
            for n, c, h, w, s in dw_shapes:
                x = torch.randn(n, c, h, w, device=dev, dtype=dt).contiguous(memory_format=fmt)
                wt = torch.randn(c, 1, 3, 3, device=dev, dtype=dt)
                rm, rv, g, b = bn(c, dt)
                DF.depthwise_conv_bn_act(x, wt, rm, rv, g, b, stride=s, training=False)
                if n * ((h - 1) // s + 1) * ((w - 1) // s + 1) > 1:
                    xr, wr, gr, br = (t.detach().requires_grad_() for t in (x, wt, g, b))
                    y = DF.depthwise_conv_bn_act(xr, wr, rm, rv, gr, br, stride=s, training=True)
                    y.backward(torch.randn_like(y))
                    xr2, wr2 = x.detach().requires_grad_(), wt.detach().requires_grad_()
                    y = DF.depthwise_conv_bn_act(xr2, wr2, rm, rv, g, b, stride=s, training=False)
                    y.backward(torch.randn_like(y))
                if dev == "cuda":
                    torch.cuda.synchronize()
                runs += 1
            for n, ci, co, h, w in pw_shapes:
                x = torch.randn(n, ci, h, w, device=dev, dtype=dt).contiguous(memory_format=fmt)
                wt = torch.randn(co, ci, 1, 1, device=dev, dtype=dt) / ci**0.5
                rm, rv, g, b = bn(co, dt)
                DF.pointwise_conv_bn_act(x, wt, rm, rv, g, b, training=False)
                if n * h * w > 1:
                    xr, wr, gr, br = (t.detach().requires_grad_() for t in (x, wt, g, b))
                    y = DF.pointwise_conv_bn_act(xr, wr, rm, rv, gr, br, training=True)
                    y.backward(torch.randn_like(y))
                    xr2, wr2 = x.detach().requires_grad_(), wt.detach().requires_grad_()
                    y = DF.pointwise_conv_bn_act(xr2, wr2, rm, rv, g, b, training=False)
                    y.backward(torch.randn_like(y))
                if dev == "cuda":
                    torch.cuda.synchronize()
                runs += 1
print(f"sanitize driver: backend {backend}: {runs} shape/dtype/layout cases ran (forward, training forward + backward, eval backward)")
EOF
SAN_ROWS=""
sanitize() { # NAME TOOL BACKEND WANT_S [small]
    local name=$1 tool=$2 be=$3 w=$4 extra=${5:-} errs
    run_step "$name" "$(budget "$w" 120)" "$name.log" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 86 --print-limit 30 \
        --target-processes all ${SANITIZER_EXTRA:-} $PY "$LOGS/sanitize_driver.py" "$be" $extra
    local rc=$?
    errs=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|HAZARD|Invalid|out of bounds" "$LOGS/$name.log" | sort | uniq -c | head -n 8 | tr '\n' ';')
    SAN_ROWS+="| $name | $tool | $be | exit $rc | ${errs:-no summary line} |"$'\n'
}
if want sanitize; then
    if command -v compute-sanitizer >/dev/null 2>&1; then
        sanitize memcheck_cuda memcheck cuda 90
        sanitize racecheck_cuda racecheck cuda 60 small
        if [[ "${SANITIZE_TRITON:-0}" == 1 ]]; then
            sanitize memcheck_triton memcheck triton 90 small
        fi
    else
        STEP_ROWS+="| sanitize | skipped: compute-sanitizer not found | 0 | |"$'\n'
    fi
fi

# ------------------------------------------------------------------ 4. per-kernel profile
if want profile; then
    run_step profile "$(budget 90 60)" profile.log \
        $PY bench/profile_layers.py --layers "${PROFILE_LAYERS:-dw2,pw6}" \
        --modes "${PROFILE_MODES:-fwd_bwd}" --impls eager,cuda,triton
    cp "$LOGS/profile.log" "$OUT/profile.md"
fi

# ------------------------------------------------------------------ ncu (on request)
if want ncu; then
    if command -v ncu >/dev/null 2>&1; then
        run_step ncu "$(budget 240 30)" ncu.log \
            ncu --profile-from-start off --clock-control none --target-processes all \
            --section SpeedOfLight --section LaunchStats --section Occupancy \
            --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
            $PY bench/profile_layers.py --ncu --layers "${NCU_LAYERS:-pw2,pw6,dw2}" \
            --modes "${NCU_MODES:-inference}" --impls "${NCU_IMPLS:-cuda,triton}"
        { echo; echo "## ncu"; echo; echo '```'; cat "$LOGS/ncu.log"; echo '```'; } >>"$OUT/profile.md"
    else
        STEP_ROWS+="| ncu | skipped: ncu not found | 0 | |"$'\n'
    fi
fi

# ------------------------------------------------------------------ 5. benchmark report
if want bench; then
    bt=$(budget 400 15)
    # shellcheck disable=SC2086
    run_step bench "$bt" bench.log \
        $PY -m dwsep bench --out "$OUT" --time-budget $((bt > 60 ? bt - 45 : bt / 2)) ${BENCH_ARGS:---quick --graph}
fi

# ------------------------------------------------------------------ summary
REV=$($PY -c "import json; from dwsep.report import source_revision; print(json.dumps(source_revision()))" 2>&1)
{
    echo "# dwsep GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), total $(elapsed) s of a ${TOTAL} s budget"
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n1)"
    echo "- torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
    echo "- CUDA_HOME=${CUDA_HOME:-(setup.py found it)}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    echo "- kernel sources (csrc/ + kernels_triton/): \`$REV\`"
    echo
    echo "## Steps"
    echo
    echo "| step | status | seconds | log (in logs.tar.gz) |"
    echo "|---|---|---|---|"
    printf "%s" "$STEP_ROWS"
    echo
    echo "## Tests"
    echo
    echo "pytest:${TEST_LINE:- no summary line}"
    if [[ -s "$DWSEP_TEST_LOG" ]]; then
        echo
        echo "Slowest tests (seconds, from the per-test log):"
        echo
        echo '```'
        grep -E "^[0-9:]+ (PASSED|FAILED|SKIPPED)" "$DWSEP_TEST_LOG" | sort -k3 -n -r | head -n 12
        echo '```'
        echo
        echo "Failures, as they landed (reports cut to 6000 characters; full log in logs.tar.gz):"
        echo
        echo '```'
        awk '/^[0-9:]+ FAILED/{p=1} /^[0-9:]+ (PASSED|SKIPPED)/{p=0} p' "$DWSEP_TEST_LOG" | head -c 60000
        echo '```'
    fi
    for t in tests tests_slow; do
        [[ -f "$LOGS/$t.log" ]] || continue
        echo
        echo "\`$t\` skips:"
        echo '```'
        grep -E "^SKIPPED " "$LOGS/$t.log" | head -n 20
        echo '```'
    done
    echo
    echo "## Sanitizers"
    echo
    if [[ -n "$SAN_ROWS" ]]; then
        echo "Exit 86: the sanitizer reported errors. Any other non-zero exit: the driver itself"
        echo "failed or timed out (see the log's last lines)."
        echo
        echo "| run | tool | backend | exit | summary lines |"
        echo "|---|---|---|---|---|"
        printf "%s" "$SAN_ROWS"
        for f in "$LOGS"/memcheck_*.log "$LOGS"/racecheck_*.log; do
            [[ -f "$f" ]] || continue
            echo
            echo "\`$(basename "$f")\` (last lines):"
            echo '```'
            tail -n 6 "$f"
            echo '```'
        done
    else
        echo "not run"
    fi
    echo
    echo "## Benchmark"
    echo
    if [[ -f "$OUT/report.md" ]]; then
        echo "report.md / report.json / report.png written. Summary:"
        echo
        sed -n '/^## Summary/,/^## Per layer/p' "$OUT/report.md" | sed '$d'
        sed -n '/^## MobileNetV1 throughput/,/^## Method/p' "$OUT/report.md" | sed '$d'
    else
        echo "no report (see bench.log)"
        [[ -f "$LOGS/bench.log" ]] && { echo '```'; tail -n 20 "$LOGS/bench.log"; echo '```'; }
    fi
    echo
    echo "## nvidia-smi"
    echo
    echo '```'
    nvidia-smi 2>&1 | head -n 25
    echo '```'
} >"$SUMMARY"

tar -czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null
echo "== done in $(elapsed) s: $SUMMARY"
ls -la "$OUT"
