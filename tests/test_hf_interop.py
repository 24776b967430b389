"""Hugging Face interop: tools/export_hf.py, HF folders in --finetune / run_mae_vis.py, and fp32 CPU parity with
``transformers`` (tests that need it skip without it; requirements-dev.txt installs it).

Tiny models are built by the training programs' builders (``create_classifier``, ``create_pretrain_model``) from
parsed flags and saved with
``checkpointing.save_checkpoint``, after every parameter (biases and LayerNorm weights included) has been randomised.
Parity: max |ours - HF| / max |ours| < 1e-4. The known HF difference (LayerNorm eps 1e-5 hard-coded in ``fc_norm``
and the decoder's final norm, ours 1e-6) is measured and printed (``pytest -s``), not hidden: each parity test also
reruns HF with those norms set to 1e-6, which must then agree to float rounding.
"""
from __future__ import annotations

import json
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import export_hf  # noqa: E402
from tools import hf_model_card  # noqa: E402
import hf_interop  # noqa: E402
import run_class_finetuning  # noqa: E402
import run_mae_pretraining  # noqa: E402
import run_mae_vis  # noqa: E402
from modeling_finetune import create_classifier  # noqa: E402
from modeling_pretrain import create_pretrain_model  # noqa: E402
import checkpointing
from checkpoint_loading import load_pretrained_encoder, read_checkpoint  # noqa: E402
from masking_generator import MaskGenerator  # noqa: E402

TOL = 1e-4
CLASSES = ["up", "down", "circle", "static", "grow"]
FT_FLAGS = ["--model", "vit_small_patch16_224", "--data_set", "custom", "--nb_classes", "5", "--num_frames", "8",
            "--input_size", "32", "--short_side_size", "32", "--tubelet_size", "2",
            "--model_kwargs", '{"embed_dim": 48, "depth": 2, "num_heads": 3}']
PT_FLAGS = ["--model", "pretrain_videomae_small_patch16_224", "--num_frames", "8", "--input_size", "32",
            "--tubelet_size", "2", "--mask_ratio", "0.75", "--decoder_depth", "2", "--sampler_heads", "3",
            "--model_kwargs", '{"encoder_embed_dim": 48, "encoder_depth": 2, "encoder_num_heads": 3, '
                              '"decoder_embed_dim": 24, "decoder_num_heads": 3}']


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter away from its init: fan-in-scaled weights, N(0, .2) biases / tokens, LN weights 1 +- .2."""
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name in norm_weights:
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2 and p.shape[0] > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def save_run(tmp: Path, program, flags: list[str], kind: str, seed: int, ema: bool = False):
    """Build through the program, randomise, save as the program does; returns (model, checkpoint path)."""
    args = program.get_args_parser().parse_args(flags + ["--output_dir", str(tmp)])
    build = create_pretrain_model if kind == "pretrain" else create_classifier
    model = randomise_(build(args), seed)
    extra = {"kind": kind, "model_name": args.model}
    if kind == "pretrain":
        extra.update(mask_type=model.mask_type, mask_ratio=args.mask_ratio)
    ema_model = randomise_(build(args), seed + 1) if ema else None
    (path,) = checkpointing.save_checkpoint(args, 0, model, None, None, 0, extra=extra, model_ema=ema_model, tag="best")
    return model, path


def clip(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / ours.abs().max())


def load_hf(transformers, folder: str, arch: str):
    model, info = getattr(transformers, arch).from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    data = tmp / "data"
    data.mkdir()
    (data / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(CLASSES)))
    model, path = save_run(tmp, run_class_finetuning, FT_FLAGS + ["--data_path", str(data), "--update_freq", "2"],
                           "finetune", 1)
    result = export_hf.export(path, str(tmp / "hf"))
    return model, path, result


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pt")
    model, path = save_run(tmp, run_mae_pretraining, PT_FLAGS + ["--mask_type", "adaptive"], "pretrain", 2)
    result = export_hf.export(path, str(tmp / "hf"))
    return model, path, result


# ------------------------------------------------------------------------------------------------------------
# Export -> transformers parity
# ------------------------------------------------------------------------------------------------------------

def test_classifier_export_matches_transformers(classifier_run, transformers):
    model, _, result = classifier_run
    folder = Path(result.out_dir)
    assert result.architecture == "VideoMAEForVideoClassification"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}  # the run's data_path/classes.txt
    assert cfg["use_mean_pooling"] and cfg["layer_norm_eps"] == 1e-6 and cfg["num_frames"] == 8
    card = (folder / "README.md").read_text()
    assert "vit_small_patch16_224" in card and "export_hf.py" in card and "eps 1e-5" in card
    assert "x 2 accumulation steps" in card  # the saved --update_freq

    hf = load_hf(transformers, str(folder), "VideoMAEForVideoClassification")
    x = clip()
    with torch.no_grad():
        ours = model(x)
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits
        hf.fc_norm.eps = 1e-6  # what the model was trained with
        theirs_same_eps = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits
    diff, diff_same_eps = rel(ours, theirs), rel(ours, theirs_same_eps)
    print(f"\nclassifier logits: max|diff|/max|ours| {diff:.2e} with HF's fc_norm eps 1e-5, {diff_same_eps:.2e} "
          f"with 1e-6 (max |logit| {float(ours.abs().max()):.2f}; export-time check {result.parity})")
    assert diff < TOL and diff_same_eps < 1e-6
    assert result.parity["relative"] < TOL


@pytest.mark.parametrize("height,width", [(32, 38), (32, 33), (32, 35), (40, 48)])
def test_preprocessor_config_is_our_eval_transform(classifier_run, transformers, height, width):
    """Frames at the short side (32): the same pixels, mean/std and crop as our EvalTransform, to float rounding,
    when long - crop is even (38: 6) or 1 mod 4 (33: 1). At 3 mod 4 (35: 3) HF's centre crop floors 1.5 to 1 where
    ours, like VideoMAE's CenterCrop, rounds it to 2: the same pixels one column apart. Larger frames (40 x 48):
    the same sizes, but PIL antialiases the shrink and ours, like VideoMAE's OpenCV resize, does not
    (hf_model_card.PREPROCESSOR_NOTE, also in the model card)."""
    from video_transforms import EvalTransform
    proc = transformers.VideoMAEImageProcessor.from_pretrained(classifier_run[2].out_dir)
    gen = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (8, height, width, 3), dtype=torch.uint8, generator=gen)
    theirs = proc(list(frames.permute(0, 3, 1, 2)), return_tensors="pt").pixel_values[0]  # [T, C, H, W]
    ours = EvalTransform(short_side_size=32, crop_size=32)(frames).permute(1, 0, 2, 3)
    assert theirs.shape == ours.shape == (8, 3, 32, 32)
    if width == 35:
        ours, theirs = ours[..., :-1], theirs[..., 1:]
    diff = float((ours - theirs).abs().max())
    print(f"\npreprocessor, {height}x{width} frames: max |ours - HF| {diff:.2e} (normalised units)")
    assert (diff < 1e-4) is (height == 32)
    assert hf_model_card.PREPROCESSOR_NOTE in (Path(classifier_run[2].out_dir) / "README.md").read_text()


@pytest.mark.parametrize("pooling", ["cls"])
def test_use_cls_classifier_export_matches_transformers(tmp_path, transformers, pooling):
    model, path = save_run(tmp_path, run_class_finetuning, FT_FLAGS + ["--use_cls"], "finetune", 4)
    result = export_hf.export(path, str(tmp_path / "hf"), verify=False)
    assert result.config["use_mean_pooling"] is False
    hf = load_hf(transformers, result.out_dir, "VideoMAEForVideoClassification")
    x = clip(1)
    with torch.no_grad():
        diff = rel(model(x), hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits)
    print(f"\n--use_cls classifier logits: max|diff|/max|ours| {diff:.2e} (no eps difference on this path)")
    assert diff < 1e-6


@pytest.mark.parametrize("mask_type", ["tube", "adaptive"])
def test_pretraining_export_matches_transformers(tmp_path, adaptive_run, transformers, mask_type):
    if mask_type == "adaptive":
        model, _, result = adaptive_run
    else:
        model, path = save_run(tmp_path, run_mae_pretraining, PT_FLAGS + ["--mask_type", "tube"], "pretrain", 5)
        result = export_hf.export(path, str(tmp_path / "hf"), verify=False)
    folder = Path(result.out_dir)
    assert result.architecture == "VideoMAEForPreTraining"
    assert (folder / hf_interop.SAMPLER_FILE).is_file() == (mask_type == "adaptive")
    if mask_type == "adaptive":
        assert "no Hugging Face counterpart" in (folder / "README.md").read_text()
    hf = load_hf(transformers, str(folder), "VideoMAEForPreTraining")
    x = clip(2)
    mask = MaskGenerator("tube", model.grid_size, 0.75)(2, x.device, torch.rand(2, 4, generator=torch.Generator()
                                                                                .manual_seed(0)))
    with torch.no_grad():
        ours = model(x, mask=mask).pred
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits
        hf.decoder.norm.eps = 1e-6
        theirs_same_eps = hf(pixel_values=x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits
    diff, diff_same_eps = rel(ours, theirs), rel(ours, theirs_same_eps)
    print(f"\n{mask_type} pre-training predictions ({int(mask[0].sum())}/{mask.shape[1]} masked): "
          f"max|diff|/max|ours| {diff:.2e} with HF's decoder-norm eps 1e-5, {diff_same_eps:.2e} with 1e-6")
    assert ours.shape == theirs.shape and diff < TOL and diff_same_eps < 1e-6


def test_encoder_only_export_matches_transformers(tmp_path, adaptive_run, transformers):
    model, path, _ = adaptive_run
    result = export_hf.export(path, str(tmp_path / "enc"), encoder_only=True)
    assert result.architecture == "VideoMAEModel" and not (tmp_path / "enc" / hf_interop.SAMPLER_FILE).exists()
    hf = load_hf(transformers, result.out_dir, "VideoMAEModel")
    x = clip(3)
    with torch.no_grad():
        diff = rel(export_hf.encoder_tokens(model, "pretrain", x), hf(pixel_values=x.permute(0, 2, 1, 3, 4))
                   .last_hidden_state)
    assert diff < 1e-6 and result.parity["relative"] < 1e-6


# ------------------------------------------------------------------------------------------------------------
# Import: round trip, --finetune, run_mae_vis
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("run", ["classifier_run", "adaptive_run"])
def test_round_trip_is_key_for_key_exact(run, request):
    model, _, result = request.getfixturevalue(run)
    back = read_checkpoint(result.out_dir)["model"]
    ours = model.state_dict()
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours), [k for k in ours if not torch.equal(back[k], ours[k])]


def test_folder_saved_by_transformers_reads_back(classifier_run, transformers, tmp_path):
    """transformers' own layout (5.x: ``query.bias`` / ``value.bias``), in memory and as ``save_pretrained``
    writes it, maps back to exactly our weights."""
    model, _, result = classifier_run
    hf = load_hf(transformers, result.out_dir, "VideoMAEForVideoClassification")
    ours = model.state_dict()
    in_memory = hf_interop.from_hf_state_dict(hf.state_dict())
    hf.save_pretrained(tmp_path / "resaved")
    resaved = read_checkpoint(str(tmp_path / "resaved"))["model"]
    for back in (in_memory, resaved):
        assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_hf_folder_in_finetune_gives_the_same_logits(classifier_run):
    model, _, result = classifier_run
    args = run_class_finetuning.get_args_parser().parse_args(FT_FLAGS)
    fresh = create_classifier(args).eval()
    report = load_pretrained_encoder(fresh, result.out_dir, require_head=True, verbose=False)
    assert report.head_loaded and not report.missing and not report.unexpected
    assert any("Hugging Face" in n for n in report.notes) and report.source == result.out_dir
    x = clip(4)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_hf_pretraining_folder_in_finetune_loads_the_encoder(adaptive_run):
    model, _, result = adaptive_run
    fresh = create_classifier(run_class_finetuning.get_args_parser().parse_args(FT_FLAGS))
    report = load_pretrained_encoder(fresh, result.out_dir, verbose=False)
    assert {"pre-training decoder", "AdaMAE sampler"} <= set(report.dropped.values())
    pre = model.state_dict()
    assert all(torch.equal(v, pre["encoder." + k]) for k, v in fresh.state_dict().items()
               if k.startswith(("patch_embed.", "blocks.")))


@pytest.mark.parametrize("with_args", [True, False])
def test_run_mae_vis_builds_the_model_from_an_hf_folder(adaptive_run, tmp_path, with_args):
    """With adamae_args.json the adaptive model comes back whole; without it (a plain HF folder) the settings
    are derived from config.json and the model is shown with a tube mask."""
    model, _, result = adaptive_run
    folder = Path(result.out_dir)
    if not with_args:
        plain = tmp_path / "plain"
        plain.mkdir()
        for name in ("config.json", "model.safetensors"):
            (plain / name).write_bytes((folder / name).read_bytes())
        folder = plain
    args = run_mae_vis.get_args_parser().parse_args(["--checkpoint", str(folder), "--video", "x.mp4",
                                                     "--output_dir", str(tmp_path)])
    ckpt = run_mae_vis.read_model_checkpoint(args.checkpoint)
    cfg = run_mae_vis.resolve_config(args, ckpt)
    vis_model = run_mae_vis.build_model(cfg, ckpt["model"])
    assert cfg["mask_type"] == ("adaptive" if with_args else "tube") and cfg["num_frames"] == 8
    assert cfg["mask_ratio"] == (0.75 if with_args else 0.9)  # a plain folder is VideoMAE's, not AdaMAE's 0.95
    expected = {k: v for k, v in model.state_dict().items()
                if with_args or not k.startswith(run_mae_vis.SAMPLER_PREFIXES)}
    got = vis_model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------

def test_finetune_on_a_truncated_checkpoint_names_it(classifier_run, tmp_path):
    data = Path(classifier_run[1]).read_bytes()
    cut = tmp_path / "checkpoint-cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    fresh = create_classifier(run_class_finetuning.get_args_parser().parse_args(FT_FLAGS))
    with pytest.raises(checkpointing.CheckpointError, match=f"checkpoint {cut} is truncated or unreadable"):
        load_pretrained_encoder(fresh, str(cut), verbose=False)


def test_export_refuses_bad_input_with_one_line(classifier_run, tmp_path, capsys):
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    cases = {str(not_ckpt): "truncated or unreadable", str(tmp_path / "missing.pth"): "does not exist"}
    for path, reason in cases.items():
        assert export_hf.main([path, str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and path in err and reason in err, err
    # --use_ema without EMA weights; a learnable position table HF cannot express
    assert export_hf.main([classifier_run[1], str(tmp_path / "out"), "--use_ema"]) == 2
    assert "model_ema" in capsys.readouterr().err
    _, learnable = save_run(tmp_path, run_class_finetuning, FT_FLAGS + ["--use_learnable_pos_emb"], "finetune", 6)
    assert export_hf.main([learnable, str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and learnable in err and "learnable position" in err, err
    assert not os.path.exists(tmp_path / "out2" / "model.safetensors")


def test_export_uses_ema_weights_when_asked(tmp_path):
    model, path = save_run(tmp_path, run_class_finetuning, FT_FLAGS, "finetune", 7, ema=True)
    export_hf.export(path, str(tmp_path / "hf"), use_ema=True, verify=False)
    ema = torch.load(path, map_location="cpu", weights_only=False)["model_ema"]
    back = read_checkpoint(str(tmp_path / "hf"))["model"]
    assert all(torch.equal(back[k], ema[k]) for k in ema) and not torch.equal(back["head.weight"],
                                                                              model.head.weight)


def test_hf_pretraining_config_without_saved_args_is_videomae_tube():
    """A hub VideoMAEForPreTraining folder (no adamae_args.json) imports with VideoMAE's tube mask and its
    config's mask ratio, else 0.9; AdaMAE sampler weights beside it make it adaptive (pre-training's ratio)."""
    cfg = {"hidden_size": 48, "intermediate_size": 192, "decoder_hidden_size": 24, "decoder_intermediate_size": 96}
    assert {k: hf_interop.hf_config_to_args(cfg, pretrain=True)[k] for k in ("mask_type", "mask_ratio")} == \
        {"mask_type": "tube", "mask_ratio": 0.9}
    assert hf_interop.hf_config_to_args({**cfg, "mask_ratio": 0.8}, pretrain=True)["mask_ratio"] == 0.8
    adaptive = hf_interop.hf_config_to_args(cfg, pretrain=True, sampler=True)
    assert adaptive["mask_type"] == "adaptive" and "mask_ratio" not in adaptive
    assert "mask_type" not in hf_interop.hf_config_to_args(cfg)  # a classifier has no mask


def test_truncated_hf_weights_are_a_checkpoint_error_naming_the_file(adaptive_run, tmp_path):
    """safetensors' SafetensorError (neither OSError nor ValueError) used to escape as a traceback from
    --finetune, run_mae_vis.py, extract_features and the probes."""
    for name in ("model.safetensors", hf_interop.SAMPLER_FILE):
        folder = tmp_path / name
        folder.mkdir()
        for f in Path(adaptive_run[2].out_dir).iterdir():
            data = f.read_bytes()
            (folder / f.name).write_bytes(data[: len(data) // 2] if f.name == name else data)
        with pytest.raises(checkpointing.CheckpointError, match=f"{folder / name} is truncated or unreadable"):
            read_checkpoint(str(folder))
        with pytest.raises(checkpointing.CheckpointError, match=f"{folder / name} is truncated or unreadable"):
            run_mae_vis.read_model_checkpoint(str(folder))


@pytest.mark.parametrize("content,needle", [(b"0 up\n1 \xff\xfe\n2 circle\n3 static\n4 grow\n", "is not UTF-8 text"),
                                            (b"up\ndown\nup\nstatic\ndown\n",
                                             "repeats 'down', 'up' (ids 1, 4; 0, 2)")])
def test_export_refuses_bad_class_names_files(classifier_run, tmp_path, capsys, content, needle):
    names = tmp_path / "classes.txt"
    names.write_bytes(content)
    assert export_hf.main([classifier_run[1], str(tmp_path / "out"), "--class_names", str(names), "--no_verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(names) in err and needle in err, err
    assert not (tmp_path / "out").exists()


def test_export_fails_when_transformers_disagrees(classifier_run, transformers, tmp_path, monkeypatch, capsys):
    """The parity check is a check: a folder whose HF output is off (here: a perturbed classifier weight, as a
    wrong key mapping would give) fails the export, exit status 2 and a message saying so."""
    real = hf_interop.to_hf_state_dict

    def perturbed(*a, **k):
        sd = real(*a, **k)
        sd["classifier.weight"] = sd["classifier.weight"] + 1.0
        return sd

    monkeypatch.setattr(hf_interop, "to_hf_state_dict", perturbed)
    assert export_hf.main([classifier_run[1], str(tmp_path / "out")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]  # not HF's progress bar
    assert len(errors) == 1 and "parity check failed" in errors[0] and "not a faithful export" in errors[0], errors
    assert not any((tmp_path / "out" / f).exists() for f in ("config.json", "model.safetensors"))  # nothing loadable
    assert export_hf.PARITY_TOL == 1e-3 and classifier_run[2].parity["relative"] < 1e-5  # the real export: far below


def test_an_hf_folders_weights_file_reads_as_the_folder(classifier_run):
    """--finetune hf/model.safetensors read the bare HF-named tensors ('28 missing' encoder weights): it is the
    folder's weights, which its config.json describes, so it reads as the folder."""
    from checkpoint_loading import checkpoint_files

    folder = classifier_run[2].out_dir
    weights = os.path.join(folder, "model.safetensors")
    a, b = read_checkpoint(folder), read_checkpoint(weights)
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert checkpoint_files(weights) == checkpoint_files(folder)
    report = load_pretrained_encoder(copy.deepcopy(classifier_run[0]), weights, require_head=True, verbose=False)
    assert report.head_loaded and report.missing == []
