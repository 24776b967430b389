"""A user's mistake ends in one line naming the file:line or the flag and exit status 2, never a traceback; --help
documents every flag with its default, and each program lists only its own flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_class_finetuning  # noqa: E402
import run_mae_pretraining  # noqa: E402
from conftest import run_main  # noqa: E402

TINY_VIT = json.dumps(dict(embed_dim=64, depth=2, num_heads=4))
TINY_MAE = json.dumps(dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32,
                           decoder_num_heads=4))


PROGRAMS = {"run_mae_pretraining.py": run_mae_pretraining, "run_class_finetuning.py": run_class_finetuning}


def run(program: str, *argv: str, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run a program (in this process unless ``subprocess_``) and collect its exit status and output."""
    if subprocess_:
        return subprocess.run([sys.executable, program, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run_main(PROGRAMS[program], list(argv))


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Caught" not in res.stderr, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def finetune(data: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("run_class_finetuning.py", "--data_path", data, "--output_dir", str(out), "--model",
               "vit_small_patch16_224", "--model_kwargs", TINY_VIT, "--num_frames", "4", "--input_size", "32",
               "--batch_size", "2", "--epochs", "1", "--num_workers", "0", "--device", "cpu", *extra)


def pretrain(data: str, out: Path, *extra: str, subprocess_: bool = False) -> subprocess.CompletedProcess:
    return run("run_mae_pretraining.py", "--data_path", data, "--output_dir", str(out), "--model",
               "pretrain_videomae_small_patch16_224", "--model_kwargs", TINY_MAE, "--decoder_depth", "1",
               "--num_frames", "4", "--sampling_rate", "2", "--input_size", "32", "--batch_size", "2",
               "--mask_ratio", "0.75", "--epochs", "1", "--device", "cpu", *extra, subprocess_=subprocess_)


@pytest.fixture()
def bad_lists(synthetic_dir, tmp_path) -> Path:
    """Copies of the synthetic lists with one mistake each, in folders fine-tuning accepts."""
    lines = Path(synthetic_dir, "train.csv").read_text().splitlines()
    header, first = (lines[0], lines[1:]) if "label" in lines[0] else (None, lines)
    path0 = first[0].split(",")[0] if "," in first[0] else first[0].split()[0]
    sep = "," if "," in first[0] else " "
    for name, body in {"nonint": [f"{path0}{sep}zero"], "range": [f"{path0}{sep}7"]}.items():
        d = tmp_path / name
        d.mkdir()
        rows = ([header] if header else []) + first[:1] + body + first[1:]
        for split in ("train.csv", "val.csv", "test.csv"):
            (d / split).write_text("\n".join(rows) + "\n")
    return tmp_path


def test_bad_list_line_names_file_and_line(bad_lists, synthetic_dir):
    res = finetune(str(bad_lists / "nonint"), bad_lists / "o1", "--data_set", "custom", "--nb_classes", "4",
                   "--data_root", synthetic_dir)
    line = 3 if "label" in Path(synthetic_dir, "train.csv").read_text().splitlines()[0] else 2
    assert_user_error(res, f"train.csv:{line}:", "label 'zero' is not an integer")
    # the full argument dump is not on the terminal
    assert '"sampler_heads"' not in res.stdout and '"attn_drop_rate"' not in res.stdout


def test_label_outside_the_class_count_names_file_and_line(bad_lists, synthetic_dir):
    res = finetune(str(bad_lists / "range"), bad_lists / "o2", "--data_set", "custom", "--nb_classes", "4",
                   "--data_root", synthetic_dir)
    assert_user_error(res, "train.csv:", "label 7 outside [0, 4)", "--nb_classes")


def test_missing_list_file_and_missing_output_dir_and_flag_combination(synthetic_dir, tmp_path):
    assert_user_error(pretrain(str(tmp_path / "missing.csv"), tmp_path / "o"), "missing.csv")
    res = run("run_mae_pretraining.py", "--data_path", str(Path(synthetic_dir, "train.csv")), "--device", "cpu")
    assert_user_error(res, "--output_dir is required")
    assert_user_error(finetune(synthetic_dir, tmp_path / "o3", "--data_set", "custom"),
                      "--data_set custom needs --nb_classes")
    assert_user_error(finetune(str(Path(synthetic_dir, "train.csv")), tmp_path / "o4", "--data_set", "custom",
                               "--nb_classes", "4"), "--data_path", "is a file")


def test_truncated_finetune_checkpoint_is_named(synthetic_dir, tmp_path):
    bad = tmp_path / "cut.pth"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    res = finetune(synthetic_dir, tmp_path / "o", "--data_set", "custom", "--nb_classes", "4", "--finetune",
                   str(bad))
    assert_user_error(res, str(bad), "truncated or unreadable")


def test_error_inside_a_loader_worker_reaches_the_user_as_one_line(tmp_path):
    lst = tmp_path / "gone.csv"
    lst.write_text("".join(f"{tmp_path}/missing_{i}.mp4\n" for i in range(4)))
    res = pretrain(str(lst), tmp_path / "o", "--num_workers", "1", "--max_retries", "2", subprocess_=True)
    assert_user_error(res, "consecutive videos failed to decode", "gone.csv", "check_dataset.py")


def test_debug_keeps_the_traceback(synthetic_dir, tmp_path):
    res = finetune(synthetic_dir, tmp_path / "o", "--data_set", "custom", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr and "--nb_classes" in res.stderr


@pytest.mark.parametrize("module", [run_mae_pretraining, run_class_finetuning])
def test_help_documents_every_flag_with_its_default(module, capsys):
    parser = module.get_args_parser()
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS number of training epochs (default:" in text
    if module is run_class_finetuning:
        assert "--use_cls LayerNorm then token 0" in text and "VideoMAE's flag) (default: off)" in text
    else:  # pre-training lists no fine-tuning flag
        for flag in ("--aa", "--reprob", "--test_num_crop", "--nb_classes", "--short_side_size"):
            assert flag not in text, flag


@pytest.mark.parametrize("flag,value,low", [("--epochs", "0", 1), ("--update_freq", "0", 1), ("--print_freq", "0", 1),
                                            ("--save_ckpt_freq", "0", 1), ("--sampling_rate", "0", 1),
                                            ("--num_sample", "0", 1), ("--num_workers", "-1", 0),
                                            ("--vis_num_clips", "0", 1), ("--sampler_heads", "0", 1),
                                            ("--warmup_epochs", "-1", 0), ("--test_num_crop", "0", 1),
                                            ("--sampler_temperature", "0", "> 0.0"),
                                            ("--sampler_temperature", "nan", "> 0.0")])
def test_counts_below_their_minimum_name_the_flag(synthetic_dir, tmp_path, flag, value, low):
    # Each of these once crashed (ZeroDivisionError, IndexError) or, worse, trained (a frame stride of 0: one
    # repeated frame; a negative warm-up; a temperature of 0 gives NaN losses, a negative one prefers the least
    # likely tokens).
    if flag == "--test_num_crop":
        res = finetune(synthetic_dir, tmp_path / "o", "--data_set", "custom", "--nb_classes", "4", flag, value)
    else:
        res = pretrain(os.path.join(synthetic_dir, "train.csv"), tmp_path / "o", flag, value)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    bound = low if isinstance(low, str) else f">= {low}"
    assert f": must be {bound}, got {value}" in res.stderr.strip().splitlines()[-1]
    assert f"error: argument {flag}" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_adamae_softmax_temp_is_accepted_and_ignored_as_in_adamae(synthetic_dir, tmp_path):
    """AdaMAE parses --softmax_temp (default 1e-2) and never applies it; as a temperature here it would make the
    sampler 100x sharper, so an AdaMAE command line runs as AdaMAE ran it: ignored, with a note."""
    out = tmp_path / "o"
    res = pretrain(os.path.join(synthetic_dir, "train.csv"), out, "--softmax_temp", "1e-2", "--num_workers", "0",
                   "--vis_freq", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Note: --softmax_temp 0.01 is ignored, as in AdaMAE" in res.stdout
    assert json.loads((out / "args.json").read_text())["sampler_temperature"] == 1.0


def test_sampler_flags_with_a_mask_that_has_no_sampler_get_a_note(synthetic_dir, tmp_path):
    res = pretrain(os.path.join(synthetic_dir, "train.csv"), tmp_path / "o", "--mask_type", "tube",
                   "--mask_ratio", "0.5", "--sampler_depth", "2", "--sampling_loss_weight", "1e-2",
                   "--num_workers", "0", "--vis_freq", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("Note: --sampling_loss_weight, --sampler_depth set, but --mask_type tube has no sampler: they have no "
            "effect") in res.stdout
    res = pretrain(os.path.join(synthetic_dir, "train.csv"), tmp_path / "a", "--num_workers", "0", "--vis_freq",
                   "0", "--sampler_depth", "2")
    assert res.returncode == 0 and "no sampler" not in res.stdout


def test_a_crash_with_loader_workers_alive_exits(synthetic_dir, tmp_path):
    """A bug's exception (not a user error) while persistent DataLoader workers run: the program prints the
    traceback and exits 1. The workers ignore SIGTERM (the main process handles stop signals), so multiprocessing's
    exit handler, which terminates them with SIGTERM and waits, used to hang the crashed program forever."""
    out = tmp_path / "o"
    (out / "checkpoint-0.pth").mkdir(parents=True)  # saving epoch 0's checkpoint fails: IsADirectoryError
    res = pretrain(os.path.join(synthetic_dir, "train.csv"), out, "--num_workers", "2", "--save_ckpt_freq", "1",
                   subprocess_=True)  # 300 s timeout: a hang fails the test
    assert res.returncode == 1 and "IsADirectoryError" in res.stderr, res.stderr[-3000:]
    assert "Epoch: [0] Total time" in res.stdout
    assert "is killed by signal" not in res.stderr  # no second, misleading error from the workers' clean-up


@pytest.mark.parametrize("flag,value", [("--aa", "v0"), ("--aa", "augmix-m5-w4"), ("--aa", "rand-x3"),
                                        ("--remode", "gauss"), ("--train_interpolation", "cubic")])
def test_augmentation_flags_timm_cannot_build_name_the_flag(synthetic_dir, tmp_path, flag, value):
    # timm only asserts on these (a bare AssertionError / KeyError from inside the first worker)
    res = finetune(synthetic_dir, tmp_path / "o", "--data_set", "custom", "--nb_classes", "4", flag, value)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: argument {flag}" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("program,key,flag", [("pretrain", "mask_ratio", "--mask_ratio"),
                                              ("pretrain", "img_size", "--input_size"),
                                              ("finetune", "all_frames", "--num_frames"),
                                              ("finetune", "init_scale", "--init_scale")])
def test_model_kwargs_that_a_flag_sets_name_the_flag(synthetic_dir, tmp_path, program, key, flag):
    # they collided in the constructor call (a TypeError traceback), or the flag silently won (all_frames)
    if program == "pretrain":
        kwargs = json.dumps({**json.loads(TINY_MAE), key: 8})
        res = pretrain(os.path.join(synthetic_dir, "train.csv"), tmp_path / "o", "--model_kwargs", kwargs)
    else:
        kwargs = json.dumps({**json.loads(TINY_VIT), key: 8})
        res = finetune(synthetic_dir, tmp_path / "o", "--data_set", "custom", "--nb_classes", "4", "--model_kwargs",
                       kwargs)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"error: --model_kwargs sets {key} (use {flag})" in res.stderr.strip().splitlines()[-1]


def test_resume_of_a_checkpoint_that_does_not_fit_says_what_it_holds(synthetic_dir, tmp_path):
    """--resume of another program's checkpoint (or of a run with other model flags) was a RuntimeError listing
    every key; a folder was called a torn file."""
    pt = tmp_path / "pt"
    assert pretrain(os.path.join(synthetic_dir, "train.csv"), pt, "--num_workers", "0", "--vis_freq", "0",
                    "--save_ckpt_freq", "1").returncode == 0
    ckpt = str(pt / "checkpoint-latest.pth")
    res = finetune(synthetic_dir, tmp_path / "ft", "--data_set", "custom", "--nb_classes", "4", "--resume", ckpt)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{ckpt} (pretrain pretrain_videomae_small_patch16_224 checkpoint) does not fit this run's model" in last
    assert "missing (e.g." in last and "use --finetune" in last
    res = pretrain(os.path.join(synthetic_dir, "train.csv"), tmp_path / "pt2", "--mask_type", "tube", "--resume",
                   ckpt)
    assert res.returncode == 2 and "unexpected (e.g. encoder.pos_embed_probs)" in res.stderr, res.stderr[-2000:]
    res = pretrain(os.path.join(synthetic_dir, "train.csv"), tmp_path / "pt3", "--resume", str(pt))
    assert res.returncode == 2 and f"checkpoint {pt} is a folder; give a checkpoint file in it" in res.stderr
    # fine-tuning into a pre-training run's folder: named as such (it listed every flag that differs)
    res = finetune(synthetic_dir, pt, "--data_set", "custom", "--nb_classes", "4")
    assert_user_error(res, f"--output_dir {pt} holds a pretrain run (checkpoint-latest.pth); this finetune run "
                           f"cannot continue it")
    # starting over where a run's checkpoints are: they would be overwritten one by one (and silently resumed later)
    res = pretrain(os.path.join(synthetic_dir, "train.csv"), pt, "--no-auto_resume", "--num_workers", "0")
    assert_user_error(res, f"--output_dir {pt} holds a run's checkpoints (checkpoint-0.pth, checkpoint-latest.pth)")


@pytest.mark.parametrize("program,flag,value,message", [
    ("pretrain", "--model", "vit_small_patch16_224", "argument --model: invalid choice: 'vit_small_patch16_224'"),
    ("finetune", "--model", "pretrain_videomae_small_patch16_224", "argument --model: invalid choice"),
    ("finetune", "--model", "foo", "(choose from 'vit_small_patch16_224', 'vit_base_patch16_224'"),
    ("pretrain", "--model_kwargs", "[1, 2]", "argument --model_kwargs: expected a JSON object"),
    ("finetune", "--model_kwargs", "{depth: 2}", "argument --model_kwargs: not JSON"),
    ("finetune", "--model_kwargs", '{"embed_dimm": 64}',
     "error: --model_kwargs {\"embed_dimm\": 64}: vit_small_patch16_224 got an unexpected keyword argument"),
    ("pretrain", "--model_kwargs", '{"embed_dimm": 64}', "pretrain_videomae_small_patch16_224 got an unexpected")])
def test_model_and_model_kwargs_mistakes_name_the_flag(synthetic_dir, tmp_path, program, flag, value, message):
    # each was a traceback: timm's RuntimeError (unknown model) or the constructor's TypeError
    if program == "pretrain":
        res = pretrain(os.path.join(synthetic_dir, "train.csv"), tmp_path / "o", flag, value)
    else:
        res = finetune(synthetic_dir, tmp_path / "o", "--data_set", "custom", "--nb_classes", "4", flag, value)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert message in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]


def test_an_output_path_that_cannot_be_created_names_the_flag(synthetic_dir, tmp_path):
    """A file where the output folder should go (or no permission) was a FileExistsError / PermissionError
    traceback in every program and tool; check_dataset's --report failed only after the whole check."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    train = os.path.join(synthetic_dir, "train.csv")
    pt = tmp_path / "pt"
    assert pretrain(train, pt, "--num_workers", "0", "--vis_freq", "0").returncode == 0
    res = pretrain(train, blocker, "--num_workers", "0")
    assert_user_error(res, f"--output_dir {blocker}: cannot create it (File exists)")
    import contextlib
    import io

    import run_mae_vis
    from cli import run_program
    from tools import check_dataset, extract_features, make_synthetic_dataset, prepare_videos

    ckpt = str(pt / "checkpoint-latest.pth")
    tools = [(run_mae_vis.cli, ["--checkpoint", ckpt, "--video", train, "--output_dir", str(blocker), "--device",
                                "cpu"], f"--output_dir {blocker}"),
             (lambda a: run_program(extract_features.main, extract_features.get_args_parser(), a),
              ["--checkpoint", ckpt, "--list", train, "--out", str(blocker / "sub"), "--num_workers", "0"],
              f"--out {blocker / 'sub'}: cannot create it (Not a directory)"),
             (prepare_videos.main, [train, str(blocker / "sub"), "--no_progress"],
              f"OUT_DIR {blocker / 'sub'}: cannot create it (Not a directory)"),
             (make_synthetic_dataset.main, ["--out", str(blocker)], f"--out {blocker}: cannot create it"),
             (check_dataset.main, [train, "--report", str(tmp_path / "no" / "r.txt")],
              f"--report {tmp_path / 'no' / 'r.txt'}: its folder {tmp_path / 'no'} does not exist")]
    for main, argv, message in tools:  # in this process: a new interpreter per tool cost seconds each
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
        assert code == 2 and "Traceback" not in err.getvalue(), (argv, err.getvalue()[-2000:])
        assert message in err.getvalue().strip().splitlines()[-1], (argv, err.getvalue()[-2000:])
