#!/usr/bin/env bash
# One-shot GPU proof, one markdown report at $OUT/gpu_report.md (logs and JSON beside it).
# Runs from the working tree (PYTHONPATH=.), installs nothing, finishes within 8 minutes, and
# leaves five files in $OUT (the device tool returns at most eight): gpu_report.md, tests.log,
# tune.log, tuning.json and logs.tar.gz (every benchmark's log, JSON and markdown table).
#   1. the tests with the Triton kernels compiled for this GPU (no interpreter)        <= 170 s
#   2. the targets with default configs: the fused kernel on layer 1, 13x13, batch 32,
#      fp16, against the fp16 matmul roofline and the one-thread-per-output baseline, each
#      Triton time beside the traffic model's prediction ("model ms": it calibrates the model);
#      end-to-end predict (Wide-ResNet-101-2, 256 px, PTS-60 / N=200, batch 1 / 32)     <= 90 s
#   3. hetmm tune for those problems (a cache in $OUT), then the targets again, tuned    <= 90 + 60 s
#   4. every other kernel benchmark (reference / torch / triton, paper's shapes)        <= 60 s
# Each step is cut at its limit and the report keeps whatever rows it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export HETMM_TUNE_CACHE="$OUT/tuning.json"
report="$OUT/gpu_report.md"
TARGETS="goal or end_to_end or roofline"

{
  echo "# hetmm GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -4
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo '```'
} > "$report"

section() {  # title, rc, seconds, markdown table file, rows file, log
  {
    echo
    echo "## $1 (rc=$2, $3 s)"
    echo
    if [ -f "$4" ]; then cat "$4"; else
      echo "(cut short: the rows measured before the limit, one JSON object each)"
      echo '```'; cat "$5" 2>/dev/null; tail -15 "$6"; echo '```'
    fi
  } >> "$report"
}

bench() {  # name, limit, pytest -k expression
  local start=$(date +%s)
  HETMM_BENCH_REPORT="$WORK/$1.md" timeout "$2" "$PY" -m pytest -q -p no:cacheprovider benchmarks \
    --benchmark-only -k "$3" --benchmark-json="$WORK/$1.json" > "$WORK/$1.log" 2>&1
  local rc=$?
  section "Benchmarks: $1" "$rc" "$(( $(date +%s) - start ))" "$WORK/$1.md" "$WORK/$1.rows.jsonl" "$WORK/$1.log"
  return $rc
}

# 1. tests (the CPU-only ones, AOT compilation and gloo processes, are left to CI), in four
#    processes at once: compiling every test shape's kernels is CPU work, and the machine has 16 cores
start=$(date +%s)
groups=("tests/test_atm.py" "tests/test_retrieval.py tests/test_pts.py tests/test_autotune.py"
        "tests/test_aggregate.py tests/test_detector.py tests/test_scoring.py tests/test_naive_baseline.py"
        "tests --ignore=tests/test_atm.py --ignore=tests/test_retrieval.py --ignore=tests/test_pts.py
         --ignore=tests/test_autotune.py --ignore=tests/test_aggregate.py --ignore=tests/test_detector.py
         --ignore=tests/test_scoring.py --ignore=tests/test_naive_baseline.py")
pids=()
for i in "${!groups[@]}"; do
  # shellcheck disable=SC2086  # each group is a list of pytest arguments
  timeout 170 "$PY" -m pytest -q -p no:cacheprovider ${groups[$i]} --ignore=tests/test_triton_compile.py \
    --ignore=tests/test_distributed.py > "$WORK/tests-$i.log" 2>&1 &
  pids+=($!)
done
tests_rc=0
for pid in "${pids[@]}"; do wait "$pid" || tests_rc=$?; done
cat "$WORK"/tests-*.log > "$OUT/tests.log"
{
  echo
  echo "## Tests (rc=$tests_rc, $(( $(date +%s) - start )) s, four processes)"
  echo '```'
  grep -hE "passed|failed|error|FAILED|ERROR" "$WORK"/tests-*.log | tail -30
  echo '```'
} >> "$report"

# 2. targets with the default (heuristic) configs
bench targets-default 90 "$TARGETS"; default_rc=$?

# 3. tune what the targets run, then measure them again
start=$(date +%s)
{
  timeout 45 "$PY" -m hetmm tune --backbone wide_resnet101_2 --templates 60 --batch-sizes 32 --half \
    --params "L1:13x13_a=0.5_l=1|L2:0x0_a=0.5_l=1|L3:0x0_a=0.5_l=1" --max-configs 16
  timeout 45 "$PY" -m hetmm tune --backbone wide_resnet101_2 --templates 60 --batch-sizes 32 --half --max-configs 6
} > "$OUT/tune.log" 2>&1
tune_rc=$?
{
  echo
  echo "## Tuning (rc=$tune_rc, $(( $(date +%s) - start )) s)"
  echo '```'
  tail -40 "$OUT/tune.log"
  echo '```'
} >> "$report"
bench targets-tuned 60 "$TARGETS"; tuned_rc=$?

# 4. everything else: the fast backends first (the reference's per-pixel loops would eat the minute)
HETMM_BENCH_BACKENDS=triton,torch bench kernels 60 "not ($TARGETS)"; kernels_rc=$?

tar -czf "$OUT/logs.tar.gz" -C "$WORK" .
cat "$report"
[ "$tests_rc" -eq 0 ] && [ "$default_rc" -eq 0 ] && [ "$tuned_rc" -eq 0 ] && [ "$kernels_rc" -eq 0 ]
