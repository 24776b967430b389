#!/usr/bin/env bash
# AdaMAE ViT-B pre-training on SSV2 on ONE GPU with the paper's total batch of 2048:
# 32 clips x 64 accumulation steps per optimizer step (same lr and schedule as 64 GPUs, 64x slower).
# Add --use_checkpoint to trade compute for memory on smaller GPUs.
set -euo pipefail
source "$(dirname "$0")/recipe_vitb_adamae.sh"
cd "$REPO_DIR"
python run_mae_pretraining.py "${ADAMAE_RECIPE[@]}" \
  --data_set SSV2 --data_path "${DATA_DIR:-data/ssv2}/train.csv" --data_root "${DATA_ROOT:-}" \
  --sampling_rate 2 --batch_size 32 --accum_iter 64 \
  --output_dir "${OUTPUT_DIR:-output/ssv2_vitb_adamae_0.95_800e_1gpu}" "$@"
