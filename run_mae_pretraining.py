"""AdaMAE / VideoMAE pre-training.

One process:   python run_mae_pretraining.py --data_path train.csv --output_dir out [...]
One node:      torchrun --nproc_per_node 8 run_mae_pretraining.py [...]
Multi-node:    torchrun --nnodes N --node_rank R --master_addr HOST --nproc_per_node 8 run_mae_pretraining.py [...]
SLURM:         srun python run_mae_pretraining.py [...]   (rank / world / master read from SLURM_*)

Flags follow VideoMAE / AdaMAE's; ``--lr`` is the base learning rate for a total batch of 256.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any


import distributed
import metric_logging
import optim_factory
import training
from checkpointing import Checkpointer
from cli import HelpFormatter, add_debug_arg, at_least, run_program
from datasets import add_data_args, build_pretraining_dataset, get_broken_count, multiple_samples_collate
from distributed import get_world_size, is_main_process
from engine_for_pretraining import clips_to_device, train_one_epoch
from losses import SAMPLING_LOG_PROBS
from mask_visualization import log_mask_images
from masking_generator import MASK_TYPES, canonical_mask_type
from modeling_pretrain import PRETRAIN_MODELS, create_pretrain_model
from preemption import GracefulStop
from resume import trim_log
from utils import count_parameters
from video_transforms import normalize_clips


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("AdaMAE pre-training", add_help=True,
                                formatter_class=HelpFormatter)
    g = training.add_run_args(p, batch_size=64, epochs=800, save_ckpt_freq=50,
                              batch_help="clips per process per step (before --num_sample)")

    g = training.add_model_args(p, model="pretrain_videomae_base_patch16_224", models=PRETRAIN_MODELS, drop_path=0.0,
                                kwargs_example='{"encoder_depth": 4}')
    g.add_argument("--decoder_depth", default=4, type=at_least(0), help="decoder blocks (AdaMAE/VideoMAE: 4)")
    g.add_argument("--normalize_target", "--normlize_target", default=True, action=argparse.BooleanOptionalAction,
                   help="per-tubelet normalised pixel targets (paper); --no-normalize_target for raw pixels")
    g.add_argument("--loss_type", default="mse", choices=["mse", "l1"],
                   help="reconstruction error per token (ablation d)")

    g = p.add_argument_group("masking and sampler")
    g.add_argument("--mask_type", default="adaptive", choices=list(MASK_TYPES) + ["learnable"],
                   help="adaptive = AdaMAE's learned sampler (alias learnable); tube/random/frame for ablations")
    g.add_argument("--mask_ratio", default=0.95, type=float, help="fraction of tokens masked (AdaMAE: 0.95)")
    g.add_argument("--sampling_loss_weight", "--sampler_loss_weight", default=1e-4, type=float,
                   help="weight of the sampling (REINFORCE) loss; 1e-4 as in AdaMAE")
    g.add_argument("--sampler_temperature", default=1.0, type=at_least(0.0, float, strict=True),
                   help="divides the sampler's logits (> 0; AdaMAE applies none: 1.0 is faithful)")
    g.add_argument("--softmax_temp", default=None, type=float,
                   help="accepted for AdaMAE command lines and ignored, as AdaMAE ignores it (its parser default "
                        "1e-2 is never applied); --sampler_temperature is the temperature")
    g.add_argument("--sampler_type", default="mha", choices=["mha", "mlp"],
                   help="token sampler body: mha (AdaMAE) or mlp (ablation f)")
    g.add_argument("--sampler_depth", default=1, type=at_least(0), help="token sampler blocks (ablation f)")
    g.add_argument("--sampler_dim", default=None, type=at_least(1), help="sampler width (default: encoder width)")
    g.add_argument("--sampler_heads", default=8, type=at_least(1), help="token sampler attention heads")
    g.add_argument("--sampler_detach_input", action="store_true",
                   help="stop the sampling loss from training the shared patch embedding")
    g.add_argument("--sampling_log_prob", default="categorical", choices=SAMPLING_LOG_PROBS,
                   help="log p of the sampling loss: categorical = AdaMAE's Categorical(probs).log_prob (p clamped "
                        "at float32 eps: a token below 1.2e-7 counts as 1.2e-7 and gets no gradient); log_softmax "
                        "= exact (differs once the sampler is that peaked)")
    g.add_argument("--no_sampler_pos_weight_decay", action="store_true",
                   help="no weight decay on the sampler's pos_embed_probs (AdaMAE decays it, like other weights)")

    optim_factory.add_optimizer_args(p, lr=1.5e-4, min_lr=1e-5, warmup_lr=0.0, warmup_epochs=40)

    g = training.add_output_args(p, "output and resume", "checkpoints, log.txt, args.json, TensorBoard")
    g.add_argument("--vis_freq", default=20, type=at_least(0),
                   help="every N epochs log the Video|Prediction|No leak|Error|CAT|Mask grid of fixed clips to "
                        "TensorBoard (0: never)")
    g.add_argument("--vis_num_clips", default=4, type=at_least(1), help="clips in the TensorBoard mask grid")

    add_data_args(p, pretrain=True)
    distributed.add_distributed_args(p)
    add_debug_arg(p)
    return p


def no_weight_decay_names(args: argparse.Namespace, model: Any) -> set[str]:
    """AdaMAE's weight-decay exemptions (``model.no_weight_decay()``), plus the sampler's position table with
    ``--no_sampler_pos_weight_decay``."""
    return model.no_weight_decay() | ({"encoder.pos_embed_probs"} if args.no_sampler_pos_weight_decay else set())


SAMPLER_FLAGS = ("sampling_loss_weight", "sampler_temperature", "sampler_type", "sampler_depth", "sampler_dim",
                 "sampler_heads", "sampler_detach_input", "sampling_log_prob", "no_sampler_pos_weight_decay")


def sampler_flags_set(args: argparse.Namespace) -> list[str]:
    """The adaptive sampler's flags that differ from their defaults, as ``--flag``."""
    defaults = get_args_parser().parse_args([])
    return [f"--{k}" for k in SAMPLER_FLAGS if getattr(args, k) != getattr(defaults, k)]


def main(args: argparse.Namespace) -> dict:
    device = training.setup_run(args)
    print(f"job dir: {os.path.dirname(os.path.abspath(__file__))}")
    if args.softmax_temp is not None:
        print(f"Note: --softmax_temp {args.softmax_temp} is ignored, as in AdaMAE (which never applies it); the "
              f"sampler's temperature is --sampler_temperature ({args.sampler_temperature})")
    unused = sampler_flags_set(args) if canonical_mask_type(args.mask_type) != "adaptive" else []
    if unused:
        print(f"Note: {', '.join(unused)} set, but --mask_type {args.mask_type} has no sampler: they have no effect")
    data = training.build_train_loader(build_pretraining_dataset(args), args, device, multiple_samples_collate)
    model = create_pretrain_model(args).to(device)
    model_without_ddp = model
    n_params = count_parameters(model)
    print(f"Model {args.model}: {n_params / 1e6:.2f}M parameters, mask {model.mask_type} {args.mask_ratio} "
          f"({model.num_visible} of {model.num_patches} tokens visible)")
    optim = training.build_optimisation(args, model, data.steps_per_epoch, device,
                                        skip_list=no_weight_decay_names(args, model))
    print(f"{len(data.dataset)} videos, {data.steps_per_epoch} optimizer steps per epoch, clips per step "
          f"{args.batch_size * args.accum_iter * get_world_size() * args.num_sample} "
          f"(num_sample {args.num_sample})")
    checkpointer = Checkpointer(args, model, optim.optimizer, optim.loss_scaler, kind="pretrain",
                                model_name=args.model, mask_type=model.mask_type, mask_ratio=args.mask_ratio)
    resumed = checkpointer.resume()
    training.record_args(args, ("model", "mask_type", "mask_ratio", "data_path", "batch_size", "epochs", "lr",
                                "num_frames", "input_size", "output_dir"))
    trim_log(args.output_dir, args.start_epoch)
    model = training.wrap_model(model, args, device, args.compile)
    log_writer = metric_logging.TensorboardLogger(args.log_dir, purge_step=resumed.global_step)
    vis_clips = None
    if log_writer.writer is not None and args.vis_freq > 0:
        # Fixed clips (the dataset's augmentation is seeded per index and epoch) so the grid shows the mask evolving.
        data.dataset.set_epoch(0)
        vis_clips = multiple_samples_collate([data.dataset[i]
                                              for i in range(min(args.vis_num_clips, len(data.dataset)))])

    def train_epoch(epoch: int, first_step: int, meters: metric_logging.MetricLogger) -> Any:
        return train_one_epoch(model, data.loader, optim, device, epoch, args, log_writer=log_writer,
                               broken_count=lambda: get_broken_count(data.dataset), first_step=first_step,
                               meters=meters, stop=stop)

    def visualise(epoch: int, _: dict[str, float]) -> dict[str, Any]:
        if vis_clips is not None and ((epoch + 1) % args.vis_freq == 0 or epoch + 1 == args.epochs):
            first_clips = clips_to_device(vis_clips, device)[::args.num_sample]  # one clip per video
            # At the epoch's last step: a run resumed from this epoch's checkpoint purges the steps after it only.
            log_mask_images(log_writer, model_without_ddp, normalize_clips(first_clips),
                            step=(epoch + 1) * data.steps_per_epoch - 1, normalize_target=args.normalize_target,
                            loss_type=args.loss_type, max_clips=args.vis_num_clips)
        return {}

    print(f"Start training for {args.epochs} epochs from epoch {args.start_epoch}")
    start_time = time.time()
    stop = GracefulStop()
    stats = training.run_epochs(args, data, resumed, checkpointer, train_epoch, stop, log_writer,
                                after_epoch=visualise, log_extra={"n_parameters": n_params})
    stop.restore()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if is_main_process():
        print(f"Checkpoints: {os.path.abspath(args.output_dir)}/checkpoint-*.pth\n"
              f"Log:         {os.path.abspath(os.path.join(args.output_dir, 'log.txt'))}\n"
              f"TensorBoard: tensorboard --logdir {os.path.abspath(args.log_dir)}")
    log_writer.close()
    distributed.cleanup()
    return stats


if __name__ == "__main__":
    run_program(main, get_args_parser())
