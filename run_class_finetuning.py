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
import os
import time
from typing import Any

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

import distributed
import metric_logging
import optim_factory
import training
from checkpoint_loading import load_pretrained_encoder, read_checkpoint
from checkpointing import Checkpointer, ResumeInfo
from cli import HelpFormatter, UserError, add_debug_arg, run_program
from datasets import add_data_args, build_dataset, multiple_samples_collate
from distributed import broadcast_module, get_world_size
from engine_for_finetuning import train_one_epoch
from evaluation import evaluate, eval_loader, final_test
from modeling_finetune import CLASSIFIER_MODELS, create_classifier
from finetune_deepspeed import DeepSpeedCheckpointer, init_deepspeed
from preemption import GracefulStop
from resume import trim_log
from utils import count_parameters
from video_mixup import build_mixup


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("AdaMAE fine-tuning and evaluation", add_help=True,
                                formatter_class=HelpFormatter)
    g = training.add_run_args(p, batch_size=64, epochs=30, save_ckpt_freq=100,
                              batch_help="videos per process per step (before --num_sample)")
    g.add_argument("--save_ckpt", default=True, action=argparse.BooleanOptionalAction,
                   help="--no_save_ckpt / --no-save_ckpt to write no checkpoints")
    g.add_argument("--no_save_ckpt", action="store_false", dest="save_ckpt", help=argparse.SUPPRESS)

    g = training.add_model_args(p, model="vit_base_patch16_224", models=CLASSIFIER_MODELS, drop_path=0.1,
                                kwargs_example='{"depth": 4}')
    g.add_argument("--drop", default=0.0, type=float, help="dropout rate")
    g.add_argument("--attn_drop_rate", default=0.0, type=float, help="attention dropout rate")
    g.add_argument("--fc_drop_rate", "--head_drop_rate", default=0.0, type=float, dest="fc_drop_rate",
                   help="dropout before the classifier head")
    g.add_argument("--use_mean_pooling", action="store_true", default=True, help="mean-pool tokens + fc_norm")
    g.add_argument("--use_cls", action="store_false", dest="use_mean_pooling",
                   help="LayerNorm then token 0 (there is no CLS token; VideoMAE's flag)")
    g.add_argument("--use_learnable_pos_emb", action="store_true", help="learnable position table")
    g.add_argument("--init_scale", default=0.001, type=float, help="scales the head's initial weights")

    g = p.add_argument_group("EMA")
    g.add_argument("--model_ema", action="store_true", help="keep an exponential moving average of the weights "
                   "(validated and tested alongside the model)")
    g.add_argument("--model_ema_decay", default=0.9999, type=float, help="EMA decay per optimizer step")
    g.add_argument("--model_ema_force_cpu", action="store_true", help="keep the EMA copy on the CPU")

    # warm-up from 0: VideoMAE / AdaMAE have a --warmup_lr 1e-6 flag but never pass it to their scheduler
    g = optim_factory.add_optimizer_args(p, lr=1e-3, min_lr=1e-6, warmup_lr=0.0, warmup_epochs=5)
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

    g = training.add_output_args(p, "checkpoints", "checkpoints, log.txt, args.json, test_results.json")
    g.add_argument("--no_auto_resume", action="store_false", dest="auto_resume", help=argparse.SUPPRESS)
    g.add_argument("--finetune", default="", help="pre-trained (or fine-tuned) checkpoint to start from")
    g.add_argument("--model_key", default="model|module", help="where the weights are in --finetune")

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
def build_criterion(args: argparse.Namespace, mixup_active: bool) -> torch.nn.Module:
    """Soft-target CE with mixup (smoothing is in the mixed targets), else smoothed CE, else CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_datasets(args: argparse.Namespace) -> dict[str, Any]:
    """The splits this run needs (``--eval`` needs no training list: users evaluating released checkpoints often
    have only val/test lists); sets ``args.nb_classes``."""
    wanted = {"train": not args.eval, "val": args.eval or not args.disable_eval_during_finetuning,
              "test": not args.skip_final_test}
    sets: dict[str, Any] = {}
    for split, needed in wanted.items():
        if needed:
            sets[split], args.nb_classes = build_dataset(is_train=split == "train", test_mode=split == "test",
                                                         args=args)
    if args.nb_classes is None:
        raise UserError("--eval with --skip_final_test needs --nb_classes")
    return sets


def build_model_ema(args: argparse.Namespace, model: torch.nn.Module) -> ModelEmaV3 | None:
    if not args.model_ema:
        return None
    print(f"Model EMA: decay {args.model_ema_decay}")
    ema = ModelEmaV3(model, decay=args.model_ema_decay,
                     device=torch.device("cpu") if args.model_ema_force_cpu else None)
    # The copy is of this rank's weights, made before DDP gives every rank rank 0's: without this, each rank's
    # EMA kept its own freshly initialised head, evaluated on its own shard and lost on a resume.
    broadcast_module(ema.module)
    return ema


def ema_of_evaluated_checkpoint(args: argparse.Namespace, model_ema: ModelEmaV3) -> ModelEmaV3 | None:
    """``--eval --finetune X --model_ema``: the EMA to evaluate is X's own (``model_ema`` in our checkpoints), not a
    copy of X's model weights; a file without one has no EMA result."""
    ckpt = read_checkpoint(args.finetune) if os.path.exists(args.finetune) else None  # a file or DeepSpeed folder
    if isinstance(ckpt, dict) and ckpt.get("model_ema") is not None:
        load_pretrained_encoder(model_ema.module, {"model": ckpt["model_ema"], "args": ckpt.get("args")},
                                model_key="model", require_head=True, verbose=False)
        print(f"Model EMA: the EMA weights of {args.finetune}")
        return model_ema
    print(f"Note: {args.finetune} holds no EMA weights, so there is no EMA result (--model_ema is ignored)")
    return None


def prepare_training(args: argparse.Namespace, model: torch.nn.Module, optim: training.Optimisation,
                     model_ema: ModelEmaV3 | None, device: torch.device) -> tuple[torch.nn.Module, Any, ResumeInfo]:
    """The model to train (DeepSpeed engine, or compiled / DDP-wrapped), its checkpointer, and what was resumed.
    ``--eval --finetune X`` evaluates X as given (no resume)."""
    extra = {"kind": "finetune", "model_name": args.model, "nb_classes": args.nb_classes, "best_acc1": -1.0}
    evaluate_as_given = args.eval and args.finetune and not args.resume
    if args.enable_deepspeed:
        engine = init_deepspeed(args, model, optim.optimizer)
        checkpointer = DeepSpeedCheckpointer(args, engine, model_ema, enabled=args.save_ckpt, **extra)
        return engine, checkpointer, ResumeInfo(start_epoch=args.start_epoch) if evaluate_as_given \
            else checkpointer.resume()
    checkpointer = Checkpointer(args, model, optim.optimizer, optim.loss_scaler, model_ema, enabled=args.save_ckpt,
                                **extra)
    if evaluate_as_given:
        return model, checkpointer, ResumeInfo(start_epoch=args.start_epoch)
    resumed = checkpointer.resume()
    return training.wrap_model(model, args, device, args.compile), checkpointer, resumed


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict[str, Any]:
    device = training.setup_run(args)
    if args.distributed and not args.dist_eval:
        print("Note: without --dist_eval every process validates / tests the whole set (use --dist_eval to "
              "shard it)")
    sets = build_datasets(args)
    data = training.build_train_loader(sets["train"], args, device, multiple_samples_collate) \
        if "train" in sets else None
    loader_val = eval_loader(sets["val"], args, max(1, int(1.5 * args.batch_size))) if "val" in sets else None
    loader_test = eval_loader(sets["test"], args, args.batch_size) if "test" in sets else None
    steps_per_epoch = data.steps_per_epoch if data is not None else 0

    mixup_fn = None if args.eval else build_mixup(args, args.nb_classes)  # mixes training batches only
    if mixup_fn is not None and (args.batch_size * args.num_sample) % 2:  # timm's Mixup asserts it in every mode
        raise UserError(f"mixup/cutmix needs an even number of clips per batch (--batch_size {args.batch_size} x "
                        f"--num_sample {args.num_sample}); or turn them off with --mixup 0 --cutmix 0")
    model = create_classifier(args)
    # --eval of a pre-training checkpoint would report chance accuracy: insist on a classifier head.
    load_report = load_pretrained_encoder(model, args.finetune, model_key=args.model_key, require_head=args.eval) \
        if args.finetune else None
    model.to(device)
    model_without_ddp = model
    n_params = count_parameters(model)
    print(f"Model {args.model}: {n_params / 1e6:.2f}M parameters, {args.nb_classes} classes, "
          f"token grid {model.patch_embed.grid_size}")
    model_ema = build_model_ema(args, model)
    optim = training.build_optimisation(args, model, steps_per_epoch, device, layer_decay=args.layer_decay)
    print(f"{len(sets.get('train', []))} training videos, {steps_per_epoch} optimizer steps per epoch, clips per "
          f"step {args.batch_size * args.accum_iter * get_world_size() * args.num_sample} "
          f"(num_sample {args.num_sample})")
    criterion = build_criterion(args, mixup_fn is not None)
    print(f"criterion = {criterion}; mixup {'on' if mixup_fn is not None else 'off'}")
    model, checkpointer, resumed = prepare_training(args, model, optim, model_ema, device)
    training.record_args(args, ("model", "finetune", "data_path", "nb_classes", "batch_size", "epochs", "lr",
                                "num_frames", "input_size", "output_dir"))
    if model_ema is not None and args.eval and not resumed.resumed:
        model_ema = ema_of_evaluated_checkpoint(args, model_ema)
    evaluated = [("", model_without_ddp)] + ([("_ema", model_ema.module)] if model_ema is not None else [])
    results: dict[str, Any] = {"load_report": str(load_report) if load_report else None}
    if args.eval:
        if load_report is None and not resumed.resumed:
            raise UserError("--eval needs a fine-tuned checkpoint: --finetune PATH (or --resume)")
        for suffix, m in evaluated:
            if loader_val is not None:
                results[f"val{suffix}"] = evaluate(loader_val, m, device, args.precision,
                                                   reduce=args.dist_eval and args.distributed, header=f"Val{suffix}:")
        return finish(args, results, evaluated, loader_test, device, None)

    trim_log(args.output_dir, args.start_epoch)
    log_writer = metric_logging.TensorboardLogger(args.log_dir, purge_step=resumed.global_step)
    best = resumed.extra.get("best_acc1")
    checkpointer.extra["best_acc1"] = -1.0 if best is None else float(best)

    def train_epoch(epoch: int, first_step: int, meters: metric_logging.MetricLogger) -> Any:
        return train_one_epoch(model, criterion, data.loader, optim, device, epoch, args, model_ema=model_ema,
                               mixup_fn=mixup_fn, log_writer=log_writer, deepspeed_engine=args.enable_deepspeed,
                               first_step=first_step, meters=meters, stop=stop)

    def validate(epoch: int, _: dict[str, float]) -> dict[str, Any]:
        if loader_val is None:
            return {}
        return validate_epoch(args, epoch, loader_val, evaluated, device, checkpointer, (epoch + 1) * steps_per_epoch,
                              log_writer)

    print(f"Start training for {args.epochs} epochs from epoch {args.start_epoch}")
    start_time = time.time()
    stop = GracefulStop()
    training.run_epochs(args, data, resumed, checkpointer, train_epoch, stop, log_writer, after_epoch=validate,
                        log_extra={"n_parameters": n_params})
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    best = checkpointer.extra["best_acc1"]
    results["best_val_acc1"] = best if best >= 0 else None
    # Still handled during the final test: a first signal lets the test finish (a second exits at once).
    return finish(args, results, evaluated, loader_test, device, stop, log_writer)


def validate_epoch(args: argparse.Namespace, epoch: int, loader_val: DataLoader,
                   evaluated: list[tuple[str, torch.nn.Module]], device: torch.device, checkpointer: Any,
                   global_step: int, log_writer: metric_logging.TensorboardLogger | None) -> dict[str, Any]:
    """Validate each evaluated model (and its EMA); a better top-1 than ``checkpointer.extra['best_acc1']`` writes
    ``checkpoint-best``. Returns the epoch's val entries for log.txt."""
    record: dict[str, Any] = {}
    for suffix, m in evaluated:
        val = evaluate(loader_val, m, device, args.precision, reduce=args.dist_eval and args.distributed,
                       header=f"Val{suffix}:")
        record.update({f"val{suffix}_{k}": v for k, v in val.items()})
        if log_writer is not None:
            log_writer.update(head="perf", step=epoch, **{f"val{suffix}_acc1": val["acc1"],
                                                          f"val{suffix}_acc5": val["acc5"],
                                                          f"val{suffix}_loss": val["loss"]})
    best = checkpointer.extra["best_acc1"]
    # Rank 0's numbers decide on every rank: without --dist_eval each rank validated on its own, and one flipped
    # prediction would have some ranks enter the collective save below and the others not (a hang).
    num_clips, acc1 = distributed.all_gather_objects((record["val_num_clips"], record["val_acc1"]))[0]
    if not num_clips:  # NaN accuracy: nothing to choose a best checkpoint from
        print(f"Epoch {epoch}: no validation clip could be decoded; checkpoint-best not updated")
    elif acc1 > best:
        best = checkpointer.extra["best_acc1"] = acc1
        checkpointer.save(epoch, global_step, tag="best")
    if best >= 0:
        print(f"Max accuracy: {best:.2f}%")
    record["best_val_acc1"] = best if best >= 0 else None
    return record


def finish(args: argparse.Namespace, results: dict[str, Any], evaluated: list[tuple[str, torch.nn.Module]],
           loader_test: DataLoader | None, device: torch.device, stop: GracefulStop | None = None,
           log_writer: metric_logging.TensorboardLogger | None = None) -> dict[str, Any]:
    """The multi-view test of each evaluated model (``test_results.json``), the final log.txt record, shutdown."""
    if loader_test is not None:
        protocol = (f"{args.num_frames}x{args.test_num_segment}x{args.test_num_crop} (frames x segments x crops), "
                    f"crop {args.input_size} from short side {args.short_side_size}")
        for suffix, m in evaluated:
            results[f"test{suffix}"] = final_test(loader_test, m, device, args.output_dir,
                                                  args.test_num_segment * args.test_num_crop, args.precision,
                                                  args.dist_eval and args.distributed, suffix, protocol)
    if stop is not None:
        stop.restore()
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
    if log_writer is not None:
        log_writer.close()
    distributed.cleanup()
    return results


if __name__ == "__main__":
    run_program(main, get_args_parser())
