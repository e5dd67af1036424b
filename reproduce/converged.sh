#!/usr/bin/env bash
# The converged zoo (issue: 20-epoch weights and the paper's 20-epoch claim): every architecture trained for
# 20 epochs with network deconvolution (ND) and with BatchNorm (BN), the authors' settings (ndeconv train's
# defaults, as reproduce/paper_claim.sh), same seed, in fast mode k=8 (ndeconv train --fast 8: the fastest mode
# measured as safe on this CPU, README "Fast mode"; it changes nothing for BN, which has no whitening) and in
# float32 (bf16 is emulated on this CPU, README "Mixed precision").
#
# Resumable: a finished run is skipped, an interrupted one continues with --resume. Run directories live outside
# the work tree (the tree is laid anew between sessions). In the background, at low priority:
#   nohup nice -n 19 reproduce/converged.sh > ~/.cache/ndeconv/runs/converged.log 2>&1 &
# Pick runs with RUNS="resnet18-nd vgg16-bn" reproduce/converged.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$HOME/.cache/ndeconv/runs/converged}
source reproduce/train_run.sh
# The shipped default tags first (ND), cheapest first; BN baselines of the seven lighter ones; the heavy three last.
DEFAULT_RUNS="resnet18-nd efficientnet_b0-nd mobilenetv2-nd vgg16-nd preact_resnet18-nd senet18-nd pnasnet_a-nd
resnet18-bn efficientnet_b0-bn mobilenetv2-bn vgg16-bn preact_resnet18-bn senet18-bn pnasnet_a-bn
resnext29_32x4d-nd densenet121-nd dpn92-nd resnext29_32x4d-bn densenet121-bn dpn92-bn"
train_queue "$OUT" 20 "${RUNS:-$DEFAULT_RUNS}" --fast 8
