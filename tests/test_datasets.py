"""Lists, temporal sampling, clip transforms, datasets, broken-video handling and DataLoader workers."""
from __future__ import annotations

import argparse
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datasets as D
import frame_sampling as FS
import video_datasets as VD
import video_transforms as VT

MEAN = torch.tensor(VT.IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(VT.IMAGENET_STD).view(3, 1, 1, 1)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def args_for(data_path, **kw):
    p = argparse.ArgumentParser()
    D.add_data_args(p)
    a = p.parse_args(["--data_path", str(data_path)])
    base = dict(data_set="custom", nb_classes=4, num_frames=8, sampling_rate=2, input_size=32, short_side_size=32,
                test_num_segment=2, test_num_crop=3, num_sample=1, seed=None,
                flip=True)  # pre-training's --flip (off by default), on so that both branches are exercised
    base.update(kw)
    for k, v in base.items():
        setattr(a, k, v)
    return a


# ---------------------------------------------------------------------------------------------------- lists
def test_read_list_formats(tmp_path):
    p = write(tmp_path / "a.csv", "path,label\n# comment\n\nvids/a.mp4,3\n/abs/b.mp4,0\n")
    recs = D.read_list_file(p, data_root="/root")
    assert [(r.path, r.full_path, r.label, r.line_no) for r in recs] == [
        ("vids/a.mp4", "/root/vids/a.mp4", 3, 4), ("/abs/b.mp4", "/abs/b.mp4", 0, 5)]
    p = write(tmp_path / "b.csv", "x/a.mp4 1\nx/a.mp4 2\nx/c.webm 0\n")
    recs = D.read_list_file(p)
    assert [r.label for r in recs] == [1, 2, 0]
    assert len({r.video_id for r in recs}) == 3  # repeated path still gets a unique id
    p = write(tmp_path / "c.csv", "x/a.mp4\nx/b.mp4 0 -1\n")  # pre-training: label-free, VideoMAE V2 format
    assert [r.label for r in D.read_list_file(p, require_label=False)] == [None, None]


@pytest.mark.parametrize("text,msg", [
    ("a.mp4 1\nb.mp4 one\n", ":2: label 'one' is not an integer"),
    ("a.mp4 1\nb.mp4 1 2 3 4\n", ":2: expected 'path label'"),
    ("a.mp4 1\n\nb.mp4\n", ":3: missing label"),
])
def test_malformed_line_names_file_and_line(tmp_path, text, msg):
    p = write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError) as e:
        D.read_list_file(p)
    assert str(p) in str(e.value) and msg in str(e.value)


def test_label_out_of_range_names_file_and_line(tmp_path, synthetic_dir):
    p = write(tmp_path / "train.csv", "a.mp4 1\nb.mp4 4\n")
    with pytest.raises(ValueError, match=r"train\.csv:2: label 4 outside \[0, 4\)"):
        D.VideoList(p, nb_classes=4)
    with pytest.raises(ValueError, match="nb_classes"):
        D.build_dataset(True, False, args_for(synthetic_dir, data_set="UCF101", nb_classes=4))
    with pytest.raises(ValueError, match=r"train\.csv:4: label 3 outside \[0, 3\)"):
        D.build_dataset(True, False, args_for(synthetic_dir, nb_classes=3))


# ---------------------------------------------------------------------------------------------------- sampling
def test_temporal_sampling():
    rng = random.Random(0)
    for length in (5, 31, 32, 33, 100, 300):
        for _ in range(20):
            idx = FS.pretrain_indices(length, 16, 2, rng)
            assert len(idx) == 16 and all(0 <= i < length for i in idx)
            assert idx == sorted(idx)
            idx = FS.dense_train_indices(length, 8, 4, rng)
            assert len(idx) == 8 and all(0 <= i < length for i in idx) and idx == sorted(idx)
            idx = FS.segment_train_indices(length, 16, rng)
            assert len(idx) == 16 and all(0 <= i < length for i in idx) and idx == sorted(idx)
    assert FS.pretrain_indices(5, 4, 2, rng) == [0, 2, 4, 4]  # short video: clamped to the last frame
    assert FS.dense_center_indices(100, 8, 4) == FS.dense_center_indices(100, 8, 4)
    assert FS.segment_center_indices(16, 4) == [2, 6, 10, 14]


def test_test_views_cover_video():
    # dense: first view starts at frame 0, last view ends at the last sampled frame, single view is central
    views = [FS.dense_test_indices(100, 8, 4, s, 5) for s in range(5)]
    assert views[0][0] == 0 and views[-1][-1] == 96
    assert all(len(v) == 8 and np.all(np.diff(v) == 4) for v in views)
    starts = [v[0] for v in views]
    assert starts == sorted(starts) and len(set(starts)) == 5
    assert FS.dense_test_indices(100, 8, 4, 0, 1)[0] == 32  # no division by zero, centred
    assert FS.dense_test_indices(10, 8, 4, 1, 2) == [0, 4, 8, 8, 8, 8, 8, 8]  # short video padded
    assert FS.dense_test_indices(305, 16, 4, 7, 8)[0] == 240  # VideoMAE's int(7 * (61 / 7)), not int(7 * 61 / 7)
    # segment (SSv2): views interleave inside each segment
    v0, v1 = FS.segment_test_indices(32, 8, 0, 2), FS.segment_test_indices(32, 8, 1, 2)
    assert v0 == list(range(0, 32, 4)) and v1 == list(range(2, 32, 4))
    assert FS.segment_test_indices(32, 8, 0, 1) == FS.segment_center_indices(32, 8)


# ---------------------------------------------------------------------------------------------------- transforms
def test_multi_scale_crop_params():
    rng = random.Random(0)
    boxes = {VT.multi_scale_crop_params(256, 340, (224, 224), rng=rng) for _ in range(500)}
    sizes = {(h, w) for _, _, h, w in boxes}
    assert sizes <= {(a, b) for a in (224, 192, 168) for b in (224, 192, 168)} | {(256, 224), (224, 256),
                                                                                    (256, 256)}
    assert (256, 168) not in sizes and (168, 256) not in sizes  # |i - j| <= 1
    for top, left, h, w in boxes:
        hs, ws = (256 - h) // 4, (340 - w) // 4
        assert top % hs == 0 if hs else top == 0
        assert left % ws == 0 if ws else left == 0
    assert len({(t, left) for t, left, h, w in boxes if (h, w) == (224, 224)}) == 13


def test_randaugment_consistent_over_frames():
    img = torch.randint(0, 256, (1, 40, 50, 3), dtype=torch.uint8).expand(6, -1, -1, -1).contiguous()
    tr = VT.TrainTransform(32, aa="rand-m9-n4-mstd0.5-inc1", interpolation="bicubic", reprob=0.0, remode="pixel",
                           recount=1, flip=True)
    random.seed(0)
    np.random.seed(0)
    outs = [tr(img) for _ in range(5)]
    for out in outs:
        assert out.shape == (3, 6, 32, 32)
        assert torch.equal(out, out[:, :1].expand_as(out))  # identical frames stay identical
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # but clips differ


def _train_transform_case(aa_on_crop: bool) -> tuple[torch.Tensor, VT.TrainTransform]:
    """6 random 48x64 frames and a 32 px TrainTransform with RandAugment and flips (no erasing)."""
    frames = torch.randint(0, 256, (6, 48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return frames, VT.TrainTransform(32, aa="rand-m9-n4-mstd0.5-inc1", interpolation="bicubic", reprob=0.0,
                                     remode="pixel", recount=1, flip=True, aa_on_crop=aa_on_crop)


def _assert_same_draws(tr: VT.TrainTransform, frames: torch.Tensor, written_out, atol: float) -> None:
    """``tr(frames)`` equals ``written_out(frames)`` when both draw from the same seeds (6 seeds)."""
    for seed in range(6):
        random.seed(seed)
        np.random.seed(seed)
        got = tr(frames)
        random.seed(seed)
        np.random.seed(seed)
        torch.testing.assert_close(got, written_out(frames), atol=atol, rtol=0)


def test_train_transform_is_videomaes_aug_frame():
    """VideoMAE's order, written out: RandAugment on the whole frames (timm's grey fill), /255, normalise, then the
    random resized crop resized as normalised floats without antialiasing (its F.interpolate), then the flip."""
    import torch.nn.functional as F

    frames, tr = _train_transform_case(aa_on_crop=False)
    assert all(op.kwargs["fillcolor"] == (128, 128, 128) for op in tr.rand_aug.op.ops)
    mean, std = (torch.tensor(v).view(3, 1, 1, 1) for v in (VT.IMAGENET_MEAN, VT.IMAGENET_STD))

    def videomae(frames: torch.Tensor) -> torch.Tensor:
        buf = (tr.rand_aug(VT.as_tchw(frames)).permute(1, 0, 2, 3).float() / 255 - mean) / std  # C T H W
        top, left, h, w = VT.random_resized_crop_params(48, 64)
        want = F.interpolate(buf[:, :, top:top + h, left:left + w], size=(32, 32), mode="bilinear",
                             align_corners=False)
        return want.flip(-1) if random.random() < 0.5 else want

    _assert_same_draws(tr, frames, videomae, atol=1e-5)


def test_aa_on_crop_runs_randaugment_on_the_resized_crop():
    """--aa_on_crop (off by default): the crop is cut and resized (uint8, not antialiased) first, RandAugment then
    runs on input_size frames, then the normalisation and the flip."""
    import torch.nn.functional as F

    frames, tr = _train_transform_case(aa_on_crop=True)

    def on_crop(frames: torch.Tensor) -> torch.Tensor:
        top, left, h, w = VT.random_resized_crop_params(48, 64)
        x = VT.as_tchw(frames)[..., top:top + h, left:left + w]
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        want = VT.normalize(tr.rand_aug(x))
        return want.flip(-1) if random.random() < 0.5 else want

    _assert_same_draws(tr, frames, on_crop, atol=1e-6)
    assert not VT.TrainTransform(32, aa="none", interpolation="bicubic", reprob=0.0, remode="pixel", recount=1,
                                 flip=False).aa_on_crop  # VideoMAE's order unless asked


def test_eval_resize_is_videomaes_opencv_bilinear():
    """VideoMAE resizes evaluation frames with OpenCV's INTER_LINEAR (decord gives arrays): bilinear, no
    antialiasing. Ours is within one grey level of that (uint8 rounding); an antialiased resize is far off on
    detailed frames."""
    import torch.nn.functional as F

    frames = torch.randint(0, 256, (2, 48, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = VT.EvalTransform(32, 32)(frames)
    x = frames.permute(0, 3, 1, 2).float()
    for antialias, ok in ((False, True), (True, False)):
        ref = F.interpolate(x, size=(32, 53), mode="bilinear", align_corners=False, antialias=antialias)
        ref = VT.normalize(ref.round().clamp(0, 255).to(torch.uint8)[..., 10:42])  # centre crop of 53: 10
        levels = (got - ref).abs() * 255 * torch.tensor(VT.IMAGENET_STD).view(3, 1, 1, 1)  # back to grey levels
        assert (float(levels.max()) <= 1.0001) is ok and (float(levels.mean()) > 5) is not ok, antialias


def test_random_erasing_is_a_tube():
    clip = torch.zeros(3, 4, 32, 32)
    VT.ClipRandomErasing(1.0, "const", 1)(clip.add_(1.0))
    erased = clip == 0
    assert erased.any()
    assert torch.equal(erased, erased[:, :1].expand_as(erased))


def test_eval_transform_crops():
    frames = torch.zeros(2, 40, 80, 3, dtype=torch.uint8)
    frames[..., :20, :] = 255  # left quarter white
    tr = VT.EvalTransform(20, 20)
    crops = [tr(frames, i, 3) for i in range(3)]
    assert all(c.shape == (3, 2, 20, 20) for c in crops)
    assert crops[0].mean() > crops[1].mean() >= crops[2].mean()
    assert torch.equal(tr(frames, 0, 1), crops[1])  # single crop == centre, no division by zero


@pytest.mark.parametrize("h,w", [(240, 320), (360, 640), (320, 568), (101, 333), (333, 101)])
def test_eval_geometry_is_videomae_to_the_pixel(h, w):
    """VideoMAE's test: long side int(224 * long / short) after the short-side resize, view k of n at
    int(k * (long - crop) / (n - 1)); its validation CenterCrop at int(round((long - crop) / 2)). Checked on an
    image that is a ramp along its long side, so that each crop's position shows in its values."""
    short, crop = 224, 200
    long_ = int(short * max(h, w) / min(h, w))
    ramp = torch.arange(max(h, w), dtype=torch.float32).mul(1000 / max(h, w))
    img = (ramp.view(1, 1, 1, -1).expand(1, 1, h, w) if w >= h else ramp.view(1, 1, -1, 1).expand(1, 1, h, w))
    resized = VT.short_side_resize(img, short)
    assert sorted(resized.shape[-2:]) == [short, long_]
    for n in (3, 1):
        for k in range(n):
            start = int(round((long_ - crop) / 2)) if n == 1 else int(k * (1.0 * (long_ - crop) / (n - 1)))
            across = (short - crop) // 2  # centred on the short side
            top, left = (across, start) if w >= h else (start, across)
            expect = resized[..., top:top + crop, left:left + crop]
            assert torch.equal(VT.spatial_crop(resized, crop, k, n), expect), (n, k, start)


def test_validation_centre_crop_rounds_on_both_axes():
    """VideoMAE's CenterCrop: int(round((side - crop) / 2)) on each axis (Python's round: half to even)."""
    for h, w in ((227, 300), (231, 300), (300, 227)):
        img = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
        top, left = int(round((h - 224) / 2)), int(round((w - 224) / 2))
        assert torch.equal(VT.spatial_crop(img, 224, 0, 1), img[..., top:top + 224, left:left + 224]), (h, w)


# ---------------------------------------------------------------------------------------------------- datasets
def clips_of(batch):
    from engine_for_pretraining import clips_to_device

    return clips_to_device(batch, torch.device("cpu"))


def test_pretrain_dataset_and_repeated_sampling(synthetic_dir):
    a = args_for(os.path.join(synthetic_dir, "train.csv"), num_sample=1)
    ds = D.build_pretraining_dataset(a)
    x = ds[0]
    assert isinstance(x, VT.CropItem) and x.pixels.dtype == torch.uint8 and x.crops.shape == (1, 5)
    assert x.pixels.shape[0] == 8 and x.pixels.shape[1:3] == tuple(x.crops[0, 2:4])  # just the crop is decoded
    assert clips_of(D.multiple_samples_collate([x])).shape == (1, 3, 8, 32, 32)
    a.num_sample = 3
    ds = D.build_pretraining_dataset(a)
    item = ds[1]
    assert item.crops.shape == (3, 5)
    batch = D.multiple_samples_collate([ds[0], ds[1]])
    assert batch.crops[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    clips = clips_of(batch)
    assert clips.shape == (6, 3, 8, 32, 32) and clips.dtype == torch.float32
    assert clips.min() >= 0 and clips.max() <= 1


@pytest.mark.parametrize("num_sample", [1, 3])
def test_pretrain_items_same_with_either_backend(synthetic_dir, video_dir, tmp_path, num_sample):
    # PyAV decodes only the box holding the drawn crops, decord crops it from whole frames: same plan, same pixels.
    lst = tmp_path / "list.csv"
    lst.write_text(open(os.path.join(synthetic_dir, "train.csv")).read()
                   + f"{os.path.join(video_dir, 'vp9_80x64.webm')} 0\n{os.path.join(video_dir, 'h264_96x128.mp4')} 0\n")
    items = {}
    for backend in ("auto", "pyav", "decord"):
        ds = D.build_pretraining_dataset(args_for(lst, num_sample=num_sample, video_backend=backend))
        ds.seed = 3
        items[backend] = [ds[i] for i in range(len(ds))]
    for i, x in enumerate(items["pyav"]):
        for backend in ("auto", "decord"):
            y = items[backend][i]
            assert torch.equal(x.pixels, y.pixels) and torch.equal(x.crops, y.crops), (i, backend)


def test_pyav_workers_after_main_process_decoded(synthetic_dir):
    # The main process decodes first (e.g. the TensorBoard clips), then forks workers: converters cached by the
    # parent must not be reused in the children (an inherited swscale context can hang there).
    a = args_for(os.path.join(synthetic_dir, "train.csv"), num_sample=2, video_backend="pyav", seed=0)
    ds = D.build_pretraining_dataset(a)
    expected = clips_of(D.multiple_samples_collate([ds[i] for i in range(len(ds))]))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=D.multiple_samples_collate,
                                         timeout=120)
    batches = list(loader)
    assert all(b.pixels.dtype == torch.uint8 and b.pixels.is_shared() for b in batches)  # collated into shm
    assert torch.equal(torch.cat([clips_of(b) for b in batches]), expected)  # bit for bit, whatever the padding


def test_cls_dataset_items(synthetic_dir):
    a = args_for(synthetic_dir, num_sample=2, video_backend="pyav")
    train, n = D.build_dataset(True, False, a)
    assert n == 4 and len(train) == 8
    clips, labels, idx, extra = train[0]
    assert len(clips) == 2 and clips[0].shape == (3, 8, 32, 32) and labels == [0, 0] and extra == {}
    x, y, i, _ = D.multiple_samples_collate([train[0], train[1]])
    assert x.shape == (4, 3, 8, 32, 32) and y.tolist() == [0, 0, 1, 1] and i.tolist() == [0, 0, 1, 1]

    val, _ = D.build_dataset(False, False, a)
    c1, label, vid, info = val[0]
    c2 = val[0][0]
    assert c1.shape == (3, 8, 32, 32) and torch.equal(c1, c2)  # deterministic centre clip
    first = D.read_list_file(os.path.join(synthetic_dir, "val.csv"))[0]
    assert info == {"valid": True, "path": first.path, "line": first.line_no, "reason": ""}
    assert vid.endswith(".mp4") and label == D.read_list_file(os.path.join(synthetic_dir, "val.csv"))[0].label

    test, _ = D.build_dataset(False, True, a)
    n_videos = len(D.read_list_file(os.path.join(synthetic_dir, "test.csv")))
    assert len(test) == n_videos * 2 * 3
    items = [test[i] for i in range(len(test))]
    views = {}
    for clip, _label, vid, seg, crop, info in items:
        assert clip.shape == (3, 8, 32, 32) and info["valid"]
        views.setdefault(vid, set()).add((seg, crop))
    assert len(views) == n_videos
    assert all(v == {(s, c) for s in range(2) for c in range(3)} for v in views.values())


def test_ssv2_segment_sampling(synthetic_dir):
    a = args_for(synthetic_dir, data_set="SSV2", nb_classes=None, num_frames=4)
    ds, n = D.build_dataset(True, False, a)
    assert n == 174 and ds.sampling == "segment" and not ds.transform.flip
    assert ds[0][0].shape == (3, 4, 32, 32)
    test, _ = D.build_dataset(False, True, a)
    assert test[0][0].shape == (3, 4, 32, 32)


def _broken_list(tmp_path, video_dir, n_good=3, n_bad=2):
    good = [os.path.join(video_dir, "h264_64x48.mp4"), os.path.join(video_dir, "vp9_64x48.webm"),
            os.path.join(video_dir, "h264_short.mp4")][:n_good]
    bad = [os.path.join(video_dir, "truncated.mp4"), os.path.join(video_dir, "missing.mp4"),
           os.path.join(video_dir, "garbage.mp4"), os.path.join(video_dir, "truncated.webm")][:n_bad]
    return write(tmp_path / "list.csv", "".join(f"{p} 0\n" for p in bad + good))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_broken_video_skipped_and_counted(tmp_path, video_dir, backend, caplog):
    """Training skips and counts every broken video, with PyAV a cut-off .webm too (it opens as a shorter video:
    training used to read it as one; decord would need a second open per item to tell, so it trains on it);
    evaluation marks it invalid and names it with either backend (test_honest_eval)."""
    p = _broken_list(tmp_path, video_dir, n_bad=4)
    ds = D.build_pretraining_dataset(args_for(p, video_backend=backend))
    random.seed(0)
    with caplog.at_level("WARNING"):
        for i in range(len(ds)):
            assert clips_of(D.multiple_samples_collate([ds[i]])).shape == (1, 3, 8, 32, 32)
        assert ds[0].pixels.shape[0] == 8
    assert ds.num_broken >= 3 and D.get_broken_count(ds) == ds.num_broken
    logged = [r.getMessage() for r in caplog.records if "broken video skipped" in r.getMessage()]
    assert all(any(name in m for m in logged) for name in ("truncated.mp4", "missing.mp4"))
    assert any("truncated.webm" in m for m in logged) is (backend == "pyav")
    assert len(logged) == len(set(logged))  # once per path

    cls = VD.VideoClsDataset(D.VideoList(p, nb_classes=1), mode="test", sampling="dense", num_frames=8,
                             sampling_rate=2, num_segments=1, input_size=32, short_side_size=32, test_num_segment=1,
                             test_num_crop=1, video_backend=backend)
    clip, label, vid, seg, crop, info = cls[0]  # broken in test: marked invalid (never replaced), with line + reason
    assert vid.endswith("truncated.mp4") and not info["valid"] and cls.num_broken == 1
    assert info["line"] == 1 and info["path"] == vid and "cannot open" in info["reason"]


def test_cls_dataset_train_mode_needs_the_training_options(synthetic_dir):
    videos = D.VideoList(os.path.join(synthetic_dir, "train.csv"), nb_classes=4)
    clip = dict(sampling="dense", num_frames=8, sampling_rate=2, num_segments=1, input_size=32, short_side_size=32,
                test_num_segment=1, test_num_crop=1, video_backend="auto")
    with pytest.raises(ValueError, match="mode='train' needs aa, train_interpolation, .*, max_broken_ratio"):
        VD.VideoClsDataset(videos, mode="train", **clip)
    assert len(VD.VideoClsDataset(videos, mode="validation", **clip)) == len(videos)  # evaluation does without


def test_mostly_broken_dataset_stops(tmp_path, video_dir):
    p = _broken_list(tmp_path, video_dir, n_good=0, n_bad=3)
    ds = D.build_pretraining_dataset(args_for(p, max_retries=4))
    with pytest.raises(ValueError, match="consecutive videos failed"):
        ds[0]


def test_dataloader_two_workers_epoch(tmp_path, video_dir, synthetic_dir):
    lines = open(os.path.join(synthetic_dir, "train.csv")).read()
    p = write(tmp_path / "mixed.csv", lines + f"{os.path.join(video_dir, 'garbage.mp4')} 1\n")
    a = args_for(p, num_sample=2)
    ds = D.build_pretraining_dataset(a)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=D.multiple_samples_collate)
    seen = 0
    for batch in loader:
        clips = clips_of(batch)
        assert clips.shape[1:] == (3, 8, 32, 32) and torch.isfinite(clips).all()
        seen += clips.shape[0]
    assert seen == 2 * len(ds)
    assert ds.num_broken >= 1  # counted inside a worker, visible here


def test_add_data_args_defaults_and_existing_flags():
    p = argparse.ArgumentParser()
    p.add_argument("--input_size", default=112, type=int)  # e.g. defined with the model flags
    D.add_data_args(p, pretrain=True)
    a = p.parse_args([])
    assert a.input_size == 112 and a.num_frames == 16 and a.sampling_rate == 4 and a.num_sample == 1
    assert a.video_backend == "auto" and a.pin_mem and a.data_set == "Kinetics-400"
    assert not hasattr(a, "aa") and not hasattr(a, "test_num_crop")  # fine-tuning flags only for fine-tuning
    assert not p.parse_args(["--no_pin_mem"]).pin_mem
    f = D.add_data_args(argparse.ArgumentParser()).parse_args([])
    assert f.num_sample == 2 and f.test_num_segment == 5 and f.test_num_crop == 3
    assert f.aa == "rand-m7-n4-mstd0.5-inc1" and f.reprob == 0.25


def test_pretraining_flips_only_with_the_flag(synthetic_dir):
    """VideoMAE and AdaMAE pre-train without flips: the program's default draws none; --flip flips about half the
    clips, on any set (pre-training has no labels); fine-tuning keeps its flips (--no_flip; never SSV2)."""
    import run_mae_pretraining

    train = os.path.join(synthetic_dir, "train.csv")
    small = ["--data_path", train, "--num_frames", "8", "--sampling_rate", "2", "--input_size", "32", "--num_sample",
             "8"]
    parse = run_mae_pretraining.get_args_parser().parse_args
    for extra, want in (([], False), (["--flip"], True), (["--flip", "--data_set", "SSV2"], True)):
        ds = D.build_pretraining_dataset(parse(small + extra))
        flips = torch.cat([ds[i].crops[:, 4] for i in range(len(ds))])
        assert ds.transform.flip is want and (0 < int(flips.sum()) < len(flips) if want else not flips.any()), extra
    assert args_for(synthetic_dir, data_set="Kinetics-400", nb_classes=None).no_flip is False
    assert D.build_dataset(True, False, args_for(synthetic_dir))[0].transform.flip


def test_video_ids_stay_unique_when_a_path_reads_like_a_generated_id(tmp_path):
    """A repeated path gets the id ``path#L<line>``; a listed path that is literally such a name must not merge
    two videos into one in the multi-view test."""
    lst = tmp_path / "l.csv"
    lst.write_text("a.mp4 0\na.mp4#L3 0\na.mp4 0\n")
    ids = [r.video_id for r in D.read_list_file(str(lst))]
    assert len(set(ids)) == 3 and ids[0] == "a.mp4" and ids[1] == "a.mp4#L3", ids
