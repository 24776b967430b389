#!/usr/bin/env bash
# AdaMAE ViT-B pre-training on Kinetics-400, 800 epochs, with torchrun.
# One node (8 GPUs):   bash scripts/pretrain/k400_vitb_adamae_800e.sh
# Multi-node (8 x 8):  on each node: NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> bash scripts/pretrain/k400_vitb_adamae_800e.sh
# The paper's total batch is 32 x 64 = 2048; on fewer GPUs raise ACCUM so that GPUS * 32 * ACCUM = 2048.
set -euo pipefail
source "$(dirname "$0")/recipe_vitb_adamae.sh"
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
ACCUM=${ACCUM:-$(( 64 / (NNODES * GPUS_PER_NODE) > 0 ? 64 / (NNODES * GPUS_PER_NODE) : 1 ))}
DATA_LIST=${DATA_DIR:-data/k400}/train.csv
OUTPUT_DIR=${OUTPUT_DIR:-output/k400_vitb_adamae_0.95_800e}
cd "$REPO_DIR"
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  run_mae_pretraining.py "${ADAMAE_RECIPE[@]}" \
  --data_set Kinetics-400 --data_path "$DATA_LIST" --data_root "${DATA_ROOT:-}" \
  --sampling_rate 4 --batch_size 32 --accum_iter "$ACCUM" \
  --output_dir "$OUTPUT_DIR" "$@"
