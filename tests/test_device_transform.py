"""Pre-training augmentation on the training device (``resize_crops``) against the workers' former CPU transform:
the same frames, crops and flips from the same per-item seeds; the same pixels on a CPU, within one grey level
(1/255 before normalisation) on a GPU."""
from __future__ import annotations

import os
import random

import pytest
import torch

import datasets as D
import video_transforms as VT
from engine_for_pretraining import clips_to_device
from frame_sampling import pretrain_indices
from video_datasets import PretrainVideoDataset
from video_io import num_frames, read_frames

FRAMES, RATE = 8, 2


def pretrain_dataset(list_path: str, input_size: int, num_sample: int) -> PretrainVideoDataset:
    return PretrainVideoDataset(D.VideoList(list_path, require_label=False), num_frames=FRAMES, sampling_rate=RATE,
                                input_size=input_size, flip=True, num_sample=num_sample, video_backend="auto",
                                max_retries=10, max_broken_ratio=0.5)


def former_cpu_clips(ds: PretrainVideoDataset, index: int, path: str) -> tuple[torch.Tensor, list]:
    """What the workers computed before: whole frames, then per clip a multi-scale crop, a uint8 antialiased
    bilinear resize and a flip, drawn in the same order from the same seed. Returns ``[K, 3, T, S, S]`` clips in
    ``[0, 1]`` and the crops ``(top, left, h, w, flip)`` in frame coordinates."""
    ds._seed_item(index)
    indices = pretrain_indices(num_frames(path, "decord"), FRAMES, RATE)
    frames = VT.as_tchw(read_frames(path, indices, "decord"))
    clips, crops = [], []
    for _ in range(ds.num_sample):
        top, left, ch, cw = VT.multi_scale_crop_params(frames.shape[2], frames.shape[3], ds.transform.size)
        flip = random.random() < 0.5
        x = VT.resize(VT.crop(frames, top, left, ch, cw), ds.transform.size)
        clips.append((x.flip(-1) if flip else x).permute(1, 0, 2, 3).float() / 255)
        crops.append((top, left, ch, cw, flip))
    return torch.stack(clips), crops


@pytest.mark.parametrize("num_sample", [1, 3])
@pytest.mark.parametrize("input_size", [32, 56])  # 48-128 px videos: crops shrink (antialiased) or grow
def test_device_transform_matches_former_cpu_transform(video_dir, tmp_path, num_sample, input_size):
    names = ["h264_64x48.mp4", "vp9_64x48.webm", "h264_96x128.mp4", "vp9_80x64.webm"]
    paths = [os.path.join(video_dir, n) for n in names]
    lst = tmp_path / "list.csv"
    lst.write_text("".join(f"{p}\n" for p in paths * 2))
    ds = pretrain_dataset(str(lst), input_size, num_sample)
    ds.seed = 11
    items = [ds[i] for i in range(len(ds))]
    got = clips_to_device(D.multiple_samples_collate(items), torch.device("cpu"))
    assert got.shape == (len(items) * num_sample, 3, FRAMES, input_size, input_size)
    flips = 0
    for i, item in enumerate(items):
        want, crops = former_cpu_clips(ds, i, paths[i % len(paths)])
        # same crops and flips: the item's crops are the former ones relative to the decoded region
        top, left = min(c[0] for c in crops), min(c[1] for c in crops)
        assert item.crops.tolist() == [[t - top, x - left, h, w, int(f)] for t, x, h, w, f in crops], i
        flips += sum(c[4] for c in crops)
        assert torch.equal(got[i * num_sample:(i + 1) * num_sample], want), i  # on a CPU: the same uint8 resize
    assert 0 < flips < len(items) * num_sample  # both branches exercised


def test_model_input_and_targets_come_from_the_same_pixels():
    # One [0, 1] clip feeds both: the model gets its ImageNet normalisation, the targets the pixels themselves.
    from losses import pixel_targets, pixel_targets01

    x01 = torch.rand(2, 3, 4, 32, 32)
    before = x01.clone()
    normed = VT.normalize_clips(x01)
    assert torch.allclose(VT.normalize_clips((x01 * 255).round().to(torch.uint8)),
                          VT.normalize_clips((x01 * 255).round() / 255), atol=1e-5)
    assert torch.allclose(pixel_targets(normed, 16, 2), pixel_targets01(x01, 16, 2), atol=1e-4)
    assert torch.equal(x01, before)  # the [0, 1] clip is not normalised in place


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_transform_on_cuda_equals_cpu(video_dir, tmp_path):
    paths = [os.path.join(video_dir, n) for n in ("h264_96x128.mp4", "vp9_80x64.webm")]
    lst = tmp_path / "list.csv"
    lst.write_text("".join(f"{p}\n" for p in paths * 4))
    ds = pretrain_dataset(str(lst), 56, 2)
    ds.seed = 1
    batch = D.multiple_samples_collate([ds[i] for i in range(len(ds))])
    cpu = clips_to_device(batch, torch.device("cpu"))
    cuda = clips_to_device(batch, torch.device("cuda")).cpu()
    assert (cpu - cuda).abs().max() * 255 < 1 + 1e-3  # float resize, rounded: within one grey level
