"""Supervised fine-tuning and multi-view evaluation of the video ViT (VideoMAE-compatible flags).

One process:   python run_class_finetuning.py --data_path DIR --finetune pretrain.pth --output_dir out [...]
One node:      torchrun --nproc_per_node 8 run_class_finetuning.py [...]
SLURM:         srun python run_class_finetuning.py [...]   (rank / world / master read from SLURM_*)
Evaluate:      python run_class_finetuning.py --eval --finetune finetuned.pth --data_path DIR [...]

``--data_path`` is a folder with ``train.csv`` / ``val.csv`` / ``test.csv`` (``--train_list`` / ``--val_list`` /
``--test_list`` name a split's list instead; a single file as ``--data_path`` is refused). ``--lr`` is the base
learning rate for a total batch of 256 (``batch_size x update_freq x processes``; ``--num_sample`` repeats are not
counted, as in VideoMAE). After training (or with ``--eval``) the ``test_num_segment x test_num_crop`` multi-view
test writes ``test_results.json`` with top-1/top-5 and per-video predictions. Videos that cannot be decoded are
never scored: validation and test name them (``unevaluated``) and their numbers cover only the videos evaluated.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from typing import Any

import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader

import modeling_finetune  # noqa: F401  (registers the models)
import utils
import checkpointing
import distributed
from precision import LossScaler
import training
import optim_factory
import metric_logging
from checkpoint_loading import load_pretrained_encoder
from cli import HelpFormatter, add_debug_arg, run_program
from datasets import add_data_args, build_dataset, get_broken_count, multiple_samples_collate
from engine_for_finetuning import ShardSampler, evaluate, final_test, train_one_epoch
from finetune_deepspeed import deepspeed_resume, deepspeed_save, init_deepspeed
from preemption import GracefulStop, exit_preempted
from resume import ResumableSampler, start_epoch_data, trim_log
from video_mixup import build_mixup


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("AdaMAE fine-tuning and evaluation", add_help=True,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--batch_size", default=64, type=int, help="videos per process per step (before --num_sample)")
    g.add_argument("--epochs", default=30, type=int, help="number of training epochs")
    g.add_argument("--update_freq", "--accum_iter", default=1, type=int, dest="accum_iter",
                   help="gradient accumulation: batches per optimizer step")
    g.add_argument("--save_ckpt_freq", default=100, type=int, help="keep checkpoint-{epoch}.pth every N epochs "
                   "(checkpoint-latest.pth is rewritten every epoch)")
    g.add_argument("--save_ckpt", default=True, action=argparse.BooleanOptionalAction,
                   help="--no_save_ckpt / --no-save_ckpt to write no checkpoints")
    g.add_argument("--no_save_ckpt", action="store_false", dest="save_ckpt", help=argparse.SUPPRESS)
    g.add_argument("--print_freq", default=10, type=int, help="print the meters every N iterations")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: bf16 on GPUs that support it, else fp16; fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224", type=str,
                   help="model name in the timm registry (see README, Models)")
    g.add_argument("--tubelet_size", default=2, type=int, help="frames per token (tubelet depth)")
    g.add_argument("--drop", default=0.0, type=float, help="dropout rate")
    g.add_argument("--attn_drop_rate", default=0.0, type=float, help="attention dropout rate")
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate")
    g.add_argument("--fc_drop_rate", "--head_drop_rate", default=0.0, type=float, dest="fc_drop_rate",
                   help="dropout before the classifier head")
    g.add_argument("--use_checkpoint", "--with_checkpoint", action="store_true", dest="use_checkpoint",
                   help="gradient checkpointing in every block")
    g.add_argument("--use_mean_pooling", action="store_true", default=True, help="mean-pool tokens + fc_norm")
    g.add_argument("--use_cls", action="store_false", dest="use_mean_pooling",
                   help="LayerNorm then token 0 (there is no CLS token; VideoMAE's flag)")
    g.add_argument("--use_learnable_pos_emb", action="store_true", help="learnable position table")
    g.add_argument("--init_scale", default=0.001, type=float, help="scales the head's initial weights")
    g.add_argument("--model_kwargs", default="{}", type=json.loads,
                   help="extra JSON keyword arguments for the model constructor, e.g. '{\"depth\": 4}'")

    g = p.add_argument_group("EMA")
    g.add_argument("--model_ema", action="store_true", help="keep an exponential moving average of the weights "
                   "(validated and tested alongside the model)")
    g.add_argument("--model_ema_decay", default=0.9999, type=float, help="EMA decay per optimizer step")
    g.add_argument("--model_ema_force_cpu", action="store_true", help="keep the EMA copy on the CPU")

    g = optim_factory.add_optimizer_args(p, lr=1e-3, min_lr=1e-6, warmup_lr=1e-6, warmup_epochs=5)
    g.add_argument("--layer_decay", default=0.75, type=float, help="layer-wise lr decay (1.0 = off)")

    g = p.add_argument_group("regularisation")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--mixup", default=0.8, type=float, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", default=1.0, type=float, help="cutmix alpha (0 = off)")
    g.add_argument("--cutmix_minmax", default=None, type=float, nargs=2,
                   help="cutmix box size range as fractions (overrides --cutmix alpha)")
    g.add_argument("--mixup_prob", default=1.0, type=float, help="probability of applying mixup or cutmix to a batch")
    g.add_argument("--mixup_switch_prob", default=0.5, type=float,
                   help="probability of cutmix instead of mixup when both are on")
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"],
                   help="mix per batch, per pair or per element")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--finetune", default="", help="pre-trained (or fine-tuned) checkpoint to start from")
    g.add_argument("--model_key", default="model|module", help="where the weights are in --finetune")
    g.add_argument("--output_dir", default="", help="required: checkpoints, log.txt, args.json, test_results.json")
    g.add_argument("--log_dir", default=None, help="TensorBoard logs (default: OUTPUT_DIR/tensorboard)")
    g.add_argument("--resume", default="", help="training checkpoint to resume from")
    g.add_argument("--auto_resume", default=True, action=argparse.BooleanOptionalAction,
                   help="resume from the newest checkpoint in --output_dir")
    g.add_argument("--no_auto_resume", action="store_false", dest="auto_resume", help=argparse.SUPPRESS)
    g.add_argument("--start_epoch", default=0, type=int, help="first epoch (set by resuming; rarely needed by hand)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only run validation + the multi-view test")
    g.add_argument("--dist_eval", action="store_true", help="shard validation and test over all processes")
    g.add_argument("--disable_eval_during_finetuning", action="store_true", help="no validation after each epoch")
    g.add_argument("--skip_final_test", action="store_true", help="no multi-view test after training")

    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--enable_deepspeed", action="store_true", help="train with a DeepSpeed engine")
    g.add_argument("--zero_stage", default=0, type=int, choices=[0, 1, 2], help="DeepSpeed ZeRO stage")
    g.add_argument("--deepspeed_config", default=None, help="use this DeepSpeed JSON instead of the generated one")

    add_data_args(p, pretrain=False)
    distributed.add_distributed_args(p)
    add_debug_arg(p)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> torch.nn.Module:
    return timm.create_model(
        args.model, num_classes=args.nb_classes, num_frames=args.num_frames * max(1, args.num_segments),
        img_size=args.input_size, tubelet_size=args.tubelet_size, drop_rate=args.drop,
        attn_drop_rate=args.attn_drop_rate, drop_path_rate=args.drop_path, fc_drop_rate=args.fc_drop_rate,
        use_mean_pooling=args.use_mean_pooling, use_checkpoint=args.use_checkpoint, init_scale=args.init_scale,
        use_learnable_pos_emb=args.use_learnable_pos_emb, **args.model_kwargs)


def build_criterion(args: argparse.Namespace, mixup_active: bool) -> torch.nn.Module:
    """Soft-target CE with mixup (smoothing is in the mixed targets), else smoothed CE, else CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def _eval_loader(dataset: Any, args: argparse.Namespace, batch_size: int, shard: bool) -> DataLoader:
    """In-order loader without drop_last; ``shard``: this rank's contiguous part only."""
    sampler = ShardSampler(len(dataset)) if shard else ShardSampler(len(dataset), 0, 1)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and args.device.startswith("cuda"), drop_last=False,
                      worker_init_fn=utils.seed_worker, persistent_workers=False)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict[str, Any]:
    device = training.setup_run(args)
    world, rank = distributed.get_world_size(), distributed.get_rank()
    shard_eval = args.dist_eval and args.distributed
    if args.distributed and not args.dist_eval:
        print("Note: without --dist_eval every process validates / tests the whole set (use --dist_eval to "
              "shard it)")

    # --eval needs no training list (users evaluating released checkpoints often have only val/test lists).
    dataset_train = dataset_val = dataset_test = None
    if not args.eval:
        dataset_train, args.nb_classes = build_dataset(is_train=True, test_mode=False, args=args)
    if args.eval or not args.disable_eval_during_finetuning:
        dataset_val, args.nb_classes = build_dataset(is_train=False, test_mode=False, args=args)
    if not args.skip_final_test:
        dataset_test, args.nb_classes = build_dataset(is_train=False, test_mode=True, args=args)
    if args.nb_classes is None:
        raise ValueError("--eval with --skip_final_test needs --nb_classes")

    loader_train = sampler_train = None
    if dataset_train is not None:
        sampler_train = ResumableSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                  num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda",
                                  drop_last=True, worker_init_fn=utils.seed_worker,
                                  persistent_workers=args.num_workers > 0, collate_fn=multiple_samples_collate)
    eval_bs = max(1, int(1.5 * args.batch_size))
    loader_val = _eval_loader(dataset_val, args, eval_bs, shard_eval) if dataset_val is not None else None
    loader_test = _eval_loader(dataset_test, args, args.batch_size, shard_eval) if dataset_test is not None \
        else None

    accum = max(1, args.accum_iter)
    steps_per_epoch = len(loader_train) // accum if loader_train is not None else 0
    if steps_per_epoch == 0 and not args.eval:
        raise ValueError(f"{len(dataset_train or [])} videos give no full step of batch_size {args.batch_size} x "
                         f"update_freq {accum} x {world} processes; lower --batch_size or add data")
    args.num_training_steps_per_epoch = steps_per_epoch

    mixup_fn = build_mixup(args, args.nb_classes)
    if mixup_fn is not None and (args.batch_size * max(1, args.num_sample)) % 2 and args.mixup_mode == "batch":
        raise ValueError("mixup/cutmix in batch mode needs an even number of clips per batch")
    model = build_model(args)
    load_report = None
    if args.finetune:
        # --eval of a pre-training checkpoint would report chance accuracy: insist on a classifier head.
        load_report = load_pretrained_encoder(model, args.finetune, model_key=args.model_key,
                                              require_head=args.eval)
    model.to(device)
    model_without_ddp = model
    n_params = utils.count_parameters(model)
    print(f"Model {args.model}: {n_params / 1e6:.2f}M parameters, {args.nb_classes} classes, "
          f"token grid {model.patch_embed.grid_size}")

    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
        print(f"Model EMA: decay {args.model_ema_decay}")

    total_batch = args.batch_size * accum * world
    optim_factory.scale_lr(args, total_batch)
    print(f"{len(dataset_train or [])} training videos, {steps_per_epoch} optimizer steps per epoch, clips per step "
          f"{total_batch * max(1, args.num_sample)} (num_sample {args.num_sample})")

    optimizer = optim_factory.create_optimizer(args, model_without_ddp)
    loss_scaler = LossScaler(args.precision, device.type)
    lr_schedule = optim_factory.cosine_scheduler(args.lr, args.min_lr, args.epochs, max(steps_per_epoch, 1),
                                         args.warmup_epochs, start_warmup_value=args.warmup_lr,
                                         warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = optim_factory.cosine_scheduler(args.weight_decay, wd_end, args.epochs, max(steps_per_epoch, 1))
    criterion = build_criterion(args, mixup_fn is not None)
    print(f"criterion = {criterion}; mixup {'on' if mixup_fn is not None else 'off'}")

    training.record_args(args, ("model", "finetune", "data_path", "nb_classes", "batch_size", "epochs", "lr",
                             "num_frames", "input_size", "output_dir"))
    engine = None
    resumed = checkpointing.ResumeInfo(start_epoch=args.start_epoch)
    if args.enable_deepspeed:
        engine = init_deepspeed(args, model, optimizer)
        model = engine
        resumed = deepspeed_resume(args, engine, model_ema)
    elif not (args.eval and args.finetune and not args.resume):  # --eval --finetune X evaluates X as given
        resumed = checkpointing.auto_load_model(args, model_without_ddp, optimizer, loss_scaler, model_ema=model_ema)
        if args.compile:
            model = torch.compile(model)
        if args.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[args.gpu] if device.type == "cuda" else None, find_unused_parameters=False)
    if not args.eval:
        trim_log(args.output_dir, args.start_epoch)
    log_writer = metric_logging.TensorboardLogger(args.log_dir, purge_step=resumed.global_step) \
        if args.log_dir and not args.eval else None
    protocol = (f"{args.num_frames}x{args.test_num_segment}x{args.test_num_crop} (frames x segments x crops), "
                f"crop {args.input_size} from short side {args.short_side_size}")

    def eval_models() -> list[tuple[str, torch.nn.Module]]:
        out = [("", model_without_ddp)]
        if model_ema is not None:
            out.append(("_ema", model_ema.module))
        return out

    results: dict[str, Any] = {"load_report": str(load_report) if load_report else None}
    if args.eval:
        if load_report is None and args.start_epoch == 0 and engine is None:
            raise SystemExit("--eval needs a fine-tuned checkpoint: --finetune PATH (or --resume)")
        for suffix, m in eval_models():
            if loader_val is not None:
                results[f"val{suffix}"] = evaluate(loader_val, m, device, args.precision, reduce=shard_eval,
                                                   header=f"Val{suffix}:")
            if loader_test is not None and args.output_dir:
                results[f"test{suffix}"] = final_test(loader_test, m, device, args.output_dir,
                                                      args.test_num_segment * args.test_num_crop, args.precision,
                                                      shard_eval, suffix, protocol)
        _log_final(args, results)
        distributed.cleanup()
        return results

    print(f"Start training for {args.epochs} epochs from epoch {args.start_epoch}")
    start_time = time.time()
    best_acc1 = float(resumed.extra.get("best_acc1", -1.0) or -1.0)
    stop = GracefulStop()
    for epoch in range(args.start_epoch, args.epochs):
        first_step, meters = start_epoch_data(epoch, resumed, args, sampler_train, dataset_train)
        train_stats, done = train_one_epoch(
            model, criterion, loader_train, optimizer, device, epoch, loss_scaler, args,
            start_step=epoch * steps_per_epoch, lr_schedule=lr_schedule, wd_schedule=wd_schedule, model_ema=model_ema,
            mixup_fn=mixup_fn, log_writer=log_writer, deepspeed_engine=engine is not None,
            steps_per_epoch=steps_per_epoch, first_step=first_step, metric_logger=meters, stop=stop)
        extra = {"kind": "finetune", "model_name": args.model, "nb_classes": args.nb_classes, "best_acc1": best_acc1}
        if train_stats is None:  # stopped by a signal inside the epoch: always saved, even with --no_save_ckpt
            step_state = {"step_in_epoch": done, "rank_state": {"meters": meters.state_dict()}}
            global_step = epoch * steps_per_epoch + done
            if engine is not None:
                written = [deepspeed_save(args, engine, epoch, global_step, model_ema, best_acc1=best_acc1,
                                          **step_state)]
            else:
                written = checkpointing.save_checkpoint(args, epoch, model_without_ddp, optimizer, loss_scaler, global_step,
                                                extra=extra, model_ema=model_ema, **step_state)
            if log_writer is not None:
                log_writer.close()
            exit_preempted(stop, f"in epoch {epoch} after step {done} of {steps_per_epoch}",
                           written[0] if written else None)
        global_step = (epoch + 1) * steps_per_epoch
        written = []
        if args.output_dir and args.save_ckpt:
            if engine is not None:
                if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
                    written = [deepspeed_save(args, engine, epoch, global_step, model_ema, best_acc1=best_acc1)]
            else:
                written = checkpointing.save_checkpoint(args, epoch, model_without_ddp, optimizer, loss_scaler, global_step,
                                                extra=extra, model_ema=model_ema)
        log_stats: dict[str, Any] = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                                     "n_parameters": n_params, "broken_videos": get_broken_count(dataset_train)}
        if loader_val is not None:
            for suffix, m in eval_models():
                val = evaluate(loader_val, m, device, args.precision, reduce=shard_eval, header=f"Val{suffix}:")
                log_stats.update({f"val{suffix}_{k}": v for k, v in val.items()})
                if log_writer is not None:
                    log_writer.update(head="perf", step=epoch, **{f"val{suffix}_acc1": val["acc1"],
                                                                  f"val{suffix}_acc5": val["acc5"],
                                                                  f"val{suffix}_loss": val["loss"]})
            if not log_stats["val_num_clips"]:  # NaN accuracy: nothing to choose a best checkpoint from
                print(f"Epoch {epoch}: no validation clip could be decoded; checkpoint-best not updated")
            elif log_stats["val_acc1"] > best_acc1:
                best_acc1 = log_stats["val_acc1"]
                if args.output_dir and args.save_ckpt:
                    if engine is not None:
                        deepspeed_save(args, engine, epoch, global_step, model_ema, tag="best", best_acc1=best_acc1)
                    else:
                        checkpointing.save_checkpoint(args, epoch, model_without_ddp, optimizer, loss_scaler, global_step,
                                              extra={**extra, "best_acc1": best_acc1}, model_ema=model_ema,
                                              tag="best")
            if best_acc1 >= 0:
                print(f"Max accuracy: {best_acc1:.2f}%")
            log_stats["best_val_acc1"] = best_acc1 if best_acc1 >= 0 else None
        metric_logging.write_log_line(args.output_dir, log_stats)
        if log_writer is not None:
            log_writer.flush()
        if epoch + 1 < args.epochs and stop.sync():
            if log_writer is not None:
                log_writer.close()
            exit_preempted(stop, f"at the end of epoch {epoch}", written[-1] if written else None)
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total}")
    results["best_val_acc1"] = best_acc1 if best_acc1 >= 0 else None

    if loader_test is not None and args.output_dir:
        for suffix, m in eval_models():
            results[f"test{suffix}"] = final_test(loader_test, m, device, args.output_dir,
                                                  args.test_num_segment * args.test_num_crop, args.precision,
                                                  shard_eval, suffix, protocol)
    # Still handled during the final test: a first signal lets the test finish (a second exits at once).
    stop.restore()
    _log_final(args, results)
    if log_writer is not None:
        log_writer.close()
    distributed.cleanup()
    return results


def _log_final(args: argparse.Namespace, results: dict[str, Any]) -> None:
    line: dict[str, Any] = {}
    for key in ("test", "test_ema"):
        r = results.get(key)
        if r:
            name = "Final" if key == "test" else "Final EMA"
            line.update({f"{name} top-1": r["top1"], f"{name} top-5": r["top5"],
                         f"{name} single-view top-1": r["single_view_top1"], f"{name} videos": r["num_videos"],
                         f"{name} unevaluated": r["unevaluated"]})
    for key in ("val", "val_ema"):
        if results.get(key):
            line.update({f"{key}_{k}": results[key][k] for k in ("acc1", "acc5", "num_clips", "unevaluated")})
    if line:
        metric_logging.write_log_line(args.output_dir, line)


if __name__ == "__main__":
    run_program(main, get_args_parser())
