#!/usr/bin/env bash
# The one script for the H200 machine (no network; torch 2.11 / triton 3.6 preinstalled).
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Installs wheels carried in ./wheels (git-ignored, made by fetch_wheels.sh: nvidia-cutlass for
# the CUTLASS headers, setuptools and build for the sdist, matplotlib / hypothesis for plots and
# tests), then installs glm45-ops as a user does and CI does: builds the sdist and installs it
# non-editable, compiling glm45_ops._C for sm_90a. It runs the `gpu` tests against that installed
# copy, measures the ceilings, benchmarks every family with refchecks, and writes the compile
# report. Python runs with -P so the checkout (the working directory) never shadows the installed
# package; only if the install fails do the later steps fall back to the source tree (Triton and
# torch backends). Every step has a timeout and a status line in OUTDIR/summary.txt; a failing
# step never stops the next. The whole run keeps inside GPU_CHECK_BUDGET_S (default 420 s): a
# session's device time is 15 minutes including the machine's start, and must leave room for
# one rerun. `-m "gpu and not slow"` by default; GPU_CHECK_PYTEST_MARK="gpu" adds the slow ones;
# the tests run on 8 pytest-xdist workers where it imports (GPU_CHECK_PYTEST_WORKERS=1: serially).
# GPU_CHECK_SKIP_BUILD=1 reuses what an earlier run on the same (warm) machine installed;
# GPU_CHECK_SKIP_TESTS=1 and GPU_CHECK_BENCH="fam ..." make a rerun that only benchmarks what the
# first run's budget did not reach.
set -u
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
MARK=${GPU_CHECK_PYTEST_MARK:-gpu and not slow}
START=$(date +%s)
BENCH="$PY -P -m glm45_ops.bench.cli"
: > "$OUT/summary.txt"

# step NAME TIMEOUT_S CMD...: run CMD with a timeout (capped by what is left of the budget),
# log to OUT/NAME.log and OUT/log.txt, record "NAME ok|FAIL rc=N|TIMEOUT|SKIPPED" in summary.txt.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 10 )); then
    echo "$name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  (( limit > left )) && limit=$left
  local t0=$(date +%s)
  echo "=== $name ($(date -u +%FT%TZ), timeout ${limit}s): $*" | tee -a "$OUT/log.txt"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  cat "$OUT/$name.log" >> "$OUT/log.txt"
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; elif (( rc != 0 )); then status="FAIL rc=$rc"; fi
  echo "$name: $status ($(( $(date +%s) - t0 ))s)" | tee -a "$OUT/summary.txt"
  return $rc
}

step date 5 date -u
step nvidia_smi 20 nvidia-smi
if compgen -G "wheels/*.whl" > /dev/null; then
  step wheels 120 "$PY" -m pip install --no-index --no-deps wheels/*.whl
else
  echo "wheels: SKIPPED (no wheels/*.whl: CUTLASS kernels need nvidia-cutlass)" | tee -a "$OUT/summary.txt"
fi
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
  echo "build: SKIPPED (GPU_CHECK_SKIP_BUILD=1)" | tee -a "$OUT/summary.txt"
else
  SDIST=$(mktemp -d)
  if step sdist 30 "$PY" -m build --sdist --no-isolation -o "$SDIST" .; then
    step build 180 env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps \
      --force-reinstall "$SDIST"/glm45_ops-*.tar.gz
  else
    echo "build: SKIPPED (no sdist)" | tee -a "$OUT/summary.txt"
  fi
fi
# From / so that the working directory cannot stand in for the installed package.
if (cd / && timeout 60 "$PY" -c "import glm45_ops, triton_ops") > /dev/null 2>&1; then
  export GLM45_REQUIRE_INSTALLED=1 GLM45_REQUIRE_EXTENSION=1  # tests/test_install.py, tests/test_extension.py
else
  echo "installed copy: not importable, later steps run the source tree" | tee -a "$OUT/summary.txt"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
step info 60 $BENCH --info
# The GPU tests: the marked ones and every test parametrized onto the GPU (tests/conftest.py marks
# those), the contract's backend agreement included; torch.compile / opcheck variants are left to
# CI (tracing does not depend on the device) so that the step fits its share of the budget.
if [[ "${GPU_CHECK_SKIP_TESTS:-0}" == 1 ]]; then
  echo "pytest_gpu: SKIPPED (GPU_CHECK_SKIP_TESTS=1)" | tee -a "$OUT/summary.txt"
else
  # The image has pytest-xdist and pytest-timeout: the tests' first calls compile hundreds of
  # Triton kernels, serially more than the step's share, so 8 workers (16 cores) share the GPU;
  # PYTHONSAFEPATH (-P for the workers too) keeps the checkout from shadowing the installed copy.
  # A test hung on the GPU is ended after 120 s and its worker replaced.
  PAR=()
  WORKERS=${GPU_CHECK_PYTEST_WORKERS:-8}
  (( WORKERS > 1 )) && "$PY" -c "import xdist" 2> /dev/null && PAR+=(-n "$WORKERS")
  "$PY" -c "import pytest_timeout" 2> /dev/null && PAR+=(--timeout 120)
  echo "pytest_gpu options: ${PAR[*]:-none (serial, no per-test timeout)}" | tee -a "$OUT/summary.txt"
  step pytest_gpu 150 env PYTHONSAFEPATH=1 "$PY" -P -m pytest -q ${PAR[@]+"${PAR[@]}"} --maxfail=25 \
    -m "($MARK) or installed" -k "${GPU_CHECK_PYTEST_K:-not compile and not opcheck}" tests \
    --junitxml="$OUT/pytest_gpu.xml"
fi
step ceilings 30 $BENCH ceilings --json "$OUT/ceilings.json"
CEIL=()
[[ -s "$OUT/ceilings.json" ]] && CEIL=(--ceilings "$OUT/ceilings.json")
# One step per family, each with its own share of the budget, so a slow family cannot starve the
# others; MoE runs its TP8 / EP8 layouts (the GLM-4.5 serving shapes) and routing.
run_bench() {  # run_bench FAMILY TIMEOUT [glm45-bench args...]
  local fam=$1 limit=$2; shift 2
  step "bench_$fam" "$limit" $BENCH "$fam" --refcheck ${CEIL[@]+"${CEIL[@]}"} --json "$OUT/results_$fam.json" \
    --csv "$OUT/results_$fam.csv" --plot "$OUT/roofline_$fam.png" "$@"
}
# GPU_CHECK_BENCH (default: all, in this order) picks the families, e.g. for a rerun on the warm
# machine: GPU_CHECK_SKIP_BUILD=1 GPU_CHECK_SKIP_TESTS=1 GPU_CHECK_BENCH="attention rollout moe".
FAMS=" ${GPU_CHECK_BENCH:-quant gemm speculative muon attention rollout moe} "
bench() {  # bench FAMILY TIMEOUT [glm45-bench args...], if chosen
  [[ "$FAMS" == *" $1 "* ]] || return 0
  run_bench "$@"
}
bench quant 35
bench gemm 45
bench speculative 20
bench muon 25
bench attention 45 --cases "TP8"
bench rollout 30
# MoE: routing and permutation over the issue's whole sweep (its targets name T=4096), then the
# experts at TP8 / EP8.
[[ "$FAMS" == *" moe "* ]] && step bench_moe_route 25 $BENCH moe --refcheck ${CEIL[@]+"${CEIL[@]}"} \
  --json "$OUT/results_moe_route.json" --csv "$OUT/results_moe_route.csv" --cases "moe_route,moe_align" \
  --tokens 16384,4096,512,64,16,1
bench moe 60 --cases "fused_moe TP8,fused_moe EP8,+shared,grouped_fp8_block_gemm TP8,grouped_bf16_gemm TP8"
# The reference model end to end (tiny random weights: it checks that the ops assemble on the GPU
# and prints tokens/s and the MTP acceptance; not a serving benchmark).
step generate_tiny 30 $PY -P -m glm45_ops.model.generate --preset tiny --batch 8 --max-new-tokens 64 \
  --speculative mtp --num-draft-tokens 3
step generate_tiny_graph 30 $PY -P -m glm45_ops.model.generate --preset tiny --batch 8 --max-new-tokens 64 \
  --speculative mtp --num-draft-tokens 3 --cuda-graph
step compile_report 45 $BENCH compile-report --json "$OUT/compile_report.json"

echo "total: $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
