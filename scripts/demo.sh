#!/usr/bin/env bash
# The main job end to end on real images: Fashion-MNIST product photos (Debian's
# dataset-fashion-mnist) -> catalog -> raw-pixel projections + CNN embeddings ->
# Two-Flow training with repeated splits -> predictions in SQL -> similarity search.
# Everything lands in ./demo (store at ./demo/.fs). Set DEMO_N for more images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FS=$PWD/.venv/bin/fs
N=${DEMO_N:-1000}
mkdir -p demo && cd demo
export FS_STORE=$PWD/.fs
set -x
"$FS" datasets export fashion-mnist ./fashion --limit "$N" --size 224x224 --format jpeg
"$FS" ingest ./fashion --dataset fashion
"$FS" status
