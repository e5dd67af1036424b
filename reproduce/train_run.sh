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
