"""Visualisation (issue #6): run_mae_vis.py on real videos, the panels' contents, and TensorBoard logging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mask_visualization as mv  # noqa: E402
import modeling_pretrain  # noqa: E402,F401
import run_mae_vis  # noqa: E402
from losses import pixel_targets, unnormalize  # noqa: E402
from metric_logging import TensorboardLogger  # noqa: E402
from token_ops import gather_tokens, masked_indices  # noqa: E402

TINY = dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32, decoder_num_heads=4)
FRAMES, SIZE, RATIO, TUBELET, PATCH = 8, 32, 0.75, 2, 16
CELL = mv.panel_scale(SIZE, SIZE, 128) * SIZE  # 32 px panels are upscaled 4x to 128


def tiny_model(mask_type: str = "adaptive", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("pretrain_videomae_small_patch16_224", mask_type=mask_type, mask_ratio=RATIO,
                             num_frames=FRAMES, img_size=SIZE, decoder_depth=1, **TINY)


def run_args(mask_type: str) -> dict:
    """What run_mae_pretraining saves as ``args`` (the subset the visualiser reads, plus noise)."""
    return dict(model="pretrain_videomae_small_patch16_224", mask_type=mask_type, mask_ratio=RATIO,
                num_frames=FRAMES, input_size=SIZE, tubelet_size=TUBELET, decoder_depth=1, sampling_rate=2,
                model_kwargs=TINY, sampler_type="mha", sampler_depth=1, sampler_dim=None, sampler_heads=8,
                sampler_temperature=1.0, normalize_target=True, lr=1e-3, batch_size=4)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("vis_ckpts")
    paths = {}
    for mask_type in ("adaptive", "tube"):
        sd = tiny_model(mask_type).state_dict()
        paths[mask_type] = str(d / f"{mask_type}.pth")
        torch.save({"model": sd, "args": run_args(mask_type), "kind": "pretrain",
                    "model_name": "pretrain_videomae_small_patch16_224", "mask_type": mask_type}, paths[mask_type])
    # released AdaMAE layout: only the state_dict (here also wrapped in DDP's "module." prefix)
    sd = tiny_model("adaptive").state_dict()
    paths["bare"] = str(d / "bare.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, paths["bare"])
    return paths


def cli_args(ckpt: str, videos: list[str], out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", ckpt, "--video", *videos, "--output_dir", str(out), "--device", "cpu", *extra]


def real_clip(video_dir: str) -> torch.Tensor:
    cfg = {"num_frames": FRAMES, "sampling_rate": 2, "input_size": SIZE}
    return run_mae_vis.load_clip(os.path.join(video_dir, "h264_64x48.mp4"), cfg)[0]


def test_cli_adaptive_writes_gif_png_and_stats(ckpts, video_dir, tmp_path):
    video = os.path.join(video_dir, "h264_64x48.mp4")
    proc = subprocess.run([sys.executable, str(ROOT / "run_mae_vis.py"), *cli_args(ckpts["adaptive"], [video],
                                                                                    tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "entropy" in proc.stdout and "uniform random mask" in proc.stdout
    with Image.open(tmp_path / "h264_64x48.gif") as gif:
        assert gif.n_frames == FRAMES  # one GIF frame per input frame
        assert gif.size == mv.sheet_size(1, CELL, CELL)
    with Image.open(tmp_path / "h264_64x48.png") as png:
        assert png.size == mv.sheet_size(FRAMES // TUBELET, CELL, CELL)  # a row per tubelet, 5 panels each
    stats = json.loads((tmp_path / "stats.json").read_text())
    (clip,) = stats["clips"]
    assert stats["failed"] == [] and stats["config"]["mask_type"] == "adaptive"
    assert 0 < clip["entropy"] <= 1 and clip["uniform_max_prob"] <= clip["max_prob"] <= 1
    assert 0 <= clip["motion_coverage"] <= 1 and 0.05 < clip["random_coverage"] < 0.4
    assert clip["num_visible"] == 4 and clip["num_tokens"] == 16
    assert clip["frames"] == [12, 14, 16, 18, 20, 22, 24, 26]  # centre start of 40 frames at stride 2


def test_bare_checkpoint_list_file_and_sheet_layout(ckpts, video_dir, tmp_path):
    video = os.path.join(video_dir, "h264_64x48.mp4")
    lst = tmp_path / "videos.csv"
    lst.write_text(f"{video} 0\n{video} 1\n")
    out = tmp_path / "out"
    # released layout: no saved args, so the settings come from the flags; decoder depth and tubelet from weights
    args = run_mae_vis.get_args_parser().parse_args(cli_args(
        ckpts["bare"], [str(lst)], out, "--model", "pretrain_videomae_small_patch16_224", "--model_kwargs",
        json.dumps(TINY), "--num_frames", str(FRAMES), "--input_size", str(SIZE), "--mask_ratio", str(RATIO),
        "--sampling_rate", "2", "--video_backend", "pyav", "--sheet_frames", "all"))
    result = run_mae_vis.main(args)
    assert [c["name"] for c in result["clips"]] == ["h264_64x48", "h264_64x48_1"]
    assert result["config"]["mask_type"] == "adaptive" and result["config"]["decoder_depth"] == 1
    a, b = result["clips"]
    assert a["entropy"] == b["entropy"] and a["motion_coverage"] == b["motion_coverage"]  # fixed seed

    # the contact sheet holds exactly the panels, in order Video | Prediction | Error | CAT | Mask
    model = tiny_model("adaptive")
    panels = mv.panel_images(model, real_clip(video_dir), seed=0)[0]
    assert panels["entropy"] == pytest.approx(a["entropy"], abs=1e-6)
    sheet = np.asarray(Image.open(out / "h264_64x48.png").convert("RGB"))
    assert sheet.shape[:2][::-1] == mv.sheet_size(FRAMES, CELL, CELL)
    scale = CELL // SIZE
    for row in (0, FRAMES - 1):
        for col, key in enumerate(mv.PANEL_KEYS):
            x0, y0, x1, y1 = mv.cell_box(row, col, CELL, CELL)
            expected = panels[key][row].repeat(scale, 0).repeat(scale, 1)
            np.testing.assert_array_equal(sheet[y0:y1, x0:x1], expected, err_msg=f"row {row} {key}")


def test_prediction_equals_input_on_visible_patches(video_dir):
    model = tiny_model("adaptive")
    videos = real_clip(video_dir).repeat(2, 1, 1, 1, 1)
    with torch.no_grad():
        out = model(videos)
    pred, _, mask = out
    input01 = unnormalize(videos).clamp(0, 1)
    for normalize_target in (True, False):
        rec = mv.reconstruct_clip(videos, pred, out.masked_idx, PATCH, TUBELET, normalize_target)
        assert rec.shape == videos.shape and rec.min() >= 0 and rec.max() <= 1
        visible = mv.tokens_to_pixels((~mask).float(), model.grid_size, PATCH, TUBELET).bool()[:, None]
        visible = visible.expand_as(rec)
        torch.testing.assert_close(rec[visible], input01[visible], atol=1e-6, rtol=0)
        assert not torch.allclose(rec[~visible], input01[~visible], atol=1e-2)  # an untrained decoder
        # a perfect prediction of the (normalised) target de-normalises back to the input everywhere
        idx = masked_indices(mask, pred.shape[1])  # from the mask alone, independently of the model's
        target = gather_tokens(pixel_targets(videos, PATCH, TUBELET, normalize_target), idx)
        perfect = mv.reconstruct_clip(videos, target, idx, PATCH, TUBELET, normalize_target)
        torch.testing.assert_close(perfect, input01, atol=1e-4, rtol=0)


def test_no_leak_panel_uses_nothing_of_the_masked_tubelets(video_dir):
    """The Prediction panel borrows each masked tubelet's own mean and std (VideoMAE's picture: too good); the No
    leak panel must not depend on the masked pixels at all. Two clips that differ only under the mask give the
    same No leak panel and different Prediction panels; with raw-pixel targets the two panels are one."""
    model = tiny_model("tube")
    a = real_clip(video_dir)
    mask = torch.from_numpy(~mv.panel_images(model, a, seed=0)[0]["visible"])[None]
    masked_px = mv.tokens_to_pixels(mask.float(), model.grid_size, PATCH, TUBELET).bool()[:, None]
    b = torch.where(masked_px, torch.randn(a.shape, generator=torch.Generator().manual_seed(5)), a)
    pa, pb = (mv.panel_images(model, x, mask=mask)[0] for x in (a, b))
    assert np.array_equal(pa["no_leak"], pb["no_leak"])
    assert not np.array_equal(pa["prediction"], pb["prediction"])
    assert not np.array_equal(pa["no_leak"], pa["prediction"])
    assert pa["pixel_error"] >= 0 and pa["pixel_error_no_leak"] >= 0
    raw = mv.panel_images(model, a, mask=mask, normalize_target=False)[0]
    assert np.array_equal(raw["no_leak"], raw["prediction"]) and raw["pixel_error"] == raw["pixel_error_no_leak"]
    # a perfect prediction of normalised targets: the leak picture is the input; without the leak it is close
    out = model(a, mask)
    target = gather_tokens(pixel_targets(a, PATCH, TUBELET, True), out.masked_idx)
    input01 = unnormalize(a).clamp(0, 1)
    leak, no_leak = (mv.reconstruct_clip(a, target, out.masked_idx, PATCH, TUBELET, True, leak_free=f)
                     for f in (False, True))
    assert float((leak - input01).abs().max()) < 1e-4 < float((no_leak - input01).abs().max())


def test_cat_maps_sum_to_one_and_tube_has_none(video_dir):
    videos = torch.cat([real_clip(video_dir), torch.randn(1, 3, FRAMES, SIZE, SIZE) * 0.5])
    model = tiny_model("adaptive")
    model.train()
    for clip in mv.panel_images(model, videos, seed=3):
        cat = clip["cat_values"]
        assert cat.shape == (FRAMES, SIZE, SIZE) and clip["cat"].shape == (FRAMES, SIZE, SIZE, 3)
        assert cat.sum() / (TUBELET * PATCH * PATCH) == pytest.approx(1.0, abs=1e-4)
        assert clip["probs"].sum() == pytest.approx(1.0, abs=1e-5)
        assert clip["max_prob"] == pytest.approx(float(clip["probs"].max()))
        # the brightest colour of the map is the most likely token
        t, y, x = np.unravel_index(np.argmax(cat), cat.shape)
        assert tuple(clip["cat"][t, y, x]) == tuple(mv.COLORMAPS[mv.CAT_CMAP][-1])
        # visible tokens are shown in the Mask panel, masked ones are black
        vis = mv.tokens_to_pixels(torch.as_tensor(clip["visible"], dtype=torch.float32)[None],
                                  model.grid_size, PATCH, TUBELET)[0].numpy().astype(bool)
        assert (clip["mask"][~vis] == 0).all()
        np.testing.assert_array_equal(clip["mask"][vis], clip["video"][vis])
        assert (clip["error_values"][vis] == 0).all() and (clip["error_values"][~vis] > 0).all()
    assert model.training  # the train/eval flag is restored

    tube = mv.panel_images(tiny_model("tube"), videos, seed=3)
    for clip in tube:
        assert clip["cat"] is None and clip["entropy"] is None and clip["max_prob"] is None
        vis = clip["visible"].reshape(FRAMES // TUBELET, -1)
        assert (vis == vis[:1]).all()  # a tube: the same spatial mask in every time slice


def test_cli_tube_checkpoint_marks_cat_na(ckpts, video_dir, tmp_path):
    args = run_mae_vis.get_args_parser().parse_args(cli_args(
        ckpts["tube"], [os.path.join(video_dir, "h264_64x48.mp4")], tmp_path))
    result = run_mae_vis.main(args)
    (clip,) = result["clips"]
    assert clip["mask_type"] == "tube" and clip["entropy"] is None and clip["num_visible"] == 4
    sheet = np.asarray(Image.open(tmp_path / "h264_64x48.png").convert("RGB"))
    x0, y0, x1, y1 = mv.cell_box(0, mv.PANEL_KEYS.index("cat"), CELL, CELL)
    assert tuple(sheet[y0 + 2, x0 + 2]) == mv.NA_FILL and tuple(sheet[y1 - 3, x1 - 3]) == mv.NA_FILL
    with Image.open(tmp_path / "h264_64x48.gif") as gif:
        assert gif.n_frames == FRAMES


def test_adaptive_checkpoint_shown_with_tube_mask_and_mismatch_errors(ckpts, video_dir, tmp_path):
    video = os.path.join(video_dir, "h264_64x48.mp4")
    parser = run_mae_vis.get_args_parser()
    result = run_mae_vis.main(parser.parse_args(cli_args(ckpts["adaptive"], [video], tmp_path, "--mask_type",
                                                         "tube")))
    assert result["clips"][0]["mask_type"] == "tube"
    with pytest.raises(run_mae_vis.VisError, match="does not fit"):  # sampler table sized for 8 frames
        run_mae_vis.main(parser.parse_args(cli_args(ckpts["adaptive"], [video], tmp_path, "--num_frames", "4")))
    with pytest.raises(run_mae_vis.VisError, match="sampler"):
        run_mae_vis.main(parser.parse_args(cli_args(ckpts["tube"], [video], tmp_path, "--mask_type", "adaptive")))


def test_corrupt_and_missing_videos_give_a_clear_error(ckpts, video_dir, tmp_path, capsys):
    garbage = os.path.join(video_dir, "garbage.mp4")
    missing = os.path.join(video_dir, "no_such_video.mp4")
    good = os.path.join(video_dir, "h264_64x48.mp4")
    # cli() is what `python run_mae_vis.py` runs (its exit status); in-process to spare a second interpreter
    assert run_mae_vis.cli(cli_args(ckpts["adaptive"], [garbage, missing, good], tmp_path)) == 1
    err = capsys.readouterr().err
    assert "garbage.mp4" in err and "no_such_video.mp4" in err and "file not found" in err
    assert (tmp_path / "h264_64x48.gif").is_file()  # the readable video is still rendered
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [Path(f["video"]).name for f in stats["failed"]] == ["garbage.mp4", "no_such_video.mp4"]
    assert run_mae_vis.cli(cli_args(str(tmp_path / "missing.pth"), [good], tmp_path)) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_log_mask_images_writes_tensorboard_image(video_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_model("adaptive")
    model.train()
    model.decoder.eval()  # a deliberately frozen part must stay in eval mode
    videos = torch.cat([real_clip(video_dir)] * 3)
    logger = TensorboardLogger(str(tmp_path / "tb"))
    rng = torch.get_rng_state()
    img = mv.log_mask_images(logger, model, videos, step=7, max_clips=2)
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG stream is untouched
    assert model.training and model.encoder.training and not model.decoder.training
    assert img.dtype == np.uint8 and img.shape[1] == mv.sheet_size(2, 96, 96)[0]
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "vis/masks" in acc.Tags()["images"]
    (event,) = acc.Images("vis/masks")
    assert event.step == 7 and (event.width, event.height) == (img.shape[1], img.shape[0])
    assert mv.log_mask_images(TensorboardLogger(None), model, videos, step=8) is None  # not rank 0: no work


def test_error_panel_scores_the_checkpoints_loss_type(video_dir, tmp_path):
    """An --loss_type l1 run's Error panel and reconstruction_error are its L1 loss (they were always MSE)."""
    sd = tiny_model("adaptive").state_dict()
    ckpt = tmp_path / "l1.pth"
    torch.save({"model": sd, "args": {**run_args("adaptive"), "loss_type": "l1"}, "kind": "pretrain"}, ckpt)
    video = os.path.join(video_dir, "h264_64x48.mp4")
    result = run_mae_vis.main(run_mae_vis.get_args_parser().parse_args(cli_args(str(ckpt), [video],
                                                                                tmp_path / "out")))
    assert result["config"]["loss_type"] == "l1"
    clip = real_clip(video_dir)
    l1, mse = (mv.panel_images(tiny_model("adaptive"), clip, seed=0, loss_type=k)[0] for k in ("l1", "mse"))
    got = result["clips"][0]["reconstruction_error"]
    assert got == pytest.approx(l1["reconstruction_error"], rel=1e-5)
    assert got != pytest.approx(mse["reconstruction_error"], rel=1e-2)
