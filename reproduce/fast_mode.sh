#!/usr/bin/env bash
# The accuracy cost of fast mode (ndeconv train --fast K: each whitening matrix recomputed every K steps):
# ResNet-18 ND trained 1 epoch on Fashion-MNIST with the exact run's seed and settings, compared with the
# exact run of reproduce/paper_claim.sh (runs/paper_claim/resnet18-nd) by reproduce/fast_mode.py.
#
# Resumable like paper_claim.sh. Run it in the background:
#   nohup reproduce/fast_mode.sh > runs/fast_mode.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fast_mode}
source reproduce/train_run.sh
mkdir -p "$OUT"
for k in ${FAST_K:-4 8}; do
  train_run "$OUT/resnet18-nd-fast$k" --arch resnet18 --deconv true --fast "$k" --dataset fashion_mnist --epochs 1 \
    --seed 0 || exit 1
done
