#!/usr/bin/env bash
# Transfer learning into deconvolution on Fashion-MNIST (issue #22 part 1): each one-epoch BatchNorm run of
# reproduce/paper_claim.sh (ARCH-bn) is converted exactly by `ndeconv convert-bn` (calibrated on 1024 training
# images), both are scored on the test set, then each is trained one more epoch from its weights with the same
# settings: the converted network as deconvolution (ARCH-ft-nd), the BatchNorm one as BatchNorm (ARCH-ft-bn).
# Fine-tuning settings: ndeconv train's defaults but lr 0.01 (the BN runs ended their cosine schedule at 0; 0.1
# would throw the trained weights away), 1 epoch, seed 0.
#
# Resumable like the other queues (finished steps are skipped, an interrupted run resumes). Needs the BN runs:
#   OUT=~/.cache/ndeconv/runs PAPER=~/.cache/ndeconv/runs/paper_claim nohup reproduce/convert_bn.sh > convert_bn.log 2>&1 &
# then `python reproduce/convert_bn.py --runs $OUT/convert_bn` writes reproduce/results/convert_bn.json and the
# table in docs/conversion.md. Pick architectures with ARCHS="resnet18 vgg16".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}/convert_bn
PAPER=${PAPER:-runs/paper_claim}
source reproduce/train_run.sh
mkdir -p "$OUT"
failed=0
for arch in ${ARCHS:-resnet18 vgg16 efficientnet_b0}; do
  bn="$PAPER/$arch-bn"
  if [ ! -f "$bn/model.safetensors" ]; then
    echo "== $arch: no finished BatchNorm run in $bn (reproduce/paper_claim.sh makes it); skipped"; failed=1; continue
  fi
  converted="$OUT/$arch-converted/model.safetensors"
  if [ ! -f "$converted" ]; then
    echo "== $arch: converting $bn"
    ${NDECONV:-ndeconv} convert-bn "$bn" --calibrate-data fashion_mnist -o "$converted" || { failed=1; continue; }
  fi
  for scored in "$bn:bn" "$converted:converted"; do
    source_path=${scored%:*}; name=${scored##*:}
    result="$OUT/$arch-$name.eval.json"
    [ -f "$result" ] && continue
    if [ "$name" = bn ]; then args=("$source_path"); else args=(--checkpoint "$source_path"); fi
    ${NDECONV:-ndeconv} eval "${args[@]}" --dataset fashion_mnist --json > "$result.tmp" && mv "$result.tmp" "$result" \
      || { rm -f "$result.tmp"; failed=1; }
  done
  TRAIN_EPOCHS=1 train_run "$OUT/$arch-ft-nd" --arch "$arch" --deconv false --initial-checkpoint "$converted" \
    --dataset fashion_mnist --epochs 1 --lr 0.01 --seed 0 || failed=1
  TRAIN_EPOCHS=1 train_run "$OUT/$arch-ft-bn" --arch "$arch" --deconv false --initial-checkpoint "$bn" \
    --dataset fashion_mnist --epochs 1 --lr 0.01 --seed 0 || failed=1
done
exit $failed
