#!/usr/bin/env bash
# One GPU lease, prepared: environment, training throughput, the paper's VGG-19 row as far as it fits.
#   OUT=gpu_out bash scripts/gpu_check.sh               on the GPU machine (needs local/ with the CIFAR copy)
#   OUT=/tmp/gpu bash scripts/gpu_check.sh --dry-run    the same steps on the CPU, tiny, in about a minute
# Everything it writes lands in $OUT (default ./gpu_out); see scripts/gpu_check.py for the phases.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # slimctl from this checkout, installed or not
exec "${PYTHON:-python3}" scripts/gpu_check.py --out "${OUT:-./gpu_out}" "$@"
