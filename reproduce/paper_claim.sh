#!/usr/bin/env bash
# The paper's Table 1 protocol on Fashion-MNIST: each architecture trained for 1 epoch with network
# deconvolution (ND) and with BatchNorm (BN), same seed, the authors' settings (ndeconv train's defaults:
# SGD lr 0.1 momentum 0.9, cosine per iteration, wd 1e-3, batch 128, block 64, block-fc 512 for ND / 0 for BN).
# The ND runs are also the shipped zoo weights (reproduce/ship.py).
#
# Resumable: a finished run is skipped, an interrupted one continues with --resume. Run it in the background:
#   nohup reproduce/paper_claim.sh > runs/paper_claim.log 2>&1 &
# Pick runs with RUNS="efficientnet_b0-nd vgg16-bn" reproduce/paper_claim.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/paper_claim}
source reproduce/train_run.sh
# Cheapest first; the heavy three (DenseNet-121, ResNeXt-29, DPN-92: hours per run here) last.
DEFAULT_RUNS="efficientnet_b0-nd efficientnet_b0-bn resnet18-nd mobilenetv2-nd vgg16-nd resnet18-bn
mobilenetv2-bn vgg16-bn preact_resnet18-nd preact_resnet18-bn senet18-nd senet18-bn pnasnet_a-nd pnasnet_a-bn
resnext29_32x4d-nd densenet121-nd dpn92-nd resnext29_32x4d-bn densenet121-bn dpn92-bn"
# A run that fails (a diverged loss is recorded in its diverged.json) does not stop the runs after it.
train_queue "$OUT" 1 "${RUNS:-$DEFAULT_RUNS}"
