"""tools/extract_features.py and run_linear_probe.py on real encoded videos (CPU, tiny encoders).

Extraction: shapes, the index in list order, a corrupt video named in skipped.csv (never replaced), multi-view
averaging, refusal to mix settings, and resume after an interruption right after the first shard (finished shard
untouched: same inode and mtime; final result equal to an uninterrupted run). Probes: linear (cached features) and
attentive (on the fly) train on the synthetic set and write the fine-tuning program's results JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run_linear_probe  # noqa: E402
import run_mae_pretraining  # noqa: E402
from modeling_finetune import create_classifier  # noqa: E402
from modeling_pretrain import create_pretrain_model  # noqa: E402
import checkpointing
from cli import UserError  # noqa: E402
from engine_for_probing import AttentiveProbe, LinearProbe, load_frozen_encoder  # noqa: E402
from tools import extract_features as xf  # noqa: E402

PT_FLAGS = ["--model", "pretrain_videomae_small_patch16_224", "--num_frames", "4", "--sampling_rate", "2",
            "--input_size", "32", "--mask_ratio", "0.75", "--decoder_depth", "1", "--sampler_heads", "2",
            "--model_kwargs", '{"encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2, '
                              '"decoder_embed_dim": 16, "decoder_num_heads": 2}']


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny AdaMAE pre-training checkpoint saved as the program saves it (random weights, saved args)."""
    out = tmp_path_factory.mktemp("tiny_pt")
    args = run_mae_pretraining.get_args_parser().parse_args(PT_FLAGS + ["--output_dir", str(out)])
    torch.manual_seed(123)  # not --random_init's seed 0
    model = create_pretrain_model(args)
    (path,) = checkpointing.save_checkpoint(args, 0, model, None, None, 0, tag="best",
                                    extra={"kind": "pretrain", "model_name": args.model})
    return path


def extract_args(ckpt: str, list_path: str, out: Path, *extra: str):
    return xf.get_args_parser().parse_args(["--checkpoint", ckpt, "--list", list_path, "--out", str(out),
                                            "--num_workers", "0", "--device", "cpu", "--no_progress", *extra])


@pytest.fixture(scope="module")
def video_list(video_dir, tmp_path_factory) -> str:
    names = ["h264_64x48.mp4", "vp9_64x48.webm", "garbage.mp4", "h264_96x128.mp4", "vp9_80x64.webm"]
    path = tmp_path_factory.mktemp("lists") / "videos.csv"
    path.write_text("".join(f"{os.path.join(video_dir, n)} {i % 3}\n" for i, n in enumerate(names)))
    return str(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_extract_shapes_index_skip_and_resume(tiny_checkpoint, video_list, tmp_path, monkeypatch):
    flags = ("--views", "2x1", "--batch_size", "2", "--shard_size", "2")  # a batch = one video's views
    full = xf.extract(extract_args(tiny_checkpoint, video_list, tmp_path / "full", *flags))
    assert full["complete"] and full["num_embedded"] == 4 and full["num_skipped"] == 1
    store = xf.load_features(tmp_path / "full")
    assert store.features.shape == (4, 32) and store.features.dtype == torch.float32
    assert torch.isfinite(store.features).all()
    index = read_csv(tmp_path / "full" / "index.csv")
    listed = [ln.split()[0] for ln in Path(video_list).read_text().splitlines()]
    assert [r["path"] for r in index] == [p for p in listed if "garbage" not in p]  # list order, skip removed
    assert [int(r["line"]) for r in index] == [1, 2, 4, 5] and [int(r["label"]) for r in index] == [0, 1, 0, 1]
    (skipped,) = read_csv(tmp_path / "full" / "skipped.csv")
    assert skipped["path"].endswith("garbage.mp4") and skipped["line"] == "3" and skipped["reason"]

    # the embedding of a video = its views' mean of the encoder's pooled output
    enc = load_frozen_encoder(tiny_checkpoint)
    ds = xf.VideoClsDataset(xf.VideoList(video_list, require_label=False), mode="test", num_frames=4,
                            sampling_rate=2, input_size=32, short_side_size=32, test_num_segment=2, test_num_crop=1,
                            sampling="dense", num_segments=1, video_backend="auto")
    with torch.no_grad():
        views = enc(torch.stack([ds[0][0], ds[1][0]]))
    torch.testing.assert_close(store.features[0], views.mean(0), rtol=0, atol=1e-6)

    # interrupted right after the first shard is written, then rerun
    calls = []
    real_write = xf.write_shard

    def write_then_stop(*a, **k):
        real_write(*a, **k)
        calls.append(a[0])
        raise KeyboardInterrupt

    part = tmp_path / "part"
    monkeypatch.setattr(xf, "write_shard", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        xf.extract(extract_args(tiny_checkpoint, video_list, part, *flags))
    monkeypatch.setattr(xf, "write_shard", real_write)
    assert sorted(p.name for p in part.iterdir()) == ["features-00000.safetensors", "features.json"]
    assert not json.loads((part / "features.json").read_text())["complete"]
    with pytest.raises(UserError, match="did not finish"):
        xf.load_features(part)
    first = os.stat(part / "features-00000.safetensors")
    xf.extract(extract_args(tiny_checkpoint, video_list, part, *flags))
    again = os.stat(part / "features-00000.safetensors")
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    resumed = xf.load_features(part)
    assert torch.equal(resumed.features, store.features)
    for name in ("index.csv", "skipped.csv"):
        assert (part / name).read_text() == (tmp_path / "full" / name).read_text()

    with pytest.raises(UserError, match="other settings"):  # never mix settings in one folder
        xf.extract(extract_args(tiny_checkpoint, video_list, part, "--views", "1x1", "--shard_size", "2"))


def test_probe_heads_shapes():
    torch.manual_seed(0)
    lin, att = LinearProbe(32, 5), AttentiveProbe(32, 5, num_heads=2)
    assert lin(torch.randn(4, 32)).shape == (4, 5)
    assert att(torch.randn(4, 8, 32)).shape == (4, 5)
    assert not any(p.requires_grad for p in lin.bn.parameters())  # BatchNorm without affine


def probe_flags(out: Path, *extra: str) -> list[str]:
    return ["--output_dir", str(out), "--epochs", "2", "--batch_size", "4", "--num_workers", "0", "--device",
            "cpu", "--print_freq", "100", "--data_set", "custom", "--nb_classes", "4", "--no-auto_resume", *extra]


@pytest.fixture(scope="module")
def cached_features(tiny_checkpoint, synthetic_dir, tmp_path_factory) -> str:
    feats = tmp_path_factory.mktemp("feats")
    for split in ("train", "val", "test"):
        xf.extract(extract_args(tiny_checkpoint, os.path.join(synthetic_dir, f"{split}.csv"), feats / split,
                                "--batch_size", "8"))
    return str(feats)


def test_linear_probe_on_cached_features(cached_features, tmp_path):
    args = run_linear_probe.get_args_parser().parse_args(
        probe_flags(tmp_path / "out", "--probe", "linear", "--features", cached_features))
    results = run_linear_probe.main(args)
    assert args.opt == "lars" and args.weight_decay == 0.0  # MAE's recipe by default
    saved = json.loads((tmp_path / "out" / "test_results.json").read_text())
    assert saved["num_videos"] == results["test"]["num_videos"] > 0 and saved["unevaluated"] == []
    assert 0.0 <= saved["top1"] <= 100.0 and "cached features" in saved["protocol"]
    assert (tmp_path / "out" / "checkpoint-1.pth").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("perf/val_acc1")] == [0, 1]  # validation per epoch, as fine-tuning logs it
    # the probe's checkpoint is no encoder: export, features and probes say so (they failed to rebuild a ViT)
    from checkpoint_loading import CheckpointMismatchError
    from cli import UserError
    from tools.export_hf import export

    probe_ckpt = str(tmp_path / "out" / "checkpoint-1.pth")
    with pytest.raises(UserError, match=f"{probe_ckpt} is a probe checkpoint: it holds the probe trained on a "
                                        f"frozen encoder, not the encoder"):
        load_frozen_encoder(probe_ckpt)
    with pytest.raises(CheckpointMismatchError, match=f"this probe's was {cached_features}"):
        export(probe_ckpt, str(tmp_path / "hf"), verify=False)


def test_attentive_probe_on_the_fly_names_unevaluated(tiny_checkpoint, synthetic_dir, video_dir, tmp_path):
    test_list = tmp_path / "test.csv"  # the test split plus a corrupt video: never scored, named
    test_list.write_text(Path(synthetic_dir, "test.csv").read_text() + f"{video_dir}/garbage.mp4 1\n")
    args = run_linear_probe.get_args_parser().parse_args(probe_flags(
        tmp_path / "out", "--probe", "attentive", "--checkpoint", tiny_checkpoint, "--data_path", synthetic_dir,
        "--test_list", str(test_list), "--test_num_segment", "2", "--test_num_crop", "1", "--epochs", "1"))
    run_linear_probe.main(args)
    assert args.opt == "adamw" and args.num_frames == 4 and args.input_size == 32  # clip from the checkpoint
    saved = json.loads((tmp_path / "out" / "test_results.json").read_text())
    n_test = len(Path(synthetic_dir, "test.csv").read_text().splitlines())
    assert saved["num_videos"] == n_test and saved["expected_views_per_video"] == 2
    (bad,) = saved["unevaluated"]
    assert bad["path"].endswith("garbage.mp4") and bad["line"] == n_test + 1
    ckpt = torch.load(tmp_path / "out" / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    assert set(ckpt["model"]) == set(AttentiveProbe(32, 4, 2).state_dict())  # the probe only, not the encoder


def test_attentive_probe_refuses_cached_features(tmp_path):
    args = run_linear_probe.get_args_parser().parse_args(
        probe_flags(tmp_path / "out", "--probe", "attentive", "--features", str(tmp_path)))
    with pytest.raises(UserError, match="needs the tokens"):
        run_linear_probe.main(args)
    args = run_linear_probe.get_args_parser().parse_args(
        probe_flags(tmp_path / "out", "--features", str(tmp_path), "--checkpoint", "other.pth"))
    with pytest.raises(UserError, match="give --features alone, or --checkpoint with --data_path"):
        run_linear_probe.main(args)  # the checkpoint was ignored without a word


@pytest.mark.parametrize("script,probe", [("scripts/probe/linear_probe.sh", "linear"),
                                          ("scripts/probe/attentive_probe.sh", "attentive")])
def test_probe_launchers(script, probe, tmp_path):
    """The launchers start run_linear_probe.py with flags it accepts and the probe's recipe defaults; relative
    paths given to them are relative to where they were started (they run from the repository)."""
    from conftest import run_launcher
    argv = run_launcher(script, tmp_path, "run_linear_probe.py", {"CHECKPOINT": "pt.pth", "DATA_DIR": "d"},
                        cwd=str(tmp_path))
    args = run_linear_probe.get_args_parser().parse_args(argv[argv.index("run_linear_probe.py") + 1:])
    run_linear_probe.apply_probe_defaults(args)
    assert args.probe == probe and args.output_dir
    if probe == "linear":
        assert args.features and args.opt == "lars" and args.lr == 0.1 and args.epochs == 90
    else:
        assert args.checkpoint == str(tmp_path / "pt.pth") and args.data_path == str(tmp_path / "d")
        assert args.dist_eval
        assert args.opt == "adamw" and args.lr == 1e-3 and args.weight_decay == 0.01 and args.epochs == 20
        assert (args.test_num_segment, args.test_num_crop) == (5, 3)


@pytest.mark.parametrize("encoder_only", [False, True])
def test_hf_folder_gives_the_same_embedding(tiny_checkpoint, tmp_path, encoder_only):
    """An exported Hugging Face folder (VideoMAEForPreTraining or the encoder alone) embeds as the checkpoint."""
    from tools.export_hf import export
    export(tiny_checkpoint, str(tmp_path / "hf"), encoder_only=encoder_only, verify=False)
    clip = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = load_frozen_encoder(tiny_checkpoint)(clip), load_frozen_encoder(str(tmp_path / "hf"))(clip)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    with torch.no_grad():  # the random-init baseline really differs
        assert not torch.allclose(load_frozen_encoder(tiny_checkpoint, random_init=True)(clip), ours, atol=1e-3)


def test_user_errors_exit_2(tiny_checkpoint, video_list, tmp_path, capsys):
    """A bad flag value, a checkpoint without saved args, a missing one or an HF folder with truncated weights:
    one line naming it, exit status 2."""
    from cli import run_program
    from tools.export_hf import export
    bare = tmp_path / "bare.pth"
    torch.save({"model": torch.load(tiny_checkpoint, weights_only=False)["model"]}, bare)
    export(tiny_checkpoint, str(tmp_path / "hf"), verify=False)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for extra, needle in ((["--views", "3"], "--views '3'"), (["--checkpoint", str(bare)], "no saved run args"),
                          (["--checkpoint", str(tmp_path / "nope.pth")], f"checkpoint {tmp_path}/nope.pth does not"),
                          (["--checkpoint", str(tmp_path / "hf")], f"{weights} is truncated or unreadable")):
        argv = ["--checkpoint", tiny_checkpoint, "--list", video_list, "--out", str(tmp_path / "o"), *extra]
        with pytest.raises(SystemExit) as e:
            run_program(xf.main, xf.get_args_parser(), argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_classifier_embedding_is_what_its_head_reads(tmp_path):
    """A fine-tuned classifier embeds as its own forward_features (mean, then its trained fc_norm); its
    encoder-only HF export (no fc_norm in VideoMAEModel) embeds as the plain mean of the same tokens."""
    import run_class_finetuning
    from tools.export_hf import export
    args = run_class_finetuning.get_args_parser().parse_args(
        ["--model", "vit_small_patch16_224", "--data_set", "custom", "--nb_classes", "3", "--num_frames", "4",
         "--input_size", "32", "--model_kwargs", '{"embed_dim": 32, "depth": 2, "num_heads": 2}',
         "--output_dir", str(tmp_path)])
    model = create_classifier(args).eval()
    with torch.no_grad():
        model.fc_norm.weight.uniform_(0.5, 1.5)
        model.fc_norm.bias.normal_()
    (path,) = checkpointing.save_checkpoint(args, 0, model, None, None, 0, tag="best", extra={"kind": "finetune"})
    clip = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    enc = load_frozen_encoder(path)
    with torch.no_grad():
        torch.testing.assert_close(enc(clip), model.forward_features(clip), rtol=0, atol=1e-6)
        export(path, str(tmp_path / "hf"), encoder_only=True, verify=False)
        torch.testing.assert_close(load_frozen_encoder(str(tmp_path / "hf"))(clip), enc.tokens(clip).mean(1),
                                   rtol=0, atol=1e-6)


def test_probe_resumes_exactly_after_a_stop_mid_epoch(cached_features, tmp_path, monkeypatch):
    """A stop request after step 1 of epoch 0 saves a mid-epoch checkpoint and exits 75; rerunning the same command
    finishes the run with the same probe weights and test results as a run never interrupted."""
    from preemption import GracefulStop

    class StopAfterOneStep(GracefulStop):
        def __init__(self) -> None:
            super().__init__(install=False)
            self.polls = 0

        def poll(self) -> bool:
            self.polls += 1
            return self.polls == 1

    def run(out: Path) -> None:
        flags = [f for f in probe_flags(out, "--features", cached_features, "--epochs", "2")
                 if f != "--no-auto_resume"]
        run_linear_probe.main(run_linear_probe.get_args_parser().parse_args(flags))

    run(tmp_path / "straight")
    monkeypatch.setattr(run_linear_probe, "GracefulStop", StopAfterOneStep)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "stopped")
    assert e.value.code == 75
    ckpt = torch.load(tmp_path / "stopped" / "checkpoint-latest.pth", weights_only=False)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 1)
    monkeypatch.setattr(run_linear_probe, "GracefulStop", GracefulStop)
    run(tmp_path / "stopped")
    a, b = (torch.load(tmp_path / d / "checkpoint-1.pth", weights_only=False)["model"] for d in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((tmp_path / d / "test_results.json").read_text()) for d in ("straight", "stopped")]
    assert results[0]["predictions"] == results[1]["predictions"]


@pytest.mark.parametrize("split", ["val", "test"])
def test_linear_probe_on_features_checks_every_splits_labels(tmp_path, split):
    """A val/test label the probe has no output for used to fail later as an index error (or be scored wrong):
    every split is checked against --nb_classes, naming the split, the list line and the video."""
    from conftest import run_main

    feats = tmp_path / "feats"
    for name in ("train", "val", "test"):
        labels = [0, 1, 2, 3, 0, 1] if name != split else [0, 1, 4]
        d = feats / name
        d.mkdir(parents=True)
        plan = xf.Plan({"views": "1x1", "pooling": "mean", "list": f"/data/{name}.csv"})
        rows = [{"path": f"v{i}.mp4", "line": i + 2, "label": lab, "video_id": f"v{i}.mp4", "reason": ""}
                for i, lab in enumerate(labels)]
        xf.write_shard(d / xf.shard_name(0), plan, rows, [torch.randn(8) for _ in labels], 8)
        (d / xf.MANIFEST).write_text(json.dumps({"plan_key": plan.key, "settings": plan.settings, "complete": True,
                                                 "dim": 8, "shards": [xf.shard_name(0)]}))
    res = run_main(run_linear_probe, probe_flags(tmp_path / "out", "--probe", "linear", "--features", str(feats)))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"error: {split} split: /data/{split}.csv:4: label 4 outside [0, 4) for v2.mp4" in res.stderr


def test_rerun_refuses_a_rewritten_checkpoint_another_precision_or_an_edited_list(tiny_checkpoint, video_dir,
                                                                                   tmp_path):
    """The cache is keyed on what the features are, not on paths: a checkpoint saved again at the same path
    (checkpoint-latest.pth after more training), another --precision or a list edited in place are refused,
    naming what changed, instead of silently keeping the old shards."""
    ckpt, lst = tmp_path / "checkpoint-latest.pth", tmp_path / "list.csv"
    ckpt.write_bytes(Path(tiny_checkpoint).read_bytes())
    lst.write_text(f"{video_dir}/h264_64x48.mp4 0\n")
    out = tmp_path / "feats"
    xf.extract(extract_args(str(ckpt), str(lst), out))
    xf.extract(extract_args(str(ckpt), str(lst), out))  # same everything: accepted (nothing recomputed)
    with pytest.raises(UserError, match=r"changed: precision\)"):
        xf.extract(extract_args(str(ckpt), str(lst), out, "--precision", "bf16"))
    lst.write_text(f"{video_dir}/h264_64x48.mp4 1\n")
    with pytest.raises(UserError, match=r"changed: list_entries\)"):
        xf.extract(extract_args(str(ckpt), str(lst), out))
    lst.write_text(f"{video_dir}/h264_64x48.mp4 0\n")
    saved = torch.load(ckpt, weights_only=False)
    saved["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in saved["model"].items()}
    torch.save(saved, ckpt)
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse-mtime filesystem still differs
    with pytest.raises(UserError, match=r"changed: weights \(the checkpoint was rewritten since\)"):
        xf.extract(extract_args(str(ckpt), str(lst), out))
    assert json.loads((out / xf.MANIFEST).read_text())["settings"]["precision"] == "fp32"


def test_hf_folder_fingerprint_covers_its_weight_sampler_and_args_files(tiny_checkpoint, tmp_path):
    from tools.export_hf import export
    export(tiny_checkpoint, str(tmp_path / "hf"), verify=False)
    names = sorted(Path(p).name for p in xf.weights_fingerprint(str(tmp_path / "hf")))
    assert names == ["adamae_args.json", "adamae_sampler.safetensors", "config.json", "model.safetensors"]


@pytest.mark.parametrize("flag,expected", [([], "segment"), (["--no-sparse_sample"], "dense"),
                                           (["--sparse_sample"], "segment")])
def test_explicit_sparse_sample_flag_wins_over_a_saved_ssv2_data_set(flag, expected):
    class SavedSSV2:  # what clip_settings reads off a FrozenEncoder
        args = argparse.Namespace(data_set="SSV2", num_frames=4, sampling_rate=2, num_segments=1)
        kind, num_frames, input_size = "pretrain", 4, 32

    args = xf.get_args_parser().parse_args(["--checkpoint", "c", "--list", "l", "--out", "o", *flag])
    assert xf.clip_settings(args, SavedSSV2())["sampling"] == expected


def write_feature_folder(folder: Path, settings: dict, dim: int = 8, n: int = 4) -> None:
    """A finished features folder as tools/extract_features.py writes it, with the given plan settings."""
    folder.mkdir(parents=True)
    plan = xf.Plan(settings)
    rows = [{"path": f"v{i}.mp4", "line": i + 1, "label": i % 2, "video_id": f"v{i}.mp4", "reason": ""}
            for i in range(n)]
    xf.write_shard(folder / xf.shard_name(0), plan, rows, [torch.randn(dim) for _ in rows], dim)
    (folder / xf.MANIFEST).write_text(json.dumps({"plan_key": plan.key, "settings": plan.settings,
                                                  "complete": True, "dim": dim, "shards": [xf.shard_name(0)]}))


def test_linear_probe_refuses_splits_extracted_differently(tmp_path):
    """train/ and val/ from another checkpoint (or width, precision, ...) are refused naming the settings and
    both folders; what legitimately differs per split (list, views, counts, shard size) is accepted."""
    base = {"checkpoint": "/ck/checkpoint-latest.pth", "weights": {"/ck/checkpoint-latest.pth": [10, 1]},
            "pooling": "mean", "dim": 8, "precision": "fp32", "num_frames": 4, "views": "1x1",
            "list": "/data/train.csv", "list_entries": "a", "num_videos": 4, "shard_size": 2048, "data_root": ""}
    write_feature_folder(tmp_path / "ok" / "train", base)
    write_feature_folder(tmp_path / "ok" / "val", {**base, "views": "5x3", "list": "/data/val.csv",
                                                   "list_entries": "b", "num_videos": 3, "shard_size": 2,
                                                   "data_root": "/v"}, n=3)
    args = run_linear_probe.get_args_parser().parse_args(probe_flags(tmp_path / "o", "--features",
                                                                     str(tmp_path / "ok"), "--skip_final_test"))
    train, val, _, dim, _ = run_linear_probe.build_data(args)
    assert dim == 8 and len(val) == 3

    changed = {"weights": {"/ck/checkpoint-latest.pth": [10, 2]}, "precision": "bf16", "dim": 16}
    write_feature_folder(tmp_path / "bad" / "train", base)
    write_feature_folder(tmp_path / "bad" / "val", {**base, **changed}, dim=16)
    args.features = str(tmp_path / "bad")
    with pytest.raises(UserError) as e:
        run_linear_probe.build_data(args)
    msg = str(e.value)
    assert str(tmp_path / "bad" / "train") in msg and str(tmp_path / "bad" / "val") in msg
    assert "dim 8 vs 16" in msg and "precision 'fp32' vs 'bf16'" in msg and "weights" in msg


@pytest.mark.slow
def test_two_process_linear_probe_scores_with_the_saved_batchnorm_statistics(cached_features, tmp_path):
    """DDP gives every rank rank 0's BatchNorm statistics before each forward; after the last one of an epoch they
    differ, so each rank scored its shard with its own probe, not the one saved. Every test view's probabilities
    must be the saved probe's."""
    import socket
    import subprocess

    from tools.extract_features import load_features

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT"} and not k.startswith("SLURM_")},
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "run_linear_probe.py", *probe_flags(out, "--probe", "linear", "--features", cached_features,
                                                "--dist_eval", "--lr", "1.0", "--warmup_epochs", "0")]
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    state = torch.load(out / "checkpoint-latest.pth", map_location="cpu", weights_only=False)["model"]
    probe = LinearProbe(state["bn.running_mean"].numel(), state["head.weight"].shape[0])
    probe.load_state_dict(state)
    probe.eval()
    feats = load_features(os.path.join(cached_features, "test"))
    for rank in (0, 1):
        for line in (out / f"test_views_rank{rank}.jsonl").read_text().splitlines():
            view = json.loads(line)
            x = feats.features[feats.video_ids.index(view["video_id"])][None].float()
            with torch.no_grad():
                want = torch.softmax(probe(x), -1)[0]
            torch.testing.assert_close(torch.tensor(view["probs"]), want, atol=1e-5, rtol=0, msg=f"rank {rank}")
