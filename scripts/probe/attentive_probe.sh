#!/usr/bin/env bash
# Attentive probe (V-JEPA's evaluation: one learned query cross-attending over the frozen encoder's tokens, MLP,
# Linear; AdamW, base lr 1e-3 for a total batch of 256, weight decay 0.01, 20 epochs) computed on the fly, then the
# multi-view test (5 x 3 views) -> OUTPUT_DIR/test_results.json. Clip shape (frames, stride, crop) from the checkpoint.
# One node (8 GPUs):  CHECKPOINT=output/k400_vitb_adamae_0.95_800e/checkpoint-799.pth DATA_DIR=data/k400 bash scripts/probe/attentive_probe.sh
# Extra flags go to run_linear_probe.py, e.g. --data_set SSV2 --test_num_segment 2.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch_lib.sh"
CHECKPOINT=${CHECKPOINT:?set CHECKPOINT to a pre-trained checkpoint or a Hugging Face VideoMAE folder}
torchrun_launch 29502 run_linear_probe.py --probe attentive --checkpoint "$CHECKPOINT" \
  --data_path "${DATA_DIR:-data/k400}" --data_root "${DATA_ROOT:-}" --batch_size "${BATCH_SIZE:-32}" \
  --num_workers "${NUM_WORKERS:-10}" --dist_eval --test_num_segment 5 --test_num_crop 3 \
  --output_dir "${OUTPUT_DIR:-output/probe_attentive}" "$@"
