# Sourced by the reproduce/*.sh queues: `train_run DIR [ndeconv train args...]` makes one resumable run.
# A finished run (its metrics.jsonl holds epoch $TRAIN_EPOCHS, default 1, and no partial epoch) is skipped, and so is a diverged one
# (diverged.json: resuming would repeat the same steps; delete the directory to start it again); an interrupted
# one continues with --resume, a new one starts with the given arguments. $NDECONV is the command (default ndeconv).
train_run() {
  local dir=$1; shift
  if [ -f "$dir/metrics.jsonl" ] && grep -Eq "\"epoch\": ${TRAIN_EPOCHS:-1}[,}]" "$dir/metrics.jsonl" && ! grep -q '"partial"' "$dir/metrics.jsonl"; then
    echo "== $dir: done"
  elif [ -f "$dir/diverged.json" ]; then
    echo "== $dir: diverged ($(cat "$dir/diverged.json")); skipped"
  elif [ -f "$dir/checkpoint.pt" ]; then
    echo "== $dir: resuming"; ${NDECONV:-ndeconv} train --resume "$dir"
  else
    echo "== $dir: starting"; ${NDECONV:-ndeconv} train "$@" --checkpoint-every 25 --out "$dir" --force
  fi
}

# `train_queue OUT EPOCHS "RUNS" [ndeconv train args...]`: the reproduce/*.sh queues of the paper's protocol. Each
# run of the whitespace-separated RUNS is ARCH-nd (network deconvolution), ARCH-bn (BatchNorm) or ARCH-stem (the
# hybrid: a deconvolution stem, BatchNorm elsewhere), trained by
# train_run into OUT/RUN for EPOCHS epochs on Fashion-MNIST, seed 0, the authors' settings (ndeconv train's
# defaults) and the extra args. A run that fails (a diverged loss is recorded in its diverged.json) does not stop
# the runs after it; the status is 1 when any failed.
train_queue() {
  local out=$1 epochs=$2 runs=$3; shift 3
  # train_run counts a run done when its metrics.jsonl reaches this epoch.
  local TRAIN_EPOCHS=$epochs
  local run arch form deconv failed=0
  mkdir -p "$out"
  for run in $runs; do
    arch=${run%-*}; form=${run##*-}
    case $form in nd) deconv=true ;; bn) deconv=false ;; stem) deconv=stem ;;
      *) echo "== $run: unknown form '$form' (ARCH-nd, ARCH-bn or ARCH-stem)"; failed=1; continue ;; esac
    train_run "$out/$run" --arch "$arch" --deconv "$deconv" --dataset fashion_mnist --epochs "$epochs" --seed 0 \
      "$@" || failed=1
  done
  return $failed
}
