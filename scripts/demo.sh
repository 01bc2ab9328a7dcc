#!/usr/bin/env bash
# The main job end to end on real images: Fashion-MNIST product photos (Debian's
# dataset-fashion-mnist, upscaled to the paper's 640x480) -> catalog -> raw-pixel
# projections + CNN embeddings -> Two-Flow training with repeated splits and a paired
# t-test -> predictions in SQL -> similarity search.
# Works in ./demo with a fresh store each run (./demo/.fs). DEMO_N sets the image count.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FS=$PWD/.venv/bin/fs
N=${DEMO_N:-1000}
mkdir -p demo && cd demo
rm -rf .fs
export FS_STORE=$PWD/.fs
set -x
# the training photos come from the train split: the held-out photos below come from the test split
"$FS" datasets export fashion-mnist ./fashion --split train --limit "$N" --size 640x480 --format jpeg
"$FS" ingest ./fashion --dataset fashion
"$FS" extract --rp 128 --model efficientnet-lite0
"$FS" status
# runs 1 and 2: CNN features alone vs naive stacking, on the same splits
"$FS" evaluate --features efficientnet-lite0 --features rp128,efficientnet-lite0 --select none --splits 5
# run 3: the Two-Flow model (RF-importance selection per flow), fitted on everything for prediction
"$FS" train --features rp128,efficientnet-lite0 --select rp128=55,efficientnet-lite0=400 --splits 5
"$FS" compare 3 1
# held-out photos (Fashion-MNIST test split), labelled, predicted with run 3's model
"$FS" datasets export fashion-mnist ./holdout --split test --limit 200 --seed 7 --size 640x480 --format jpeg
"$FS" ingest ./holdout --dataset holdout
"$FS" datasets overlap fashion holdout
"$FS" predict --run 3 --dataset holdout --show 5
# predictions are SQL rows: accuracy per superclass, most confused pairs, least confident images
"$FS" sql "SELECT i.superclass, count(*) AS n, round(avg(CASE WHEN p.label = i.label THEN 1.0 ELSE 0 END), 3) AS accuracy
  FROM predictions p JOIN images i ON i.id = p.image_id JOIN dataset_members m ON m.image_id = i.id
  JOIN datasets d ON d.id = m.dataset_id
  WHERE p.run_id = 3 AND d.name = 'holdout' GROUP BY i.superclass ORDER BY accuracy"
"$FS" sql "SELECT i.label AS truth, p.label AS predicted, count(*) AS n
  FROM predictions p JOIN images i ON i.id = p.image_id
  WHERE p.run_id = 3 AND p.label <> i.label GROUP BY 1, 2 ORDER BY n DESC LIMIT 5"
"$FS" sql "SELECT p.image_id, i.label, p.label AS predicted, round(p.probability, 3) AS p
  FROM predictions p JOIN images i ON i.id = p.image_id WHERE p.run_id = 3 ORDER BY p.probability LIMIT 5"
# visually similar products to image 1 among the held-out photos
"$FS" search --features efficientnet-lite0 --id 1 -k 5 --where "dataset = 'holdout'"
