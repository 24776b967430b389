"""AdaMAE's central claim, end to end on real videos: trained only by its reward (the reconstruction error of the
tokens it left masked), the token sampler learns to put its probability on the moving object.

Tiny model, 64 px synthetic clips, 300 steps on clips decoded once up front (about 30 s on 2 cores). The
sampling-loss weight is 1e-2 rather than the paper's 1e-4 so that the effect is large within 300 steps with
raw-pixel targets (whose errors are ~100x smaller than normalised ones); the quickstart shows it with 1e-4 over
600 steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modeling_pretrain  # noqa: E402,F401  (registers the models)
import optim_factory  # noqa: E402
from datasets import VideoList, multiple_samples_collate  # noqa: E402
from engine_for_pretraining import clips_to_device  # noqa: E402
from losses import pretrain_losses  # noqa: E402
from masking_generator import motion_energy  # noqa: E402
from tools.make_synthetic_dataset import make_synthetic_dataset  # noqa: E402
from video_datasets import PretrainVideoDataset  # noqa: E402
from video_transforms import normalize_clips  # noqa: E402

STEPS, BATCH, SIZE, FRAMES = 300, 16, 64, 8


def clips(list_path: str, copies: int) -> torch.Tensor:
    """``[len * copies, 3, T, H, W]`` clips in ``[0, 1]``, as the training loop gets them."""
    ds = PretrainVideoDataset(VideoList(list_path, require_label=False), num_frames=FRAMES, sampling_rate=2,
                              input_size=SIZE, flip=True, num_sample=copies, video_backend="auto", max_retries=10,
                              max_broken_ratio=0.5)
    ds.seed = 0  # reproducible crops and flips
    return clips_to_device(multiple_samples_collate([ds[i] for i in range(len(ds))]), torch.device("cpu"))


def motion_mass(model: torch.nn.Module, videos: torch.Tensor) -> float:
    """Mean probability the sampler puts on each clip's top-20% tubelets by frame-difference energy."""
    energy = motion_energy(videos, model.patch_size, model.tubelet_size)
    top = torch.zeros_like(energy, dtype=torch.bool).scatter_(1, energy.topk(round(0.2 * energy.shape[1]), 1).indices,
                                                              True)
    model.eval()
    with torch.no_grad():
        probs = model(normalize_clips(videos)).probs
    model.train()
    return float((probs * top).sum(1).mean())


def test_sampler_learns_to_sample_the_moving_object(tmp_path):
    lists = make_synthetic_dataset(str(tmp_path), num_videos=48, num_classes=4, fmt="mp4", seed=0, size=SIZE,
                                   frames=16)
    torch.manual_seed(0)
    train = clips(lists["train"], copies=2)                               # 2 augmented clips per training video
    held_out = torch.cat([clips(lists["val"], 1), clips(lists["test"], 1)])  # videos never trained on

    model = timm.create_model("pretrain_videomae_small_patch16_224", img_size=SIZE, num_frames=FRAMES,
                              mask_type="adaptive", mask_ratio=0.75, encoder_embed_dim=192, encoder_depth=4,
                              encoder_num_heads=3, decoder_embed_dim=96, decoder_num_heads=3, decoder_depth=2)
    args = argparse.Namespace(opt="adamw", lr=2e-3, weight_decay=0.05, opt_eps=1e-8, opt_betas=[0.9, 0.95],
                              momentum=0.9)
    optimizer = optim_factory.create_optimizer(args, model, verbose=False)
    lr = optim_factory.cosine_scheduler(2e-3, 1e-4, 1, STEPS, warmup_steps=30)

    before = motion_mass(model, held_out)
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        optim_factory.apply_schedule(optimizer, lr=float(lr[step]))
        batch = train[torch.randint(0, len(train), (BATCH,), generator=gen)]
        out = pretrain_losses(model, batch, model.patch_size, model.tubelet_size, normalize_target=False,
                              sampling_loss_weight=1e-2)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    after = motion_mass(model, held_out)

    # Uniform sampling puts 0.20 of the mass on the top-20% tubelets; three seeds gave 0.33-0.37 after 300 steps.
    assert before < 0.25, before
    assert after > 0.28 and after - before > 0.06, (before, after)
