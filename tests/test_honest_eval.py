"""Honest evaluation: videos that cannot be decoded are never scored but named (list line + reason) in the printed
summary, log.txt and test_results.json, also when sharded over two torchrun processes; fine-tuning's --data_path is
a folder (a single file is refused) and --train_list/--val_list/--test_list name a split's list explicitly."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import run_class_finetuning  # noqa: E402

TINY_VIT = json.dumps(dict(embed_dim=32, depth=1, num_heads=2))
TRUNCATED_WEBM = "truncated: 8 decodable frames, the container declares 40"


def common_args(out: Path, *extra: str) -> list[str]:
    return ["--data_set", "custom", "--nb_classes", "4", "--output_dir", str(out), "--model",
            "vit_small_patch16_224", "--model_kwargs", TINY_VIT, "--num_frames", "4", "--sampling_rate", "2",
            "--input_size", "32", "--short_side_size", "32", "--batch_size", "4", "--num_sample", "1", "--epochs",
            "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--print_freq", "50",
            "--test_num_segment", "1", "--test_num_crop", "3", "--mixup", "0", "--cutmix", "0", *extra]


def run_main(argv: list[str]) -> dict:
    return run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(argv))


def lines_of(path: str) -> list[str]:
    return [x for x in Path(path).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def broken_data(synthetic_dir, video_dir, tmp_path_factory) -> dict:
    """A folder with the synthetic train.csv and val/test lists holding broken videos between good ones, placed so
    that with two ranks each rank meets a broken video and one test video's views are split over both ranks
    (7 videos x 3 views = 21 views: rank 0 gets views 0-9, i.e. video 4's first view)."""
    d = tmp_path_factory.mktemp("broken")
    missing, cut_mp4, cut_webm = (os.path.join(video_dir, n) for n in ("missing.mp4", "truncated.mp4",
                                                                     "truncated.webm"))
    (d / "train.csv").write_text(Path(synthetic_dir, "train.csv").read_text())
    val, test = lines_of(os.path.join(synthetic_dir, "val.csv")), lines_of(os.path.join(synthetic_dir, "test.csv"))
    val_lines = [val[0], f"{missing} 1", val[1], val[2], f"{cut_webm} 2", val[3]]
    test_lines = [test[0], f"{missing} 0", test[1], f"{cut_mp4} 3", test[2], f"{cut_webm} 1", test[3]]
    (d / "val.csv").write_text("\n".join(val_lines) + "\n")
    (d / "test.csv").write_text("\n".join(test_lines) + "\n")
    (d / "good_val.csv").write_text("\n".join(val) + "\n")
    (d / "good_test.csv").write_text("\n".join(test) + "\n")
    return {"dir": str(d), "missing": missing, "cut_mp4": cut_mp4, "cut_webm": cut_webm,
            "good_val": [x.split()[0] for x in val], "good_test": [x.split()[0] for x in test]}


def check_unevaluated(entries: list, expected: list[tuple[int, str, str]]) -> None:
    """``expected``: (line, path, reason or reason prefix) in list order."""
    assert [(e["line"], e["path"]) for e in entries] == [(line, path) for line, path, _ in expected]
    for e, (_, _, reason) in zip(entries, expected):
        assert e["reason"].startswith(reason), e


def expected_test(b: dict) -> list:
    return [(2, b["missing"], "file not found"), (4, b["cut_mp4"], "cannot open"), (6, b["cut_webm"], TRUNCATED_WEBM)]


def expected_val(b: dict) -> list:
    return [(2, b["missing"], "file not found"), (5, b["cut_webm"], TRUNCATED_WEBM)]


@pytest.fixture(scope="module")
def one_process_run(broken_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one")
    res = run_main(["--data_path", broken_data["dir"], *common_args(out)])
    return {"out": out, "res": res}


def test_broken_videos_are_named_and_excluded_from_every_metric(broken_data, one_process_run):
    b, out = broken_data, one_process_run["out"]
    result = json.loads((out / "test_results.json").read_text())
    check_unevaluated(result["unevaluated"], expected_test(b))
    assert result["num_videos"] == 4 and result["num_unevaluated"] == 3 and result["num_views"] == 4 * 3
    assert sorted(result["predictions"]) == sorted(b["good_test"])
    preds = result["predictions"].values()
    assert result["top1"] == pytest.approx(100.0 * sum(p["pred"] == p["label"] for p in preds) / 4)
    assert result["top5"] == 100.0  # 4 classes: the label is always among the top 5
    assert "3 of 7 videos are not in top-1/top-5" in result["warning"]
    assert one_process_run["res"]["test"]["unevaluated"] == result["unevaluated"]

    log = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    epoch = next(x for x in log if x.get("epoch") == 0)
    assert epoch["val_num_clips"] == 4 and epoch["val_num_unevaluated"] == 2
    check_unevaluated(epoch["val_unevaluated"], expected_val(b))
    assert math.isfinite(epoch["val_acc1"]) and epoch["best_val_acc1"] == epoch["val_acc1"]
    assert (out / "checkpoint-best.pth").is_file()
    final = next(x for x in log if "Final top-1" in x)
    assert final["Final videos"] == 4 and final["Final unevaluated"] == result["unevaluated"]

    # The good videos alone, named by --val_list/--test_list (no --data_path), give the same numbers: the broken
    # videos changed nothing.
    ev = out / "eval_good"
    good = run_main(["--val_list", os.path.join(b["dir"], "good_val.csv"), "--test_list",
                     os.path.join(b["dir"], "good_test.csv"), "--eval", "--finetune",
                     str(out / "checkpoint-latest.pth"), *common_args(ev)])
    assert good["val"]["num_clips"] == 4 and good["val"]["unevaluated"] == []
    assert good["val"]["acc1"] == pytest.approx(epoch["val_acc1"])
    assert good["val"]["loss"] == pytest.approx(epoch["val_loss"], rel=1e-5)
    again = json.loads((ev / "test_results.json").read_text())
    assert again["predictions"] == result["predictions"] and again["unevaluated"] == []
    assert again["warning"] is None


def test_summary_names_the_unevaluated_videos(broken_data, one_process_run, tmp_path, capsys):
    """--eval of the broken lists prints the count and the first videos with list line and reason."""
    b = broken_data
    res = run_main(["--data_path", b["dir"], "--eval", "--finetune",
                    str(one_process_run["out"] / "checkpoint-latest.pth"), *common_args(tmp_path)])
    printed = capsys.readouterr().out
    assert (f"* Val: 2 videos not evaluated (could not be decoded): line 2 {b['missing']} (file not found); "
            f"line 5 {b['cut_webm']} ({TRUNCATED_WEBM})") in printed
    assert f"* Final multi-view test: 3 videos not evaluated (could not be decoded): line 2 {b['missing']}" in printed
    assert "over 4 videos / 12 views" in printed
    check_unevaluated(res["val"]["unevaluated"], expected_val(b))
    final = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()][-1]
    assert final["val_num_clips"] == 4 and final["val_unevaluated"] == res["val"]["unevaluated"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_dist_eval_reports_the_union_once(broken_data, one_process_run, tmp_path):
    b, one = broken_data, one_process_run["out"]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "run_class_finetuning.py", "--data_path", b["dir"], "--eval", "--dist_eval",
           "--finetune", str(one / "checkpoint-latest.pth"), *common_args(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    per_rank = [lines_of(str(out / f"test_views_rank{r}.jsonl")) for r in range(2)]
    assert [len(v) for v in per_rank] == [10, 11]
    failed_on = [{json.loads(x)["path"] for x in v if '"valid": false' in x} for v in per_rank]
    assert b["cut_mp4"] in failed_on[0] and b["cut_mp4"] in failed_on[1]  # one video's views on both ranks

    single = json.loads((one / "test_results.json").read_text())
    result = json.loads((out / "test_results.json").read_text())
    assert result["unevaluated"] == single["unevaluated"]  # the union, once per video
    check_unevaluated(result["unevaluated"], expected_test(b))
    assert result["num_videos"] == single["num_videos"] == 4 and result["top1"] == single["top1"]
    assert {k: v["pred"] for k, v in result["predictions"].items()} == \
        {k: v["pred"] for k, v in single["predictions"].items()}
    assert res.stdout.count("* Final multi-view test: 3 videos not evaluated") == 1  # rank 0 only

    epoch = next(json.loads(x) for x in (one / "log.txt").read_text().splitlines() if '"epoch": 0' in x)
    final = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()][-1]
    assert final["val_num_clips"] == epoch["val_num_clips"] == 4
    assert final["val_unevaluated"] == epoch["val_unevaluated"]
    assert final["val_acc1"] == pytest.approx(epoch["val_acc1"])


def test_no_decodable_val_clip_picks_no_best_checkpoint(broken_data, tmp_path, capsys):
    b = broken_data
    bad_val = tmp_path / "bad_val.csv"
    bad_val.write_text(f"{b['missing']} 0\n{b['cut_webm']} 1\n")
    res = run_main(["--data_path", b["dir"], "--val_list", str(bad_val), "--skip_final_test",
                    *common_args(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "* Val: no clip could be evaluated" in printed and "checkpoint-best not updated" in printed
    assert not (tmp_path / "out" / "checkpoint-best.pth").exists() and res["best_val_acc1"] is None
    log = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[0])
    assert log["val_num_clips"] == 0 and log["val_acc1"] == "nan" and log["best_val_acc1"] is None
    check_unevaluated(log["val_unevaluated"], [(1, b["missing"], "file not found"), (2, b["cut_webm"], "trunc")])


# ----------------------------------------------------------------------------------------------------------------
# --data_path is a folder; explicit lists per split
# ----------------------------------------------------------------------------------------------------------------
def test_a_list_file_as_data_path_is_refused_naming_the_flags(broken_data, tmp_path, capsys):
    train = os.path.join(broken_data["dir"], "train.csv")
    with pytest.raises((ValueError, SystemExit)) as err:
        run_main(["--data_path", train, *common_args(tmp_path)])
    said = str(err.value) + capsys.readouterr().err
    assert (f"--data_path {train} is a file; fine-tuning needs a folder with train.csv/val.csv/test.csv, or "
            "--train_list/--val_list/--test_list") in said
    assert not list(tmp_path.glob("test_results*.json"))


def test_split_lists_resolve_from_flags_and_never_default_to_the_training_list(broken_data, tmp_path):
    d = broken_data["dir"]
    parse = run_class_finetuning.get_args_parser().parse_args
    args = parse(["--data_path", d, "--test_list", os.path.join(d, "good_test.csv"), *common_args(tmp_path)])
    assert datasets.resolve_split_list("train", args) == os.path.join(d, "train.csv")
    assert datasets.resolve_split_list("validation", args) == os.path.join(d, "val.csv")
    assert datasets.resolve_split_list("test", args) == os.path.join(d, "good_test.csv")

    only_train = parse(["--train_list", os.path.join(d, "train.csv"), *common_args(tmp_path)])
    assert datasets.resolve_split_list("train", only_train) == os.path.join(d, "train.csv")
    with pytest.raises(ValueError, match="no validation list: pass --data_path DIR .* or --val_list FILE"):
        datasets.resolve_split_list("validation", only_train)
    with pytest.raises(ValueError, match=r"--test_list .*nope.csv: no such file"):
        datasets.resolve_split_list("test", parse(["--test_list", str(tmp_path / "nope.csv")]))
    with pytest.raises(ValueError, match="has no val.csv: add it or pass --val_list FILE"):
        datasets.resolve_split_list("validation", parse(["--data_path", str(tmp_path)]))


def test_pretraining_keeps_one_list_file_and_has_no_split_flags():
    import argparse

    pre = datasets.add_data_args(argparse.ArgumentParser(), pretrain=True)._option_string_actions  # noqa: SLF001
    ft = datasets.add_data_args(argparse.ArgumentParser(), pretrain=False)._option_string_actions  # noqa: SLF001
    split_flags = {"--train_list", "--val_list", "--test_list"}
    assert not split_flags & set(pre) and split_flags <= set(ft)


def test_nb_classes_above_the_labels_present_prints_one_notice(broken_data, tmp_path, capsys):
    parse = run_class_finetuning.get_args_parser().parse_args
    argv = common_args(tmp_path)
    argv[argv.index("--nb_classes") + 1] = "6"
    datasets.build_dataset(True, False, parse(["--data_path", broken_data["dir"], *argv]))
    assert capsys.readouterr().out.strip() == \
        "Note: --nb_classes 6 but labels in train.csv only go up to 3 (4 classes present)"
    datasets.build_dataset(True, False, parse(["--data_path", broken_data["dir"], *common_args(tmp_path)]))
    assert "Note:" not in capsys.readouterr().out


def test_a_view_with_non_finite_probabilities_is_wrong_not_class_0(tmp_path):
    """A diverged model (or fp16 overflow) gives NaN probabilities: the view file stays readable JSON, and the video
    counts as wrong and is named in a warning, instead of the merge crashing (and the other ranks hanging) or
    argsort predicting class 0."""
    import torch
    from torch import nn

    import evaluation

    nan = float("nan")
    recs = [{"video_id": "a", "segment": 0, "crop": 0, "label": 0, "probs": [nan, nan]},
            {"video_id": "a", "segment": 0, "crop": 1, "label": 0, "probs": [0.9, 0.1]},
            {"video_id": "b", "segment": 0, "crop": 0, "label": 1, "probs": [0.2, 0.8]}]
    path = tmp_path / "views.jsonl"
    path.write_text("".join(f'{{"video_id": "{r["video_id"]}", "segment": 0, "crop": {r["crop"]}, "label": '
                            f'{r["label"]}, "probs": {evaluation._format_probs(r["probs"])}}}\n' for r in recs))
    res = evaluation.merge_view_files([path])
    assert res["num_videos"] == 2 and res["top1"] == 50.0 and res["non_finite_views"] == 1
    assert res["predictions"]["a"]["pred"] is None and "non-finite" in res["warning"]
    assert res["single_view_top1"] == pytest.approx(200 / 3)  # the NaN view is not a correct class-0 guess

    class OnCPU(nn.Module):  # an EMA kept on the CPU (--model_ema_force_cpu) while the run's device is elsewhere
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    loader = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    stats = evaluation.evaluate(loader, OnCPU(), torch.device("meta"), "fp32")  # inputs follow the model
    assert stats["num_clips"] == 4 and math.isfinite(stats["loss"])

    # validation: a clip with NaN logits is a miss (topk ranks NaN first, so it was a hit for class 0)
    logits = torch.tensor([[nan, nan, nan], [0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    c1, c5 = evaluation._topk_correct(logits, torch.tensor([0, 1, 1, 2]))
    assert (int(c1), int(c5)) == (2, 3)  # top-5 is clamped to the 3 classes: all finite rows hit
