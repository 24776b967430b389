#!/usr/bin/env bash
# AdaMAE ViT-B pre-training on SSV2, 800 epochs, with torchrun.
# One node (8 GPUs):   bash scripts/pretrain/ssv2_vitb_adamae_800e.sh
# Multi-node (8 x 8):  on each node: NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> bash scripts/pretrain/ssv2_vitb_adamae_800e.sh
# The paper's total batch is 32 x 64 = 2048: on fewer GPUs the accumulation ACCUM (default 64 / GPUs) keeps it.
set -euo pipefail
source "$(dirname "$0")/recipe_vitb_adamae.sh"
ACCUM_ITER=$(accum_for 64 "$(torchrun_processes)")
torchrun_launch 29500 run_mae_pretraining.py "${ADAMAE_RECIPE[@]}" \
  --data_set SSV2 --data_path "${DATA_DIR:-data/ssv2}/train.csv" --data_root "${DATA_ROOT:-}" \
  --sampling_rate 2 --batch_size 32 --accum_iter "$ACCUM_ITER" \
  --output_dir "${OUTPUT_DIR:-output/ssv2_vitb_adamae_0.95_800e}" "$@"
