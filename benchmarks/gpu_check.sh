#!/usr/bin/env bash
# One-shot GPU check: the tests with compiled kernels on CUDA tensors, then the benchmarks,
# and a markdown report at $OUT/gpu_report.md (plus the raw logs and JSON beside it).
# Runs from the working tree (PYTHONPATH=.), installs nothing, finishes within 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
report="$OUT/gpu_report.md"

{
  echo "# hetmm GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo '```'
} > "$report"

# 1. tests: the triton backend compiled for this GPU (bf16 included), torch and reference alongside
start=$(date +%s)
timeout 250 "$PY" -m pytest -q -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
tests_rc=$?
{
  echo
  echo "## Tests (rc=$tests_rc, $(( $(date +%s) - start )) s)"
  echo '```'
  grep -E "passed|failed|error|FAILED|ERROR" "$OUT/tests.log" | tail -25
  echo '```'
} >> "$report"

# 2. benchmarks: reference, torch and triton on the paper's layer shapes
start=$(date +%s)
HETMM_BENCH_REPORT="$OUT/bench.md" timeout 200 "$PY" -m pytest -q -p no:cacheprovider benchmarks \
  --benchmark-only --benchmark-json="$OUT/benchmark.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
{
  echo
  echo "## Benchmarks (rc=$bench_rc, $(( $(date +%s) - start )) s)"
  echo
  if [ -f "$OUT/bench.md" ]; then
    cat "$OUT/bench.md"
  else
    echo "(cut short: the rows measured before the limit, one JSON object each)"
    echo '```'; cat "$OUT/bench.rows.jsonl" 2>/dev/null; tail -15 "$OUT/bench.log"; echo '```'
  fi
} >> "$report"

cat "$report"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
