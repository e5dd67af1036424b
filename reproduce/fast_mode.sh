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
NDECONV=${NDECONV:-ndeconv}
mkdir -p "$OUT"
for k in ${FAST_K:-4}; do
  dir="$OUT/resnet18-nd-fast$k"
  if [ -f "$dir/metrics.jsonl" ] && grep -q '"epoch": 1' "$dir/metrics.jsonl" && ! grep -q '"partial"' "$dir/metrics.jsonl"; then
    echo "== fast $k: done"; continue
  fi
  if [ -f "$dir/checkpoint.pt" ]; then
    echo "== fast $k: resuming"; $NDECONV train --resume "$dir" || exit 1
  else
    echo "== fast $k: starting"
    $NDECONV train --arch resnet18 --deconv true --fast "$k" --dataset fashion_mnist --epochs 1 --seed 0 \
      --checkpoint-every 25 --out "$dir" --force || exit 1
  fi
done
