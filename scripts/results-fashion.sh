#!/usr/bin/env bash
# Reproduce the accuracy tables of docs/RESULTS.md on Fashion-MNIST (issue 16).
#
#   bash scripts/results-fashion.sh table1     # 5,000 images, 10 repeated 90/10 splits (~3 h on 2 cores)
#   bash scripts/results-fashion.sh official   # train on the 60,000 train images, test on the 10,000 test images (~2.5 h)
#
# RESULTS_DIR (default /tmp/results) holds the exported images and the stores: table1 in
# $RESULTS_DIR/.fs, official in $RESULTS_DIR/official/.fs. Each command is printed with its
# wall time; `fs evaluate --format json` rows go to $RESULTS_DIR/<stage>-*.json.
# OFFICIAL_MODELS (default "efficientnet-lite0 efficientnet-lite1 efficientnet-lite2") picks the
# backbones of the official protocol (each with its last and two mid-level taps). HGB_FEATURES
# picks the rows that also get HistGradientBoosting in table1 (it costs ~18 min per 1,280-dim
# row on 2 cores; by default the three single backbones of rows 20-22).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash scripts/results-fashion.sh table1|official}
FS=$PWD/.venv/bin/fs
[ -x "$FS" ] || bash scripts/setup.sh
DIR=${RESULTS_DIR:-/tmp/results}
mkdir -p "$DIR"

run() {  # run a command, printing it and its wall time
  echo "+ $*" >&2
  local t0=$SECONDS
  "$@"
  echo "  ($((SECONDS - t0)) s)" >&2
}

table1() {
  export FS_STORE=$DIR/.fs
  if [ ! -d "$DIR/fashion" ]; then
    run "$FS" datasets export fashion-mnist "$DIR/fashion" --limit 5000 --size 640x480 --format jpeg
  fi
  run "$FS" ingest "$DIR/fashion" --dataset fashion
  run "$FS" extract --rp 128 --lowlevel
  run "$FS" extract --model efficientnet-lite0 --layers global_pool,block14_out,block10_out
  run "$FS" extract --model efficientnet-lite0 --tta flip
  run "$FS" extract --model efficientnet-lite1 --layers global_pool,block14_out,block10_out
  run "$FS" extract --model efficientnet-lite2 --layers global_pool,block14_out,block10_out
  run "$FS" extract --model efficientnet-lite2 --tta flip
  for m in efficientnet-lite0 efficientnet-lite1 efficientnet-lite2; do  # every tap flipped (row 18)
    run "$FS" extract --model "$m" --layers global_pool,block14_out,block10_out --tta flip
  done
  # lite0's block10_out map (112 x 14 x 14) averaged over a 3 x 3 grid (row 19)
  run "$FS" extract --model efficientnet-lite0 --layers block10_out --grid 3
  # the baseline every row is paired with: the paper's Two-Flow Random Forest
  run "$FS" train --features rp128,efficientnet-lite0 --select rp128=55,efficientnet-lite0=400 \
    --format json > "$DIR/table1-twoflow.json"
  # every backbone's last and two mid-level taps, flip where extracted, the hand-made features
  local ALL=efficientnet-lite0+flip,efficientnet-lite1,efficientnet-lite2+flip
  ALL+=,efficientnet-lite0.block14_out,efficientnet-lite0.block10_out,efficientnet-lite1.block14_out
  ALL+=,efficientnet-lite1.block10_out,efficientnet-lite2.block14_out,efficientnet-lite2.block10_out,lowlevel,rp128
  local rows=(
    --features efficientnet-lite0
    --features efficientnet-lite1
    --features efficientnet-lite2
    --features efficientnet-lite0+flip
    --features efficientnet-lite2+flip
    --features efficientnet-lite0,efficientnet-lite0.block14_out,efficientnet-lite0.block10_out,lowlevel,rp128
    --features efficientnet-lite0+flip,efficientnet-lite1,efficientnet-lite2+flip
    --features efficientnet-lite0+flip,efficientnet-lite1,efficientnet-lite2+flip,efficientnet-lite0.block14_out,efficientnet-lite0.block10_out,lowlevel,rp128
    --features "$ALL"
  )
  run "$FS" evaluate "${rows[@]}" --select none --classifier logreg --format json > "$DIR/table1-logreg.json"
  # the same stack with every CNN set flipped
  local FLIP=efficientnet-lite0+flip,efficientnet-lite1+flip,efficientnet-lite2+flip
  for m in efficientnet-lite0 efficientnet-lite1 efficientnet-lite2; do FLIP+=,$m.block14_out+flip,$m.block10_out+flip; done
  run "$FS" evaluate --features "$FLIP,lowlevel,rp128" --select none --classifier logreg --format json \
    > "$DIR/table1-logreg-allflip.json"
  # the widest stack plus lite0's block10_out pooled over a 3 x 3 grid
  run "$FS" evaluate --features "$ALL,efficientnet-lite0.block10_out+grid3" --select none --classifier logreg \
    --format json > "$DIR/table1-logreg-grid.json"
  # the widest stack with C chosen by 3-fold CV inside each training split
  run "$FS" evaluate --features "$ALL" --select none --classifier logreg-cv --format json > "$DIR/table1-logregcv.json"
  # the widest stack through one hidden layer (mlp), stopped early on a tenth of each training part
  run "$FS" evaluate --features "$ALL" --select none --classifier mlp --format json > "$DIR/table1-mlp.json"
  # the final Random Forest on the single sets (3-4 min a row here; slower on the wide stacks)
  run "$FS" evaluate "${rows[@]:0:10}" --select none --classifier rf --format json > "$DIR/table1-rf.json"
  local hgb=()
  for f in ${HGB_FEATURES:-efficientnet-lite0+flip efficientnet-lite1 efficientnet-lite2}; do hgb+=(--features "$f"); done
  run "$FS" evaluate "${hgb[@]}" --select none --classifier hgb --trees 200 --format json > "$DIR/table1-hgb.json"
  run "$FS" runs
}

official() {
  export FS_STORE=$DIR/official/.fs
  for split in train test; do
    if [ ! -d "$DIR/official/$split" ]; then
      # native 28x28 grayscale PNG: the CNN input is stretched to its own size at extraction
      run "$FS" datasets export fashion-mnist "$DIR/official/$split" --split "$split" --format png
    fi
    run "$FS" ingest "$DIR/official/$split" --dataset "fmnist-$split"
  done
  local models=(${OFFICIAL_MODELS:-efficientnet-lite0 efficientnet-lite1 efficientnet-lite2})
  local pools="" taps=""
  for m in "${models[@]}"; do
    run "$FS" extract --model "$m" --layers global_pool,block14_out,block10_out
    pools+=${pools:+,}$m
    taps+=${taps:+,}$m,$m.block14_out,$m.block10_out
  done
  local rows=()
  for m in "${models[@]}"; do rows+=(--features "$m"); done
  rows+=(--features "$pools" --features "$taps")
  run "$FS" evaluate "${rows[@]}" --select none --classifier logreg --dataset fmnist-train \
    --test-dataset fmnist-test --format json > "$DIR/official-logreg.json"
  # the first backbone alone and the widest stack through one hidden layer (mlp)
  run "$FS" evaluate --features "${models[0]}" --features "$taps" --select none --classifier mlp \
    --dataset fmnist-train --test-dataset fmnist-test --format json > "$DIR/official-mlp.json"
  # the widest stack plus the first backbone's block10_out map over a 3 x 3 grid (rows 7 and 8)
  run "$FS" extract --model "${models[0]}" --layers block10_out --grid 3
  for clf in logreg mlp; do
    run "$FS" evaluate --features "$taps,${models[0]}.block10_out+grid3" --select none --classifier "$clf" \
      --dataset fmnist-train --test-dataset fmnist-test --format json > "$DIR/official-$clf-grid.json"
  done
  run "$FS" runs
}

"$stage"
