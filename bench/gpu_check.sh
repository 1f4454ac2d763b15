#!/usr/bin/env bash
# The GPU check, from the repository root of a fresh checkout, on a machine with NVIDIA GPUs:
#
#   bash bench/gpu_check.sh [--no-install] [--out DIR] [--dry-run] [--list] [--steps STEP ...] [...]
#
# Installs the project with its `gpu` and `test` extras (skip with --no-install where there is no network or the
# packages are already there; leave constraints-cpu.txt out: it pins the CPU build of torch), then runs
# `python -m bench.gpu_check` with the other arguments (--help lists them): env, the gpu/multigpu tests, bf16
# parity against transformers, throughput of transformers / the local engine / the cluster at 1/32/128
# sequences. Writes DIR/gpu-check.md (one markdown table) and a log per step. Without CUDA it runs every step's
# CPU fallback on the tiny demo model. Exit status: 0 no step failed, 1 a step failed, 2 bad arguments,
# 3 the install failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"  # or PYTHON=/path/to/python
install=1
args=()
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; install=0; args+=("--help") ;;
    *) args+=("$arg") ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "[gpu_check] $(date -u +%FT%TZ) in $PWD; load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)" >&2
if [ "$install" = 1 ]; then
  echo "[gpu_check] installing the project with its gpu and test extras (--no-install skips this)" >&2
  if ! "$PYTHON" -m pip install -q -e '.[gpu,test]'; then
    echo "[gpu_check] the install failed; rerun with --no-install to use what is installed" >&2
    exit 3
  fi
fi
exec "$PYTHON" -m bench.gpu_check "${args[@]}"
