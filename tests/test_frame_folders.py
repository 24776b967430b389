"""Videos stored as folders of frame images (``frame_folders``): read like the video they came from, in the
datasets and programs, made by ``tools/prepare_videos.py --format frames``, and every fault named."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import coded_frames, frame_code, run_main
from PIL import Image
from test_datasets import args_for
from test_prepare_videos import decoded_count, run_tool

import datasets as D
from video_io import VideoDecodeError, open_video, read_frames


def write_folder(folder, frames: np.ndarray, name: str = "img_{:05d}.png", first: int = 1, **save) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(os.path.join(folder, name.format(first + i)), **save)
    return str(folder)


def lossless_copy(video: str, folder) -> str:
    """The video's decoded frames as PNG images: the folder must read back exactly as the video does."""
    with open_video(video, "pyav") as r:
        return write_folder(folder, r.get_batch(range(len(r))))


@pytest.mark.parametrize("name", ["h264_64x48.mp4", "vp9_64x48.webm", "h264_96x128.mp4"])
def test_folder_reads_like_its_video(video_dir, tmp_path, name):
    video = os.path.join(video_dir, name)
    folder = lossless_copy(video, tmp_path / "f")
    with open_video(video) as v, open_video(folder) as f:
        assert f.backend == "frames" and len(f) == len(v) and f.frame_size() == tuple(v.frame_size())
        n, (h, w) = len(v), v.frame_size()
        for idx in ([n - 1, 0, n // 2, n // 2, 1], list(range(n))):
            np.testing.assert_array_equal(f.get_batch(idx), v.get_batch(idx))
            for region in ((0, 0, h, w), (1, 3, h - 1, w - 3), (h - 5, w - 7, 5, 7)):
                np.testing.assert_array_equal(f.get_batch(idx, region), v.get_batch(idx, region))
        with pytest.raises(ValueError, match="does not fit"):
            f.get_batch([0], (0, 0, h + 1, w))
        with pytest.raises(VideoDecodeError, match="out of range"):
            f.get_batch([n])


def test_frame_order_is_the_number_in_the_name(tmp_path):
    # Unpadded numbers starting anywhere (name order would put frame_10 before frame_9), JPEG decoded as PIL does.
    frames = coded_frames(24, 32, 40)
    folder = write_folder(tmp_path / "f", frames, "frame_{}.jpg", first=7, quality=95)
    (tmp_path / "f" / "notes.txt").write_text("not a frame")
    got = read_frames(folder, [0, 2, 3, 23, 5])
    want = [frame_code(i) for i in (0, 2, 3, 23, 5)]
    assert np.abs(got[:, 2:6, 2:6].reshape(5, -1).mean(1) - want).max() < 4
    pil = np.stack([np.asarray(Image.open(tmp_path / "f" / f"frame_{7 + i}.jpg").convert("RGB")) for i in (0, 23)])
    np.testing.assert_array_equal(read_frames(folder, [0, 23]), pil)
    grey = write_folder(tmp_path / "g", frames[:3, :, :, 0])  # single-channel images come back as RGB
    assert read_frames(grey, [2]).shape == (1, 32, 40, 3)


def test_faulty_folders_name_the_problem(tmp_path):
    frames = coded_frames(6, 16, 16)
    gap = write_folder(tmp_path / "gap", frames)
    os.remove(os.path.join(gap, "img_00004.png"))
    dup = write_folder(tmp_path / "dup", frames)
    shutil.copy(os.path.join(dup, "img_00002.png"), os.path.join(dup, "img_2.png"))
    corrupt = write_folder(tmp_path / "corrupt", frames, "img_{:05d}.jpg")
    with open(os.path.join(corrupt, "img_00003.jpg"), "r+b") as f:
        f.truncate(60)
    resized = write_folder(tmp_path / "resized", frames)
    Image.fromarray(coded_frames(1, 16, 20)[0]).save(os.path.join(resized, "img_00005.png"))
    os.makedirs(tmp_path / "empty")
    dup_and_gap = write_folder(tmp_path / "dup_and_gap", frames)  # one repeated, one missing: the count fits
    os.remove(os.path.join(dup_and_gap, "img_00004.png"))
    shutil.copy(os.path.join(dup_and_gap, "img_00002.png"), os.path.join(dup_and_gap, "thumb_00002.png"))
    for folder, message in ((gap, r"numbered 1\.\.6 miss numbers \[4\]"), (dup, "same number"),
                            (dup_and_gap, "same number"), (str(tmp_path / "empty"), "no frame images")):
        with pytest.raises(VideoDecodeError, match=message) as e:
            open_video(folder)
        assert e.value.path == folder
    with open_video(corrupt) as r:
        r.get_batch([0, 1])
        with pytest.raises(VideoDecodeError, match="cannot decode img_00003.jpg"):
            r.get_batch([1, 2])
    with open_video(resized) as r:
        with pytest.raises(VideoDecodeError, match="img_00005.png is 16x20, not 16x16 like img_00001.png"):
            r.get_batch([0, 4])


def test_16_bit_png_frames_keep_their_levels(tmp_path):
    """torchvision decodes 16-bit PNGs as uint16: stored into uint8 they wrapped around (a ramp became a saw)."""
    ramp = (np.arange(16 * 16) * 250 + 7).reshape(16, 16).astype(np.uint16)  # not multiples of 257
    folder = tmp_path / "deep"
    folder.mkdir()
    for i in range(1, 3):
        Image.fromarray(ramp).save(folder / f"img_{i:05d}.png")
    frames = read_frames(str(folder), [0, 1])
    assert frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[0, ..., 0], (ramp >> 8).astype(np.uint8))


def test_videomae_v2_raw_frame_lists(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("clips/a 48 3\nclips/b 30 1\n")  # fine-tuning: folder total_frames label
    recs = D.read_list_file(str(lst), data_root="/r")
    assert [(r.full_path, r.label) for r in recs] == [("/r/clips/a", 3), ("/r/clips/b", 1)]
    lst.write_text("clips/a 1 48\n")  # pre-training: folder start_idx total_frames
    assert [(r.path, r.label) for r in D.read_list_file(str(lst), require_label=False)] == [("clips/a", None)]
    lst.write_text("clips/a x 3\n")
    with pytest.raises(ValueError, match=r"l.txt:1: total_frames 'x' is not an integer"):
        D.read_list_file(str(lst))


def test_datasets_give_the_videos_items(video_dir, tmp_path):
    """Pre-training items (planned crops, decoded region) and test views of a lossless folder copy equal the
    video's; a broken folder is skipped in training and excluded and named in evaluation."""
    names = ["h264_64x48.mp4", "vp9_80x64.webm", "h264_96x128.mp4"]
    folders = [lossless_copy(os.path.join(video_dir, n), tmp_path / n.split(".")[0]) for n in names]
    videos, frames = tmp_path / "videos.csv", tmp_path / "frames.csv"
    videos.write_text("".join(f"{os.path.join(video_dir, n)} {i}\n" for i, n in enumerate(names)))
    frames.write_text("".join(f"{f} {i}\n" for i, f in enumerate(folders)))
    for num_sample in (1, 3):
        a, b = (D.build_pretraining_dataset(args_for(p, num_sample=num_sample, seed=5)) for p in (videos, frames))
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert torch.equal(x.pixels, y.pixels) and torch.equal(x.crops, y.crops)
    for lst in (videos, frames):
        (tmp_path / "test.csv").write_text(lst.read_text())
        ds, _ = D.build_dataset(False, True, args_for(tmp_path, nb_classes=3))
        if lst is videos:
            want = [ds[i][0] for i in range(len(ds))]
        else:
            assert all(torch.equal(ds[i][0], want[i]) for i in range(len(ds)))
    broken = write_folder(tmp_path / "broken", coded_frames(3, 16, 16))
    os.remove(os.path.join(broken, "img_00002.png"))
    (tmp_path / "test.csv").write_text(frames.read_text() + f"{broken} 0\n")
    ds, _ = D.build_dataset(False, True, args_for(tmp_path, nb_classes=3))
    info = ds[len(ds) - 1][-1]
    assert not info["valid"] and info["path"] == broken and "miss numbers [2]" in info["reason"]


def test_prepare_frames_then_pretrain(video_dir, tmp_path):
    """``prepare_videos --format frames`` on H.264, VP9, a corrupt and a missing video, then a pre-training epoch
    on the new list; a rerun skips the finished folders and removes a dead run's temporary folder."""
    import run_mae_pretraining

    src = tmp_path / "src"
    src.mkdir()
    for name in ("h264_64x48.mp4", "vp9_64x48.webm", "garbage.mp4"):
        shutil.copy(os.path.join(video_dir, name), src / name)
    lst = tmp_path / "train.csv"
    lst.write_text("h264_64x48.mp4 0\ngarbage.mp4 1\nvp9_64x48.webm 1\nmissing.mp4 0\n")
    out = tmp_path / "out"
    res = run_tool(str(lst), str(out), "--data_root", str(src), "--format", "frames", "--short_side", "32",
                   "-j", "2", "--bench_videos", "1", "--bench_clips", "2", "--num_frames", "4")
    assert res.returncode == 0, res.stderr
    assert f"{lst}:2: garbage.mp4: undecodable" in res.stdout and f"{lst}:4: missing.mp4: missing" in res.stdout
    assert (out / "train.csv").read_text() == "h264_64x48 0\nvp9_64x48 1\n"
    for name, source in (("h264_64x48", "h264_64x48.mp4"), ("vp9_64x48", "vp9_64x48.webm")):
        files = sorted(os.listdir(out / name))
        assert files == [f"img_{i:05d}.jpg" for i in range(1, decoded_count(str(src / source)) + 1)]
        with Image.open(out / name / files[0]) as im:
            assert (im.format, im.height, im.width) == ("JPEG", 32, 42)
        v = torch.from_numpy(read_frames(str(src / source), [0, 39])).permute(0, 3, 1, 2).float()
        f = torch.from_numpy(read_frames(str(out / name), [0, 39])).permute(0, 3, 1, 2).float()
        small = torch.nn.functional.interpolate(v, size=(32, 42), mode="area")
        assert (small - f).abs().mean() < 6  # the same frames, resized and JPEG-compressed
    stale = out / f"h264_64x48.{2 ** 22 + 1}.tmp"  # a dead run's folder (no such pid)
    stale.mkdir()
    (stale / "img_00001.jpg").write_bytes(b"partial")
    res = run_tool(str(lst), str(out), "--data_root", str(src), "--format", "frames", "--short_side", "32",
                   "--no-bench")
    assert res.returncode == 0 and "2 already done" in res.stdout and "(1 stale" in res.stdout, res.stdout
    assert not stale.exists()
    res = run_tool(str(lst), str(out), "--data_root", str(src), "--short_side", "32", "--no-bench")
    assert res.returncode == 2 and "was prepared with --format frames" in res.stderr

    res = run_main(run_mae_pretraining, [  # in this process, stderr captured: workers must cope (no fileno)
        "--data_path", str(out / "train.csv"), "--data_root", str(out), "--output_dir", str(tmp_path / "run"),
        "--model", "pretrain_videomae_small_patch16_224", "--model_kwargs",
        '{"encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2, "decoder_embed_dim": 16, '
        '"decoder_num_heads": 2}', "--decoder_depth", "1", "--num_frames", "4", "--sampling_rate", "2",
        "--input_size", "32", "--batch_size", "2", "--num_workers", "1", "--epochs", "1", "--warmup_epochs", "0",
        "--mask_ratio", "0.75", "--device", "cpu"])
    assert res.returncode == 0, res.stderr
    log = json.loads((tmp_path / "run" / "log.txt").read_text().splitlines()[-1])
    assert log["epoch"] == 0 and log["broken_videos"] == 0 and np.isfinite(log["train_loss"])


def test_check_dataset_reports_a_broken_folder(tmp_path):
    from tools.check_dataset import check_list

    good = write_folder(tmp_path / "good", coded_frames(6, 16, 16))
    gap = write_folder(tmp_path / "gap", coded_frames(6, 16, 16))
    os.remove(os.path.join(gap, "img_00004.png"))
    lst = tmp_path / "l.txt"
    lst.write_text(f"{good} 0\n{gap} 1\n")
    for full in (False, True):
        report = check_list(str(lst), backend="pyav", nb_classes=2, full=full, progress=False)
        assert report["bad"] == [(2, gap, "undecodable: frame images numbered 1..6 miss numbers [4]")], report


def test_mmaction2_folder_with_flow_images_reads_only_the_rgb_frames(tmp_path):
    """mmaction2's rawframes put flow_x_/flow_y_ images beside img_ ones with the same numbers: they are not frames
    (and used to be rejected as duplicate numbers)."""
    frames = coded_frames(6, 16, 24)
    folder = write_folder(tmp_path / "v", frames)
    for i in range(1, 7):
        for axis in ("x", "y"):
            Image.fromarray(np.full((16, 24), 100, np.uint8)).save(tmp_path / "v" / f"flow_{axis}_{i:05d}.jpg")
    with open_video(folder) as r:
        assert len(r) == 6
        np.testing.assert_array_equal(r.get_batch([0, 5]), frames[[0, 5]])
    for f in (tmp_path / "v").glob("img_*"):
        f.unlink()
    with pytest.raises(VideoDecodeError, match="only optical-flow images"):
        open_video(folder)
