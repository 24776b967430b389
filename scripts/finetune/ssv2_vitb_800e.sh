#!/usr/bin/env bash
# Fine-tune the 800-epoch AdaMAE ViT-B on Something-Something v2 (174 classes, segment sampling of 16 frames,
# 50 epochs, base lr 5e-4) and run the 2 x 3 view test. Paper: 70.04 top-1 / 92.70 top-5.
# One node (8 GPUs):   FINETUNE=path/to/pretrain.pth bash scripts/finetune/ssv2_vitb_800e.sh
# Multi-node (8 x 8):  on each node: NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> FINETUNE=... bash ...
# DeepSpeed:           DEEPSPEED=1 [ZERO=1] bash scripts/finetune/ssv2_vitb_800e.sh
# DATA_DIR holds train.csv / val.csv / test.csv; extra arguments are passed on (e.g. --epochs 30).
set -euo pipefail
source "$(dirname "$0")/recipe_vitb_finetune.sh"
ACCUM_ITER=$(accum_for 64 "$(torchrun_processes)")
torchrun_launch 29501 run_class_finetuning.py "${FINETUNE_RECIPE[@]}" \
  --data_set SSV2 --nb_classes 174 --data_path "${DATA_DIR:-data/ssv2}" --data_root "${DATA_ROOT:-}" \
  --sampling_rate 2 --lr 5e-4 --epochs 50 --test_num_segment 2 --test_num_crop 3 \
  --update_freq "$ACCUM_ITER" \
  --finetune "${FINETUNE:-output/ssv2_vitb_adamae_0.95_800e/checkpoint-799.pth}" \
  --output_dir "${OUTPUT_DIR:-output/ssv2_vitb_adamae_0.95_800e/finetune}" "$@"
