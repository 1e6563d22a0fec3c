#!/usr/bin/env bash
# chargpt on one GPU in one call of under 9 minutes (benchmarks/gpu.py says what it runs): the
# default recipe against nanoGPT's shakespeare_char settings for 30 s and 90 s of wall time, the
# step time of each preset, then decoding with and without CUDA graphs. Writes results.json,
# gpu.md (the tables), gpu.png (val loss against wall time), gpu.log and each run's output into
# the --out directory.
#
#   benchmarks/gpu.sh [--out DIR] [--device cuda] [--sections probe,steps,budgets,decode]
#                     [--budgets 30s,90s] [--deadline 510] [--smoke]
#
# --smoke: tiny sizes, a 7-s budget, no samples and no compiling, for a test on the CPU
# (tests/test_gpu_script.py: `benchmarks/gpu.sh --device cpu --smoke`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
args=("$@")
if [[ " $* " != *" --out "* ]]; then
    args+=(--out "$(mktemp -d -t chargpt-gpu-XXXXXX)")
fi
exec "${PYTHON:-python}" "$root/benchmarks/gpu.py" "${args[@]}"
