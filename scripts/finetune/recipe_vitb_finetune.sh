# Shared recipe for the ViT-B fine-tuning launchers (sourced, not run).
# VideoMAE / AdaMAE ViT-B (800-epoch pre-training) fine-tuning: 64 GPUs x 8 videos = total batch 512,
# AdamW betas (0.9, 0.999), weight decay 0.05, layer decay 0.75, drop path 0.1, 5 warm-up epochs,
# RandAugment rand-m7-n4-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1.
# --lr is the BASE lr for a total batch of 256: the program multiplies it by total_batch / 256 and prints
# both (SSv2: 5e-4 x 512/256 = 1e-3 actual, as confirmed by the AdaMAE authors in wgcban/adamae#1).
# The total batch is batch_size x update_freq x GPUs; ACCUM keeps it at 512 on fewer GPUs.
FINETUNE_RECIPE=(
  --model vit_base_patch16_224
  --num_frames 16
  --input_size 224
  --short_side_size 224
  --batch_size 8
  --num_sample 1
  --opt adamw
  --opt_betas 0.9 0.999
  --weight_decay 0.05
  --layer_decay 0.75
  --drop_path 0.1
  --warmup_epochs 5
  --min_lr 1e-6
  --mixup 0.8
  --cutmix 1.0
  --smoothing 0.1
  --aa rand-m7-n4-mstd0.5-inc1
  --reprob 0.25
  --save_ckpt_freq 10
  --dist_eval
  --num_workers "${NUM_WORKERS:-10}"
)
# DEEPSPEED=1 trains through a DeepSpeed engine (pip install -r requirements-deepspeed.txt); ZERO=<0|1|2>.
if [[ "${DEEPSPEED:-0}" == "1" ]]; then
  FINETUNE_RECIPE+=(--enable_deepspeed --zero_stage "${ZERO:-0}")
fi
source "$(dirname "${BASH_SOURCE[0]}")/../launch_lib.sh"
