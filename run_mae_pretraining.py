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
import json
import os
import time

import timm
import torch
from torch.utils.data import DataLoader

import modeling_pretrain  # noqa: F401  (registers the models)
import utils
import checkpointing
import distributed
from precision import LossScaler
import training
import optim_factory
import metric_logging
from cli import HelpFormatter, add_debug_arg, run_program
from preemption import GracefulStop, exit_preempted
from resume import ResumableSampler, start_epoch_data, trim_log
from datasets import add_data_args, build_pretraining_dataset, get_broken_count, multiple_samples_collate
from engine_for_pretraining import clips_to_device, train_one_epoch
from mask_visualization import log_mask_images
from masking_generator import MASK_TYPES
from video_transforms import normalize_clips


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("AdaMAE pre-training", add_help=True,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--batch_size", default=64, type=int, help="clips per process per step (before --num_sample)")
    g.add_argument("--epochs", default=800, type=int, help="number of training epochs")
    g.add_argument("--accum_iter", "--update_freq", default=1, type=int, dest="accum_iter",
                   help="gradient accumulation: batches per optimizer step")
    g.add_argument("--save_ckpt_freq", default=50, type=int, help="keep checkpoint-{epoch}.pth every N epochs "
                   "(checkpoint-latest.pth is rewritten every epoch)")
    g.add_argument("--print_freq", default=10, type=int, help="print the meters every N iterations")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: bf16 on GPUs that support it, else fp16; fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="pretrain_videomae_base_patch16_224", type=str,
                   help="model name in the timm registry (see README, Models)")
    g.add_argument("--decoder_depth", default=4, type=int, help="decoder blocks (AdaMAE/VideoMAE: 4)")
    g.add_argument("--tubelet_size", default=2, type=int, help="frames per token (tubelet depth)")
    g.add_argument("--drop_path", default=0.0, type=float, help="stochastic depth rate")
    g.add_argument("--use_checkpoint", action="store_true", help="gradient checkpointing in every block")
    g.add_argument("--normalize_target", "--normlize_target", default=True, action=argparse.BooleanOptionalAction,
                   help="per-tubelet normalised pixel targets (paper); --no-normalize_target for raw pixels")
    g.add_argument("--loss_type", default="mse", choices=["mse", "l1"],
                   help="reconstruction error per token (ablation d)")
    g.add_argument("--model_kwargs", default="{}", type=json.loads,
                   help="extra JSON keyword arguments for the model constructor, e.g. '{\"encoder_depth\": 4}'")

    g = p.add_argument_group("masking and sampler")
    g.add_argument("--mask_type", default="adaptive", choices=list(MASK_TYPES) + ["learnable"],
                   help="adaptive = AdaMAE's learned sampler (alias learnable); tube/random/frame for ablations")
    g.add_argument("--mask_ratio", default=0.95, type=float, help="fraction of tokens masked (AdaMAE: 0.95)")
    g.add_argument("--sampling_loss_weight", "--sampler_loss_weight", default=1e-4, type=float,
                   help="weight of the sampling (REINFORCE) loss; 1e-4 as in AdaMAE")
    g.add_argument("--sampler_temperature", "--softmax_temp", default=1.0, type=float,
                   help="divides the sampler's logits (AdaMAE's --softmax_temp was never applied: 1.0 is faithful)")
    g.add_argument("--sampler_type", default="mha", choices=["mha", "mlp"],
                   help="token sampler body: mha (AdaMAE) or mlp (ablation f)")
    g.add_argument("--sampler_depth", default=1, type=int, help="token sampler blocks (ablation f)")
    g.add_argument("--sampler_dim", default=None, type=int, help="sampler width (default: encoder width)")
    g.add_argument("--sampler_heads", default=8, type=int, help="token sampler attention heads")
    g.add_argument("--sampler_detach_input", action="store_true",
                   help="stop the sampling loss from training the shared patch embedding")

    optim_factory.add_optimizer_args(p, lr=1.5e-4, min_lr=1e-5, warmup_lr=0.0, warmup_epochs=40)

    g = p.add_argument_group("output and resume")
    g.add_argument("--output_dir", default="", help="required: checkpoints, log.txt, args.json, TensorBoard")
    g.add_argument("--log_dir", default=None, help="TensorBoard logs (default: OUTPUT_DIR/tensorboard)")
    g.add_argument("--resume", default="", help="checkpoint to resume from")
    g.add_argument("--auto_resume", default=True, action=argparse.BooleanOptionalAction,
                   help="resume from the newest checkpoint in --output_dir")
    g.add_argument("--start_epoch", default=0, type=int, help="first epoch (set by resuming; rarely needed by hand)")
    g.add_argument("--vis_freq", default=20, type=int,
                   help="every N epochs log the Video|Prediction|Error|CAT|Mask grid of fixed clips to TensorBoard "
                        "(0: never)")
    g.add_argument("--vis_num_clips", default=4, type=int, help="clips in the TensorBoard mask grid")

    add_data_args(p, pretrain=True)
    distributed.add_distributed_args(p)
    add_debug_arg(p)
    return p


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    return timm.create_model(
        args.model, mask_type=args.mask_type, mask_ratio=args.mask_ratio, decoder_depth=args.decoder_depth,
        num_frames=args.num_frames, img_size=args.input_size, tubelet_size=args.tubelet_size,
        drop_path_rate=args.drop_path, use_checkpoint=args.use_checkpoint, sampler_type=args.sampler_type,
        sampler_depth=args.sampler_depth, sampler_dim=args.sampler_dim, sampler_heads=args.sampler_heads,
        sampler_temperature=args.sampler_temperature, sampler_detach_input=args.sampler_detach_input,
        **args.model_kwargs)


def main(args: argparse.Namespace) -> dict:
    device = training.setup_run(args)
    print(f"job dir: {os.path.dirname(os.path.abspath(__file__))}")

    dataset = build_pretraining_dataset(args)
    world, rank = distributed.get_world_size(), distributed.get_rank()
    # DistributedSampler also for one process: the order of clips is then the same for any number of processes.
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True,
                        worker_init_fn=utils.seed_worker, persistent_workers=args.num_workers > 0,
                        collate_fn=multiple_samples_collate)
    accum = max(1, args.accum_iter)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} videos give no full step of batch_size {args.batch_size} x accum_iter "
                         f"{accum} x {world} processes; lower --batch_size or add data")
    args.num_training_steps_per_epoch = steps_per_epoch

    model = build_model(args).to(device)
    model_without_ddp = model
    n_params = utils.count_parameters(model)
    print(f"Model {args.model}: {n_params / 1e6:.2f}M parameters, mask {model.mask_type} {args.mask_ratio} "
          f"({model.num_visible} of {model.num_patches} tokens visible)")

    total_batch = args.batch_size * accum * world
    optim_factory.scale_lr(args, total_batch)
    print(f"{len(dataset)} videos, {steps_per_epoch} optimizer steps per epoch, clips per step "
          f"{total_batch * max(1, args.num_sample)} (num_sample {args.num_sample})")

    optimizer = optim_factory.create_optimizer(args, model_without_ddp)
    loss_scaler = LossScaler(args.precision, device.type)
    lr_schedule = optim_factory.cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                         start_warmup_value=args.warmup_lr, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = optim_factory.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    training.record_args(args, ("model", "mask_type", "mask_ratio", "data_path", "batch_size", "epochs", "lr",
                             "num_frames", "input_size", "output_dir"))
    resumed = checkpointing.auto_load_model(args, model_without_ddp, optimizer, loss_scaler)
    trim_log(args.output_dir, args.start_epoch)
    stop = GracefulStop()

    if args.compile:
        model = torch.compile(model)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None, find_unused_parameters=False)
    log_writer = metric_logging.TensorboardLogger(args.log_dir, purge_step=resumed.global_step) \
        if args.log_dir else None
    vis_clips = None
    if log_writer is not None and log_writer.writer is not None and args.vis_freq > 0:
        # Fixed clips (the dataset's augmentation is seeded per index and epoch) so the grid shows the mask evolving.
        dataset.set_epoch(0)
        vis_clips = multiple_samples_collate([dataset[i] for i in range(min(args.vis_num_clips, len(dataset)))])

    print(f"Start training for {args.epochs} epochs from epoch {args.start_epoch}")
    start_time = time.time()
    stats: dict = {}
    ckpt_extra = {"kind": "pretrain", "model_name": args.model, "mask_type": model_without_ddp.mask_type,
                  "mask_ratio": args.mask_ratio}
    for epoch in range(args.start_epoch, args.epochs):
        first_step, meters = start_epoch_data(epoch, resumed, args, sampler, dataset)
        stats, done = train_one_epoch(model, loader, optimizer, device, epoch, loss_scaler, args,
                                      start_step=epoch * steps_per_epoch, lr_schedule=lr_schedule,
                                      wd_schedule=wd_schedule, log_writer=log_writer,
                                      broken_count=lambda: get_broken_count(dataset), steps_per_epoch=steps_per_epoch,
                                      first_step=first_step, metric_logger=meters, stop=stop)
        if stats is None:  # stopped by a signal inside the epoch
            written = checkpointing.save_checkpoint(args, epoch, model_without_ddp, optimizer, loss_scaler,
                                            global_step=epoch * steps_per_epoch + done, extra=ckpt_extra,
                                            step_in_epoch=done, rank_state={"meters": meters.state_dict()})
            if log_writer is not None:
                log_writer.close()
            exit_preempted(stop, f"in epoch {epoch} after step {done} of {steps_per_epoch}",
                           written[0] if written else None)
        written = checkpointing.save_checkpoint(args, epoch, model_without_ddp, optimizer, loss_scaler,
                                        global_step=(epoch + 1) * steps_per_epoch, extra=ckpt_extra)
        metric_logging.write_log_line(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                                               "n_parameters": n_params})
        if vis_clips is not None and ((epoch + 1) % args.vis_freq == 0 or epoch + 1 == args.epochs):
            first_clips = clips_to_device(vis_clips, device)[::max(1, args.num_sample)]  # one clip per video
            log_mask_images(log_writer, model_without_ddp, normalize_clips(first_clips),
                            step=(epoch + 1) * steps_per_epoch, normalize_target=args.normalize_target)
        if log_writer is not None:
            log_writer.flush()
        if epoch + 1 < args.epochs and stop.sync():
            if log_writer is not None:
                log_writer.close()
            exit_preempted(stop, f"at the end of epoch {epoch}", written[-1] if written else None)
    stop.restore()
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total}")
    if distributed.is_main_process():
        print(f"Checkpoints: {os.path.abspath(args.output_dir)}/checkpoint-*.pth\n"
              f"Log:         {os.path.abspath(os.path.join(args.output_dir, 'log.txt'))}\n"
              f"TensorBoard: tensorboard --logdir {os.path.abspath(args.log_dir)}")
    if log_writer is not None:
        log_writer.close()
    distributed.cleanup()
    return stats


if __name__ == "__main__":
    run_program(main, get_args_parser())
