#!/usr/bin/env bash
# bf16 whitening's accuracy (ndeconv.set_bf16_whitening, `ndeconv train --bf16-whitening`): ResNet-18, one epoch
# on Fashion-MNIST, seed 0, the authors' settings, under bf16 autocast in channels-last format, exact and fast mode
# k=8, against float32 exact (92.59%, reproduce/paper_claim.sh) and the same runs with float32 whitening (the
# converged queue's precision check: fast 8, 92.95%). Needs a CPU with native bf16 (AVX512-BF16 or AMX).
# Resumable (reproduce/train_run.sh); runs side by side with one thread each, in the background at low priority:
#   nohup nice -n 10 reproduce/bf16_whitening.sh >> ~/.cache/ndeconv/runs/bf16_whitening.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$HOME/.cache/ndeconv/runs/bf16_whitening}
source reproduce/train_run.sh
mkdir -p "$OUT"
common=(--arch resnet18 --deconv true --dataset fashion_mnist --epochs 1 --seed 0 --amp bf16 --channels-last
        --bf16-whitening)
OMP_NUM_THREADS=1 train_run "$OUT/resnet18-fast8" "${common[@]}" --fast 8 &
OMP_NUM_THREADS=1 train_run "$OUT/resnet18-exact" "${common[@]}" &
wait
