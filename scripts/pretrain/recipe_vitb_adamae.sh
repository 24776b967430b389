# Shared recipe for the AdaMAE ViT-B pre-training launchers (sourced, not run).
# Paper: ViT-B, adaptive masking 0.95, decoder depth 4, total batch 2048 (32 clips x 64 GPUs),
# base lr 1.5e-4 (x 2048/256 = 1.2e-3), AdamW betas (0.9, 0.95), weight decay 0.05,
# 800 epochs with 40 warm-up epochs, 16 frames.
ADAMAE_RECIPE=(
  --model pretrain_videomae_base_patch16_224
  --mask_type adaptive
  --mask_ratio 0.95
  --decoder_depth 4
  --sampling_loss_weight 1e-4
  --num_frames 16
  --input_size 224
  --opt adamw
  --opt_betas 0.9 0.95
  --lr 1.5e-4
  --min_lr 1e-5
  --weight_decay 0.05
  --epochs 800
  --warmup_epochs 40
  --save_ckpt_freq 20
  --num_workers "${NUM_WORKERS:-10}"
)
source "$(dirname "${BASH_SOURCE[0]}")/../launch_lib.sh"
