"""Fine-tuning program: video mixup, the multi-view merge, pre-train -> fine-tune -> test end to end, --eval,
resume, and the launchers' recipe."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import Mixup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_class_finetuning  # noqa: E402
from conftest import run_launcher, run_main  # noqa: E402
import run_mae_pretraining  # noqa: E402
from evaluation import ShardSampler, merge_view_files, merge_views, view_file  # noqa: E402
from video_mixup import VideoMixup  # noqa: E402

TINY_VIT = json.dumps(dict(embed_dim=64, depth=2, num_heads=4))
TINY_MAE = json.dumps(dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32,
                           decoder_num_heads=4))


# ----------------------------------------------------------------------------------------------------------------
# Mixup / CutMix on video
# ----------------------------------------------------------------------------------------------------------------
def _cutmix_only(cls=VideoMixup) -> Mixup:
    return cls(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.0, mode="batch", label_smoothing=0.0,
               num_classes=4)


def test_video_cutmix_box_is_the_same_in_every_frame_and_lambda_is_its_area():
    torch.manual_seed(0)
    np.random.seed(0)
    b, c, t, h, w = 4, 3, 6, 20, 24
    seen_partial = 0
    for _ in range(10):
        x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, c, t, h, w).contiguous()
        target = torch.tensor([0, 1, 2, 3])
        out, soft = _cutmix_only()(x, target)
        assert out.shape == (b, c, t, h, w)
        for i in range(b):
            pasted = out[i] != i  # the box: pixels taken from sample b-1-i
            assert torch.equal(pasted, pasted[:1, :1].expand_as(pasted)), "box differs across frames/channels"
            area = pasted[0, 0].float().mean().item()
            lam = soft[i, i].item()  # weight of the own label
            assert soft[i, b - 1 - i].item() == pytest.approx(1 - lam, abs=1e-6)
            assert area == pytest.approx(1 - lam, abs=1e-6)
            ys, xs = torch.nonzero(pasted[0, 0], as_tuple=True)
            if len(ys):
                assert pasted[0, 0, ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # a rectangle
                seen_partial += int(0 < area < 1)
    assert seen_partial > 0


def test_timm_mixup_on_raw_5d_clips_cuts_across_frames_which_video_mixup_fixes():
    """The reference's bug: timm's box indexes (T, H) of a 5-D clip, so some frames are not cut at all."""
    np.random.seed(3)
    b, c, t, h, w = 2, 1, 8, 16, 16
    found = False
    for _ in range(20):
        x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, c, t, h, w).contiguous()
        out, _ = _cutmix_only(Mixup)(x, torch.tensor([0, 1]))
        pasted = out[0, 0] != 0
        frames_cut = pasted.flatten(1).any(1)
        if frames_cut.any() and not frames_cut.all():
            found = True
            break
    assert found


def test_video_mixup_blend_keeps_shape_and_mixes_labels():
    x = torch.ones(2, 3, 4, 8, 8)
    x[1] = 3.0
    m = VideoMixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.1, num_classes=3)
    out, soft = m(x, torch.tensor([0, 2]))
    lam = soft[0, 0].item()
    assert out.shape == (2, 3, 4, 8, 8) and torch.allclose(soft.sum(1), torch.ones(2))
    assert lam < 1 and torch.allclose(out[0], torch.full_like(out[0], out[0, 0, 0, 0, 0].item()))


# ----------------------------------------------------------------------------------------------------------------
# Multi-view merge
# ----------------------------------------------------------------------------------------------------------------
def _views(num_videos: int, segs: int, crops: int, num_classes: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for v in range(num_videos):
        for s in range(segs):
            for c in range(crops):
                logits = rng.normal(size=num_classes)
                p = np.exp(logits) / np.exp(logits).sum()
                out.append({"video_id": f"vid{v}.mp4", "segment": s, "crop": c, "label": v % num_classes,
                            "probs": p.tolist()})
    return out


def test_merge_averages_probabilities_over_views_of_an_uneven_two_rank_split(tmp_path):
    views = _views(num_videos=3, segs=2, crops=3)  # 18 views
    # Hand-made example: video 0's views vote for class 2 except one very confident view for class 1.
    for i, r in enumerate(views[:6]):
        r["probs"] = [0.0, 0.35, 0.65] if i else [0.0, 0.99, 0.01]
    views = views[:-1]  # 17 views: uneven over 2 ranks
    shards = [list(ShardSampler(len(views), r, 2)) for r in range(2)]
    assert [len(s) for s in shards] == [8, 9] and sorted(shards[0] + shards[1]) == list(range(17))
    # a DistributedSampler-style padded duplicate on rank 0 must be removed
    shards[0].append(shards[1][-1])
    for r, idx in enumerate(shards):
        with open(view_file(tmp_path, r), "w") as f:
            for i in idx:
                f.write(json.dumps(views[i]) + "\n")
    res = merge_view_files([view_file(tmp_path, r) for r in range(2)], expected_views=6)
    assert res["num_videos"] == 3 and res["num_views"] == 17 and res["duplicates_removed"] == 1
    p0 = res["predictions"]["vid0.mp4"]
    assert p0["pred"] == 2 and p0["num_views"] == 6  # mean probs: 0.46 for class 1, 0.54 for class 2
    assert p0["score"] == pytest.approx((0.01 + 5 * 0.65) / 6)
    assert res["videos_missing_views"] == {"vid2.mp4": 5} and "fewer than 6 views" in res["warning"]
    expected = {}
    for r in views:
        expected.setdefault(r["video_id"], []).append(r["probs"])
    top1 = np.mean([int(np.argmax(np.mean(v, 0)) == int(k[3]) % 3) for k, v in expected.items()])
    assert res["top1"] == pytest.approx(100 * top1)


def test_merge_dedups_on_the_segment_crop_pair_not_a_string():
    """Segment 1 / crop 11 and segment 11 / crop 1 are different views ('111' == '111' in the reference)."""
    recs = [{"video_id": "a", "segment": 1, "crop": 11, "label": 0, "probs": [0.9, 0.1]},
            {"video_id": "a", "segment": 11, "crop": 1, "label": 0, "probs": [0.2, 0.8]},
            {"video_id": "a", "segment": 11, "crop": 1, "label": 0, "probs": [0.2, 0.8]}]
    res = merge_views(recs, expected_views=2)
    assert res["predictions"]["a"]["num_views"] == 2 and res["duplicates_removed"] == 1
    assert res["predictions"]["a"]["score"] == pytest.approx(0.55) and res["top1"] == 100.0
    assert res["warning"] is None
    with pytest.raises(ValueError, match="labels"):
        merge_views(recs + [{"video_id": "a", "segment": 0, "crop": 0, "label": 1, "probs": [1.0, 0.0]}])


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------
def ft_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["--data_path", data, "--data_set", "custom", "--nb_classes", "4", "--output_dir", str(out),
            "--model", "vit_small_patch16_224", "--model_kwargs", TINY_VIT, "--num_frames", "4",
            "--sampling_rate", "2", "--input_size", "32", "--short_side_size", "32", "--batch_size", "2",
            "--num_sample", "2", "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-2", "--num_workers", "0",
            "--device", "cpu", "--print_freq", "2", "--test_num_segment", "2", "--test_num_crop", "3",
            "--opt_betas", "0.9", "0.999", "--save_ckpt_freq", "1", *extra]


@pytest.fixture(scope="module")
def pretrained(synthetic_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pretrain")
    argv = ["--data_path", os.path.join(synthetic_dir, "train.csv"), "--output_dir", str(out), "--model",
            "pretrain_videomae_small_patch16_224", "--model_kwargs", TINY_MAE, "--decoder_depth", "1",
            "--num_frames", "4", "--sampling_rate", "2", "--input_size", "32", "--batch_size", "4", "--epochs",
            "1", "--warmup_epochs", "0", "--mask_ratio", "0.75", "--num_workers", "0", "--device", "cpu"]
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(argv))
    return str(out / "checkpoint-latest.pth")


def test_pretrain_then_finetune_then_multiview_test_then_eval(synthetic_dir, pretrained, tmp_path):
    out = tmp_path / "ft"
    args = run_class_finetuning.get_args_parser().parse_args(
        ft_args(synthetic_dir, out, "--finetune", pretrained, "--model_ema", "--model_ema_decay", "0.5"))
    res = run_class_finetuning.main(args)
    assert args.lr == pytest.approx(1e-2 * 2 / 256)
    assert "dropped (AdaMAE sampler)" in res["load_report"] and "pre-training decoder" in res["load_report"]
    for name in ("checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-latest.pth", "checkpoint-best.pth",
                 "test_results.json", "test_results_ema.json", "test_views_rank0.jsonl"):
        assert (out / name).is_file(), name
    result = json.loads((out / "test_results.json").read_text())
    n_test = len(Path(synthetic_dir, "test.csv").read_text().split("\n")) - 1
    assert result["num_videos"] == n_test and result["num_views"] == 6 * n_test
    assert result["duplicates_removed"] == 0 and result["warning"] is None
    assert set(result["predictions"]) and all(p["num_views"] == 6 for p in result["predictions"].values())
    assert 0 <= result["top1"] <= result["top5"] <= 100 and result["protocol"].startswith("4x2x3")
    log = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in log[:2]] == [0, 1] and "val_acc1" in log[0] and "val_ema_acc1" in log[0]
    assert log[-1]["Final top-1"] == pytest.approx(result["top1"]) and "Final EMA top-1" in log[-1]
    ckpt = torch.load(out / "checkpoint-latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["kind"] == "finetune" and "model_ema" in ckpt and ckpt["epoch"] == 1
    for e in (0, 1):  # an epoch's checkpoint knows the best accuracy including its own validation
        saved = torch.load(out / f"checkpoint-{e}.pth", map_location="cpu", weights_only=False)["best_acc1"]
        assert saved == pytest.approx(max(x["val_acc1"] for x in log[:e + 1])) and saved >= 0

    # --eval of the fine-tuned checkpoint (a fresh output dir) reproduces the per-video predictions, and with
    # --model_ema those of the checkpoint's own EMA weights
    ev = tmp_path / "eval"
    eargs = run_class_finetuning.get_args_parser().parse_args(
        ft_args(synthetic_dir, ev, "--eval", "--finetune", str(out / "checkpoint-latest.pth"), "--model_ema"))
    eres = run_class_finetuning.main(eargs)
    again = json.loads((ev / "test_results.json").read_text())
    assert again["predictions"] == result["predictions"] and eres["test"]["top1"] == result["top1"]
    assert eres["val"]["num_clips"] == len(Path(synthetic_dir, "val.csv").read_text().split("\n")) - 1
    again_ema = json.loads((ev / "test_results_ema.json").read_text())
    assert again_ema["predictions"] == json.loads((out / "test_results_ema.json").read_text())["predictions"]
    assert eres["val_ema"]["loss"] == log[1]["val_ema_loss"]  # the same weights, data and arithmetic: exactly
    assert eres["val_ema"]["loss"] != eres["val"]["loss"]  # not the model's weights again
    no_ema = tmp_path / "no_ema.pth"
    torch.save({k: v for k, v in ckpt.items() if k != "model_ema"}, no_ema)
    eres = run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(
        ft_args(synthetic_dir, tmp_path / "eval2", "--eval", "--finetune", str(no_ema), "--model_ema",
                "--test_num_segment", "1", "--test_num_crop", "1")))
    assert "val" in eres and "val_ema" not in eres and "test_ema" not in eres

    # --eval of a pre-training checkpoint is refused (it would report chance accuracy)
    with pytest.raises(Exception, match="no classifier head"):
        run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(
            ft_args(synthetic_dir, tmp_path / "bad", "--eval", "--finetune", pretrained)))

    # more epochs change the schedule: auto-resume refuses, naming the flag; an explicit --resume continues
    more = ("--finetune", pretrained, "--epochs", "3", "--skip_final_test", "--disable_eval_during_finetuning",
            "--model_ema", "--model_ema_decay", "0.5")
    with pytest.raises(ValueError, match=r"--epochs: 2 -> 3"):
        run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(ft_args(synthetic_dir, out, *more)))
    rargs = run_class_finetuning.get_args_parser().parse_args(
        ft_args(synthetic_dir, out, *more, "--resume", str(out / "checkpoint-latest.pth")))
    run_class_finetuning.main(rargs)
    log = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in log if "epoch" in x] == [0, 1, 2]


def test_mixup_with_an_odd_batch_is_a_user_error_in_every_mode(synthetic_dir, tmp_path):
    """timm's Mixup asserts an even batch in every mode: refused at start-up, not at the first step. --eval mixes
    nothing, so any batch size evaluates."""
    for mode in ("batch", "pair", "elem"):
        res = run_main(run_class_finetuning, ft_args(synthetic_dir, tmp_path / mode, "--batch_size", "3",
                                                     "--num_sample", "1", "--mixup_mode", mode))
        assert res.returncode == 2 and "even number of clips per batch" in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
    from modeling_finetune import create_classifier

    classifier = tmp_path / "classifier.pth"
    torch.save({"model": create_classifier(run_class_finetuning.get_args_parser().parse_args(
        ft_args(synthetic_dir, tmp_path))).state_dict()}, classifier)
    res = run_main(run_class_finetuning, ft_args(synthetic_dir, tmp_path / "eval", "--eval", "--finetune",
                                                 str(classifier), "--batch_size", "1", "--num_sample", "1",
                                                 "--test_num_segment", "1", "--test_num_crop", "1"))
    assert res.returncode == 0 and "mixup off" in res.stdout, res.stderr[-2000:]


def test_accumulation_fp32_no_mixup_and_learnable_pos_from_scratch(synthetic_dir, tmp_path):
    args = run_class_finetuning.get_args_parser().parse_args(
        ft_args(synthetic_dir, tmp_path, "--epochs", "1", "--mixup", "0", "--cutmix", "0", "--update_freq", "2",
                "--num_sample", "1", "--use_learnable_pos_emb", "--skip_final_test", "--smoothing", "0.1",
                "--layer_decay", "1.0", "--no_save_ckpt", "--weight_decay", "0"))
    run_class_finetuning.main(args)
    assert args.num_training_steps_per_epoch == 2  # 8 train videos / (2 x 2)
    assert not list(tmp_path.glob("checkpoint-*.pth"))
    log = json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    assert "train_class_acc" in log and np.isfinite(log["train_loss"])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,env,expect", [
    ("scripts/finetune/ssv2_vitb_800e.sh", {}, dict(data_set="SSV2", nb_classes=174, sampling_rate=2,
                                                    test_num_segment=2, test_num_crop=3, epochs=50, lr=5e-4)),
    ("scripts/finetune/k400_vitb_800e.sh", {}, dict(data_set="Kinetics-400", nb_classes=400, sampling_rate=4,
                                                    test_num_segment=5, test_num_crop=3, epochs=100, lr=1e-3)),
    ("scripts/finetune/ssv2_vitb_800e.sh", {"DEEPSPEED": "1", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"},
     dict(data_set="SSV2", enable_deepspeed=True, accum_iter=4)),
    ("scripts/finetune/slurm_ssv2_vitb_800e.sbatch", {"SLURM_NTASKS": "64"},
     dict(data_set="SSV2", sampling_rate=2, test_num_segment=2, accum_iter=1)),
    ("scripts/finetune/slurm_k400_vitb_800e.sbatch", {"DEEPSPEED": "1", "SLURM_NTASKS": "16"},
     dict(data_set="Kinetics-400", enable_deepspeed=True, test_num_segment=5, accum_iter=4)),
])
def test_launchers_pass_the_paper_recipe(script, env, expect, tmp_path):
    """Run each launcher with torchrun/srun/python replaced by a recorder, then parse what it passed."""
    argv = run_launcher(script, tmp_path, "run_class_finetuning.py", {"FINETUNE": "pretrain.pth", **env},
                        cwd=str(tmp_path))
    if "NNODES" in env:
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node_rank") + 1] == "1"
    argv = argv[argv.index("run_class_finetuning.py") + 1:]
    args = run_class_finetuning.get_args_parser().parse_args(argv)
    assert args.model == "vit_base_patch16_224" and args.finetune == str(tmp_path / "pretrain.pth")  # from cwd
    assert args.data_path == "data/" + ("ssv2" if expect["data_set"] == "SSV2" else "k400")  # the repo's default
    assert args.layer_decay == 0.75 and args.opt == "adamw" and args.opt_betas == [0.9, 0.999]
    assert args.weight_decay == 0.05 and args.drop_path == 0.1 and args.num_frames == 16
    assert args.batch_size == 8 and args.num_sample == 1 and args.dist_eval and args.input_size == 224
    assert args.mixup == 0.8 and args.cutmix == 1.0 and args.smoothing == 0.1 and args.warmup_epochs == 5
    assert args.warmup_lr == 0.0  # VideoMAE's warm-up starts at 0 (its --warmup_lr never reaches the scheduler)
    for k, v in expect.items():
        assert getattr(args, k) == v, k
    if "enable_deepspeed" not in expect:
        assert not args.enable_deepspeed


def test_ema_averages_from_the_first_step(synthetic_dir, tmp_path):
    """VideoMAE's ModelEma decays from the initial weights at every step: after one step with decay 0.5 the EMA is
    the mean of the initial and the trained weights (timm's ModelEmaV3 with a step count copied the model at
    the first two steps)."""
    from modeling_finetune import create_classifier

    n_train = len([ln for ln in Path(synthetic_dir, "train.csv").read_text().splitlines() if ln.strip()])
    args = ft_args(synthetic_dir, tmp_path / "out", "--epochs", "1", "--warmup_epochs", "0", "--batch_size",
                   str(n_train), "--num_sample", "1", "--mixup", "0", "--cutmix", "0", "--model_ema",
                   "--model_ema_decay", "0.5", "--skip_final_test", "--disable_eval_during_finetuning")
    init = create_classifier(run_class_finetuning.get_args_parser().parse_args(args)).state_dict()
    torch.save({"model": init}, tmp_path / "init.pth")
    res = run_main(run_class_finetuning, args + ["--finetune", str(tmp_path / "init.pth")])
    assert res.returncode == 0 and "1 optimizer steps per epoch" in res.stdout, res.stderr[-2000:]
    ckpt = torch.load(tmp_path / "out" / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    trained = [k for k, v in init.items() if v.is_floating_point() and not torch.equal(v, ckpt["model"][k])]
    assert trained
    for k in trained:
        torch.testing.assert_close(ckpt["model_ema"][k], (init[k] + ckpt["model"][k]) / 2, msg=k)


def test_deepspeed_fp16_loss_scaling_is_videomaes():
    """VideoMAE's DeepSpeed config: dynamic loss scale from 2^7, window 128 (2^16 skipped early steps)."""
    from finetune_deepspeed import build_deepspeed_config

    args = run_class_finetuning.get_args_parser().parse_args(["--precision", "fp16", "--update_freq", "2"])
    cfg = build_deepspeed_config(args, world_size=4)
    assert cfg["fp16"]["loss_scale"] == 0 and cfg["fp16"]["initial_scale_power"] == 7
    assert cfg["fp16"]["loss_scale_window"] == 128 and "bf16" not in cfg
    assert cfg["train_batch_size"] == args.batch_size * 2 * 4
