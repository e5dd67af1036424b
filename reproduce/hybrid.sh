#!/usr/bin/env bash
# Hybrid networks on Fashion-MNIST (issue #22 part 2): each architecture with a deconvolution stem and BatchNorm
# elsewhere (`--deconv stem`), trained 1 epoch under the paper-claim protocol (reproduce/paper_claim.sh: seed 0,
# ndeconv train's defaults), beside that table's BN and ND runs. ARCH-bn in RUNS reruns the BatchNorm form in
# the same queue, so the hybrid can be compared with a BN run of the same code on the same machine.
#
# Resumable: a finished run is skipped, an interrupted one continues with --resume. In the background:
#   OUT=~/.cache/ndeconv/runs/hybrid nohup reproduce/hybrid.sh >> ~/.cache/ndeconv/runs/hybrid.log 2>&1 &
# then `python reproduce/hybrid.py --runs $OUT` writes reproduce/results/hybrid.json and its table in docs/reproduction.md.
# Pick runs with RUNS="resnet18-stem resnet18-bn".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/hybrid}
source reproduce/train_run.sh
# Cheapest first; the heavy three (ResNeXt-29, DenseNet-121, DPN-92: hours per run here) last, each with the BN
# run the paper-claim table lacks.
DEFAULT_RUNS="efficientnet_b0-stem vgg16-stem resnet18-stem mobilenetv2-stem preact_resnet18-stem senet18-stem
pnasnet_a-stem resnext29_32x4d-stem resnext29_32x4d-bn densenet121-stem densenet121-bn dpn92-stem dpn92-bn"
train_queue "$OUT" 1 "${RUNS:-$DEFAULT_RUNS}"
