#!/usr/bin/env bash
# One GPU session, from the repository root on a machine with a GPU (no Ray, no network needed):
#
#   OUT=/some/dir bash bench/gpu_session.sh [--budget-s 420]
#
# Steps, each under its own `timeout` cut from one budget (default 420 s), each writing into $OUT:
#   1. tests        pytest -m gpu over tests/test_gpu.py, tests/test_quant.py, tests/test_quant_kernels.py
#   2. quant_gpu    python -m bench.quant_gpu: one layer's expert time, fp32/bf16 vs FP8/int8/int4, kernels vs
#                   dequantize, 1 and 32 tokens; then the local engine's tok/s with bf16/int8/int4 experts on the
#                   `bench` model (markdown tables: $OUT/quant-gpu.md)
#   3. expert_copy  python -m bench.expert_copy_gpu, if bench/expert_copy_gpu.py exists (skipped otherwise)
#   4. gpu_check    bash bench/gpu_check.sh --no-install (env, parity, throughput, cluster; its own `tests` step is
#                   left out: step 1 ran tests/test_gpu.py) -> $OUT/gpu-check.md
# Without CUDA every step runs its CPU fallback or skips with its reason (the dry run of the development machine).
# $OUT ends with at most 6 files: session.md (what ran, status, time, the last lines of each log), quant-gpu.md,
# expert-copy-gpu.md, gpu-check.md, logs.tar.gz (every log, gpu_check's per-step logs and json, nvidia-smi).
# Exit status: 0 when no step failed, 1 when one did (a step that timed out failed), 2 for bad arguments.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
budget=420
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) budget="${2:-}"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_session: unknown argument '$1' (only --budget-s N)" >&2; exit 2 ;;
  esac
done
case "$budget" in ''|*[!0-9]*) echo "gpu_session: --budget-s must be a whole number of seconds, got '$budget'" >&2
  exit 2 ;; esac
OUT="${OUT:-gpu-session-out}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOGS="$(mktemp -d)"
started=$(date +%s)
summary="$LOGS/summary.md"
failed=()

left() { echo $(( budget - ($(date +%s) - started) )); }

# run_step NAME CAP_S COMMAND...: runs it under `timeout` (the smaller of CAP_S and what the budget has left, less
# a reserve for the steps after it), output to $LOGS/NAME.log; one row in the summary.
run_step() {
  local name="$1" cap="$2"; shift 2
  local limit; limit=$(left)
  [ "$limit" -gt "$cap" ] && limit="$cap"
  if [ "$limit" -lt 15 ]; then
    echo "| $name | skipped: the budget of ${budget}s is spent | 0s |" >> "$summary"; return 0
  fi
  echo "[gpu_session] $(date -u +%T) $name: starting (limit ${limit}s): $*" >&2
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local status="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="FAIL: timed out after ${limit}s"; failed+=("$name")
  elif [ "$rc" != 0 ]; then status="FAIL: exit status $rc"; failed+=("$name"); fi
  echo "[gpu_session] $(date -u +%T) $name: $status in ${took}s" >&2
  echo "| $name | $status | ${took}s |" >> "$summary"
  { echo; echo "### $name: last lines of its log"; echo; echo '```'; tail -n 25 "$LOGS/$name.log"; echo '```'; } \
    >> "$LOGS/tails.md"
}

echo "| step | status | time |" > "$summary"
echo "|---|---|---|" >> "$summary"
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)
cuda=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" \
       2>/dev/null || echo "torch not importable")

# 1. the gpu-marked tests (they skip with their reason without CUDA)
run_step tests 170 "$PYTHON" -m pytest tests/test_gpu.py tests/test_quant.py tests/test_quant_kernels.py -m gpu \
  -q -rs -p no:cacheprovider
# 2. quantized experts: kernels vs dequantize vs full precision
run_step quant_gpu 150 "$PYTHON" -m bench.quant_gpu --out "$OUT/quant-gpu.md"
# 3. another helper's expert-copy benchmark, where it exists
if [ -f bench/expert_copy_gpu.py ]; then
  run_step expert_copy 60 bash -c "'$PYTHON' -m bench.expert_copy_gpu > '$OUT/expert-copy-gpu.md'"
else
  echo "| expert_copy | skipped: bench/expert_copy_gpu.py does not exist in this checkout | 0s |" >> "$summary"
fi
# 4. the GPU check (its own budget: what is left, less a reserve for writing the results)
check_budget=$(( $(left) - 25 ))
if [ "$check_budget" -ge 30 ]; then
  run_step gpu_check $(( check_budget + 20 )) bash bench/gpu_check.sh --no-install --out "$LOGS/gpu-check" \
    --steps env parity throughput cluster --budget-s "$check_budget"
  cp "$LOGS/gpu-check/gpu-check.md" "$OUT/gpu-check.md" 2>/dev/null
else
  echo "| gpu_check | skipped: ${check_budget}s of the budget left | 0s |" >> "$summary"
fi

load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)
{
  echo "# GPU session"
  echo
  echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ), device: $cuda, $(nproc) CPUs."
  echo "Load average before $load_before, after $load_after. Total $(( $(date +%s) - started ))s of a ${budget}s budget."
  echo "Command: \`OUT=... bash bench/gpu_session.sh --budget-s $budget\`."
  echo
  cat "$summary"
  echo
  if [ ${#failed[@]} -eq 0 ]; then echo "Result: no step failed."; else echo "Result: FAILED: ${failed[*]}."; fi
  cat "$LOGS/tails.md" 2>/dev/null
} > "$OUT/session.md"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
cat "$OUT/session.md"
[ ${#failed[@]} -eq 0 ]
