#!/usr/bin/env bash
# The converged zoo (issue: 20-epoch weights and the paper's 20-epoch claim): every architecture trained for
# 20 epochs with network deconvolution (ND) and with BatchNorm (BN), the authors' settings (ndeconv train's
# defaults, as reproduce/paper_claim.sh), seed 0, in fast mode k=8 (ndeconv train --fast 8; it changes nothing
# for BN, which has no whitening).
#
# Precision, decided once per run folder and recorded in $OUT/precision.json: where the CPU computes bf16
# natively (ndeconv.runtime.native_amp_dtype), a one-epoch ResNet-18 (ND, fast 8, bf16 autocast, channels-last)
# is trained first into $OUT/precision-check; if its test top-1 is no more than 0.3 points below the float32
# exact one-epoch run (92.59%), every run trains in that mode, otherwise (or without native bf16) in float32.
# An ND run and its BN pair always share the decision; a run keeps the precision it started with on resume.
# A new run folder (a new machine) takes the decision recorded in reproduce/results/converged.json where this CPU
# can run it, and skips the runs recorded there as finished (converged.py carry-precision, recorded-finished).
#
# Two lanes train side by side with one thread each (measured: a pair finishes about 1.25x sooner than one run
# after the other with two threads); each lane walks the list below in order and skips a run the other lane holds.
#
# Resumable: a finished run is skipped, an interrupted one continues with --resume. Run directories live outside
# the work tree. In the background, at low priority:
#   nohup nice -n 19 reproduce/converged.sh >> ~/.cache/ndeconv/runs/converged.log 2>&1 &
# Pick runs with RUNS="resnet18-nd vgg16-bn" reproduce/converged.sh; LANES=1 for one lane with all threads.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$HOME/.cache/ndeconv/runs/converged}
LANES=${LANES:-2}
PY=${PYTHON:-python}
source reproduce/train_run.sh
# Pairs in the issue's order: ND then BN of the seven lighter architectures, the heavy three's ND last.
DEFAULT_RUNS="resnet18-nd resnet18-bn efficientnet_b0-nd efficientnet_b0-bn mobilenetv2-nd mobilenetv2-bn
vgg16-nd vgg16-bn senet18-nd preact_resnet18-nd pnasnet_a-nd senet18-bn pnasnet_a-bn preact_resnet18-bn
resnext29_32x4d-nd densenet121-nd dpn92-nd"
mkdir -p "$OUT"

if [ ! -f "$OUT/precision.json" ] && ! "$PY" reproduce/converged.py carry-precision --runs "$OUT"; then
  if "$PY" -c "import sys, torch; from ndeconv.runtime import native_amp_dtype
sys.exit(0 if native_amp_dtype('cpu') is torch.bfloat16 else 1)"; then
    TRAIN_EPOCHS=1 train_run "$OUT/precision-check" --arch resnet18 --deconv true --dataset fashion_mnist \
      --epochs 1 --seed 0 --fast 8 --amp bf16 --channels-last || exit 1
  fi
  "$PY" reproduce/converged.py decide-precision --runs "$OUT" || exit 1
fi
read -r -a PRECISION_ARGS <<< "$("$PY" reproduce/converged.py precision-args --runs "$OUT")"
echo "== precision: ${PRECISION_ARGS[*]:-float32}"
RECORDED_FINISHED=" $("$PY" reproduce/converged.py recorded-finished --runs "$OUT") "

lane() {
  local run status=0
  for run in ${RUNS:-$DEFAULT_RUNS}; do
    if [[ $RECORDED_FINISHED == *" $run "* ]]; then
      echo "== $OUT/$run: done (recorded in reproduce/results/converged.json)"; continue
    fi
    # The other lane holds this run (flock is released by the kernel when its holder exits).
    exec {fd}>"$OUT/.$run.queue-lock"
    if ! flock -n "$fd"; then exec {fd}>&-; continue; fi
    OMP_NUM_THREADS=$((LANES > 1 ? 1 : ${OMP_NUM_THREADS:-2})) \
      train_queue "$OUT" 20 "$run" --fast 8 "${PRECISION_ARGS[@]}" || status=1
    exec {fd}>&-
  done
  return $status
}
pids=()
for ((i = 0; i < LANES; i++)); do lane & pids+=($!); sleep 5; done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
exit $failed
