#!/usr/bin/env bash
# Linear probe (MAE's recipe: BatchNorm without affine + Linear, LARS, base lr 0.1, weight decay 0, 90 epochs,
# 10 warm-up) on cached features of a frozen encoder. Step 1 embeds each split once (tools/extract_features.py:
# mean-pooled tokens, bf16 on GPU, resumable; the test split averaged over 5 x 3 views), step 2 trains the probe on
# the cached vectors (seconds per epoch; one process is enough) and scores the test split -> OUTPUT_DIR/test_results.json.
#   CHECKPOINT=output/k400_vitb_adamae_0.95_800e/checkpoint-799.pth DATA_DIR=data/k400 bash scripts/probe/linear_probe.sh
# Extra flags go to run_linear_probe.py, e.g. --batch_size 1024 --lr 0.1 --data_set custom --nb_classes 4.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch_lib.sh"
CHECKPOINT=${CHECKPOINT:?set CHECKPOINT to a pre-trained checkpoint or a Hugging Face VideoMAE folder}
DATA_DIR=${DATA_DIR:-data/k400}
OUTPUT_DIR=${OUTPUT_DIR:-output/probe_linear}
FEATURES=${FEATURES:-$OUTPUT_DIR/features}
VIEWS=${VIEWS:-5x3}
cd "$REPO_DIR"
for split in train val test; do
  views=1x1; [[ $split == test ]] && views=$VIEWS
  python tools/extract_features.py --checkpoint "$CHECKPOINT" --list "$DATA_DIR/$split.csv" \
    --data_root "${DATA_ROOT:-}" --out "$FEATURES/$split" --views "$views" --num_workers "${NUM_WORKERS:-10}"
done
python run_linear_probe.py --probe linear --features "$FEATURES" --output_dir "$OUTPUT_DIR" "$@"
