"""Linear and attentive probes on a frozen encoder, with the fine-tuning program's honest evaluation.

Cached features (linear probe; extract each split first with tools/extract_features.py into FEATS/train, FEATS/val,
FEATS/test):
    python run_linear_probe.py --probe linear --features FEATS --output_dir out_probe
On the fly (the attentive probe needs the tokens; the linear probe works this way too):
    python run_linear_probe.py --probe attentive --checkpoint pt.pth --data_path DIR --output_dir out_probe

Only the probe trains (``--checkpoint`` is loaded frozen: ours, a DeepSpeed folder or a Hugging Face VideoMAE folder;
frames, stride and crop come from its saved args). Per-probe defaults (``--probe`` sets them; any flag overrides):
linear = MAE's recipe (LARS, base lr 0.1, no weight decay, 90 epochs, 10 warm-up, batch 256); attentive = V-JEPA's
(AdamW, base lr 1e-3, weight decay 0.01, 20 epochs, no warm-up, batch 64); the lr is scaled by total batch / 256.
After training, the test split is scored as in fine-tuning: ``test_results.json`` with top-1/top-5 over the videos
evaluated and the undecodable ones named in ``unevaluated``. Checkpoints hold the probe only; runs resume.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any

import torch

import distributed
import metric_logging
import optim_factory
import training
from checkpointing import Checkpointer
from cli import HelpFormatter, UserError, add_debug_arg, run_program
from datasets import add_data_args, build_dataset, check_labels
from engine_for_finetuning import train_one_epoch
from engine_for_probing import PROBES, FeatureDataset, ProbedEncoder, build_probe, load_frozen_encoder, probe_summary
from evaluation import eval_loader, evaluate, final_test
from preemption import GracefulStop
from resume import trim_log
from utils import count_parameters


# MAE linear probe (He et al. 2022, Table 10 / A.2): LARS, base lr 0.1, wd 0, batch 16384, 90 epochs, 10 warm-up.
# V-JEPA attentive probe (Bardes et al. 2024; configs/evals/vitl16_k400_16x8x3.yaml): AdamW, lr 1e-3 at a total
# batch of 256 (64 x 4), wd 0.01, 20 epochs, no warm-up, decaying to 0.
PROBE_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": dict(opt="lars", lr=0.1, weight_decay=0.0, epochs=90, warmup_epochs=10, batch_size=256),
    "attentive": dict(opt="adamw", lr=1e-3, weight_decay=0.01, epochs=20, warmup_epochs=0, batch_size=64),
}


def get_args_parser() -> argparse.ArgumentParser:
    per_probe = "; ".join(f"{k}: " + ", ".join(f"--{n} {v}" for n, v in d.items()) for k, d in PROBE_DEFAULTS.items())
    p = argparse.ArgumentParser("Frozen-encoder probes", formatter_class=HelpFormatter,
                                epilog=f"Defaults per --probe (the flags shown with default None): {per_probe}. "
                                       f"Clip flags shown with None default to the checkpoint's saved args.")
    g = p.add_argument_group("probe")
    g.add_argument("--probe", default="linear", choices=PROBES,
                   help="linear: BatchNorm (no affine) + Linear on mean-pooled features; attentive: one learned "
                        "query cross-attending over the tokens + MLP + Linear. Sets the defaults marked 'per probe'")
    g.add_argument("--checkpoint", default="", help="the frozen encoder (needed without --features)")
    g.add_argument("--features", default="", help="folder with train/ val/ test/ feature folders from "
                   "tools/extract_features.py (linear probe only; val/ and test/ optional)")
    g.add_argument("--probe_heads", default=None, type=int, help="attentive probe heads (default: the encoder's)")
    g.add_argument("--model_key", default="model|module", help="where the weights are in --checkpoint")
    g.add_argument("--random_init", action="store_true",
                   help="baseline: --checkpoint's architecture with random initial weights (seed --seed)")

    g = training.add_run_args(p, batch_size=None, epochs=None, save_ckpt_freq=10,
                              batch_help="videos per process per step (per probe)")
    g.add_argument("--dist_eval", action="store_true", help="shard validation and test over all processes")
    g.add_argument("--skip_final_test", action="store_true", help="no test after training")
    training.add_output_args(p, "output and resume", "probe checkpoints, log.txt, args.json, test_results.json")

    optim_factory.add_optimizer_args(p, lr=0.0, min_lr=0.0, warmup_lr=0.0, warmup_epochs=0)
    p.set_defaults(opt=None, lr=None, weight_decay=None, warmup_epochs=None)  # per probe, see PROBE_DEFAULTS
    add_data_args(p, pretrain=False)
    # probes see plain crops (no RandAugment, erasing or mixup) and one clip per decode; the clip shape is the
    # checkpoint's unless given
    p.set_defaults(aa="none", reprob=0.0, num_sample=1, num_frames=None, sampling_rate=None, input_size=None,
                   short_side_size=None, sparse_sample=None, test_num_segment=5, test_num_crop=3)
    distributed.add_distributed_args(p)
    add_debug_arg(p)
    return p


def apply_probe_defaults(args: argparse.Namespace) -> None:
    for k, v in PROBE_DEFAULTS[args.probe].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def check_same_features(folders: dict[str, str], stores: dict[str, Any]) -> None:
    """Refuse splits whose features differ in anything but what is per split (list, views, ...): a probe trained
    on one encoder's features and scored on another's (or other clips, precision, decoder) measures nothing, and
    differing widths would only fail deep inside the forward pass."""
    from tools.extract_features import PER_SPLIT_SETTINGS, changed_settings
    ref = stores["train"].meta.get("settings", {})
    for split, store in stores.items():
        if store is None or split == "train":
            continue
        other = store.meta.get("settings", {})
        diff = changed_settings(ref, other, PER_SPLIT_SETTINGS)
        if diff:
            shown = [f"{k} {ref.get(k)!r} vs {other.get(k)!r}" if not isinstance(ref.get(k, other.get(k)), dict)
                     else k for k in diff]
            raise UserError(f"--features: {folders['train']} and {folders[split]} were extracted with different "
                            f"settings ({'; '.join(shown)}); extract every split from the same checkpoint with the "
                            f"same clip flags")


def build_data(args: argparse.Namespace) -> tuple[Any, Any, Any, int | None, str]:
    """``(train, val, test datasets (None when absent), feature width or None, test protocol)``; sets
    ``args.nb_classes``. Cached features when ``--features``, else clips of ``--data_path``."""
    if args.features:
        from tools.extract_features import load_features
        splits = {s: os.path.join(args.features, s) for s in ("train", "val", "test")}
        if not os.path.isdir(splits["train"]):
            raise UserError(f"--features {args.features} has no train/ folder (tools/extract_features.py --out)")
        stores = {s: load_features(d) if os.path.isdir(d) else None for s, d in splits.items()}
        train = stores["train"]
        check_same_features(splits, stores)
        if len(train.labels) and int(train.labels.min()) < 0:
            raise UserError(f"{splits['train']}: the training list has unlabelled videos (label -1)")
        args.nb_classes = args.nb_classes or int(train.labels.max()) + 1
        for split, store in stores.items():  # every split: a val/test class the probe has no output for
            if store is not None:
                listed = store.meta.get("settings", {}).get("list") or splits[split]
                check_labels(f"{split} split: {listed}", zip(store.lines, (int(x) for x in store.labels),
                                                              store.paths), args.nb_classes)
        views = (stores["test"] or train).meta["settings"]["views"]
        return (FeatureDataset(train, "train"),
                FeatureDataset(stores["val"], "validation") if stores["val"] else None,
                FeatureDataset(stores["test"], "test") if stores["test"] and not args.skip_final_test else None,
                int(train.features.shape[1]), f"cached features ({train.meta['settings']['pooling']}), "
                                              f"views {views} averaged at extraction")
    dataset_train, args.nb_classes = build_dataset(is_train=True, test_mode=False, args=args)
    dataset_val = build_dataset(is_train=False, test_mode=False, args=args)[0]
    dataset_test = None if args.skip_final_test else build_dataset(is_train=False, test_mode=True, args=args)[0]
    protocol = (f"{args.num_frames}x{args.test_num_segment}x{args.test_num_crop} (frames x segments x crops), "
                f"crop {args.input_size} from short side {args.short_side_size}")
    return dataset_train, dataset_val, dataset_test, None, protocol


def main(args: argparse.Namespace) -> dict[str, Any]:
    apply_probe_defaults(args)
    if args.features and args.probe == "attentive":
        raise UserError("--probe attentive needs the tokens: drop --features and give --checkpoint and --data_path")
    if not args.features and not args.checkpoint:
        raise UserError("give --checkpoint (with --data_path) or --features")
    if args.features and (args.checkpoint or args.data_path):  # the features fix both; one would be ignored
        raise UserError("--features come from one encoder and list: give --features alone, or --checkpoint with "
                        "--data_path")
    device = training.setup_run(args)

    encoder = None
    if not args.features:
        from tools.extract_features import clip_settings
        encoder = load_frozen_encoder(args.checkpoint, args.model_key, args.random_init, args.seed)
        clip = clip_settings(args, encoder)
        args.num_frames, args.sampling_rate, args.input_size = (clip[k] for k in ("num_frames", "sampling_rate",
                                                                                  "input_size"))
        args.short_side_size, args.num_segments = clip["short_side_size"], clip["num_segments"]
        args.sparse_sample = clip["sampling"] == "segment"
    dataset_train, dataset_val, dataset_test, dim, protocol = build_data(args)

    probe = build_probe(args.probe, dim or encoder.dim, args.nb_classes,
                        args.probe_heads or (encoder.num_heads if encoder else 1))
    model = ProbedEncoder(encoder, probe) if encoder is not None else probe
    model.to(device)
    print(probe_summary(encoder, probe) if encoder is not None else
          f"{type(probe).__name__} ({count_parameters(probe):,} parameters) on cached {dim}-dim features "
          f"from {args.features}")

    data = training.build_train_loader(dataset_train, args, device)
    loader_val = eval_loader(dataset_val, args, args.batch_size) if dataset_val is not None else None
    loader_test = eval_loader(dataset_test, args, args.batch_size) if dataset_test is not None else None
    optim = training.build_optimisation(args, probe, data.steps_per_epoch, device, layer_decay=1.0)
    criterion = torch.nn.CrossEntropyLoss()
    checkpointer = Checkpointer(args, probe, optim.optimizer, optim.loss_scaler, kind="probe", probe=args.probe,
                                nb_classes=args.nb_classes)
    resumed = checkpointer.resume()
    training.record_args(args, ("probe", "checkpoint", "features", "data_path", "nb_classes", "batch_size", "epochs",
                                "opt", "lr", "weight_decay", "output_dir"))
    best = resumed.extra.get("best_acc1")
    checkpointer.extra["best_acc1"] = -1.0 if best is None else float(best)  # a best of 0.0 % stays 0.0
    train_model = training.wrap_model(model, args, device)
    trim_log(args.output_dir, args.start_epoch)
    log_writer = metric_logging.TensorboardLogger(args.log_dir, purge_step=resumed.global_step)
    shard_eval = args.dist_eval and args.distributed
    results: dict[str, Any] = {}

    def train_epoch(epoch: int, first_step: int, meters: metric_logging.MetricLogger) -> Any:
        return train_one_epoch(train_model, criterion, data.loader, optim, device, epoch, args, log_writer=log_writer,
                               first_step=first_step, meters=meters, stop=stop)

    def validate(epoch: int, _: dict[str, float]) -> dict[str, Any]:
        # DDP gives every rank rank 0's BatchNorm statistics before each forward, so after the epoch's last one
        # they differ: every rank (each scoring its shard) and the checkpoint must use the same, rank 0's.
        distributed.broadcast_module(model, buffers_only=True)
        if loader_val is None:
            return {}
        results["val"] = evaluate(loader_val, model, device, args.precision, reduce=shard_eval)
        log_writer.update(head="perf", step=epoch, **{f"val_{k}": results["val"][k] for k in ("acc1", "acc5", "loss")})
        best = checkpointer.extra["best_acc1"]
        if results["val"]["num_clips"] and results["val"]["acc1"] > best:
            best = checkpointer.extra["best_acc1"] = results["val"]["acc1"]
        return {**{f"val_{k}": v for k, v in results["val"].items()}, "best_val_acc1": best if best >= 0 else None}

    start_time = time.time()
    stop = GracefulStop()
    training.run_epochs(args, data, resumed, checkpointer, train_epoch, stop, log_writer, after_epoch=validate)
    stop.restore()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    distributed.broadcast_module(model, buffers_only=True)  # a resumed run that trained nothing: still rank 0's
    if loader_val is not None and "val" not in results:  # nothing left to train: evaluate the resumed probe
        results["val"] = evaluate(loader_val, model, device, args.precision, reduce=shard_eval)
    if loader_test is not None:
        views = 1 if args.features else args.test_num_segment * args.test_num_crop
        results["test"] = final_test(loader_test, model, device, args.output_dir, views, args.precision,
                                     shard_eval, protocol=f"{args.probe} probe, {protocol}")
    final = {k: results["test"][k] for k in ("top1", "top5", "num_videos", "unevaluated")} \
        if results.get("test") else {}
    if results.get("val"):
        final.update({f"val_{k}": results["val"][k] for k in ("acc1", "acc5", "num_clips", "unevaluated")})
    if final:
        metric_logging.write_log_line(args.output_dir, final)
    log_writer.close()
    distributed.cleanup()
    return results


if __name__ == "__main__":
    run_program(main, get_args_parser())
