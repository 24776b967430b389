#!/usr/bin/env bash
# Fine-tune the 800-epoch AdaMAE ViT-B on Kinetics-400 (400 classes, dense sampling 16 x 4, 100 epochs,
# base lr 1e-3 as in VideoMAE's ViT-B/800e K400 script) and run the 5 x 3 view test. Paper: 81.7 top-1 / 95.2 top-5.
# One node (8 GPUs):   FINETUNE=path/to/pretrain.pth bash scripts/finetune/k400_vitb_800e.sh
# Multi-node (8 x 8):  on each node: NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> FINETUNE=... bash ...
# DeepSpeed:           DEEPSPEED=1 [ZERO=1] bash scripts/finetune/k400_vitb_800e.sh
set -euo pipefail
source "$(dirname "$0")/recipe_vitb_finetune.sh"
ACCUM_ITER=$(accum_for 64 "$(torchrun_processes)")
torchrun_launch 29501 run_class_finetuning.py "${FINETUNE_RECIPE[@]}" \
  --data_set Kinetics-400 --nb_classes 400 --data_path "${DATA_DIR:-data/k400}" --data_root "${DATA_ROOT:-}" \
  --sampling_rate 4 --lr 1e-3 --epochs 100 --test_num_segment 5 --test_num_crop 3 \
  --update_freq "$ACCUM_ITER" \
  --finetune "${FINETUNE:-output/k400_vitb_adamae_0.95_800e/checkpoint-799.pth}" \
  --output_dir "${OUTPUT_DIR:-output/k400_vitb_adamae_0.95_800e/finetune}" "$@"
