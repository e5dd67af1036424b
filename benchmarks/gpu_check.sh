#!/usr/bin/env bash
# The GPU check of mixed-precision deconvolution (benchmarks/gpu_check.py): layers in float64 against the CPU,
# AMP fp16/bf16 training steps of three zoo networks, ND/BN step times under AMP and matmul vs eigh.
# Usage: benchmarks/gpu_check.sh OUT_DIR [--device cuda|cuda:N|cpu] [--quick]   (writes OUT_DIR/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then echo "usage: benchmarks/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick]" >&2; exit 2; fi
exec timeout 480 python benchmarks/gpu_check.py "$@"
