"""A one-minute CPU demo of the model core: a tiny AdaMAE learns to reconstruct clips of a moving square.

    python demo.py [--steps 30]

Prints the reconstruction and sampling losses and how much of the sampler's probability mass sits on the
moving object (the share of tokens it covers is printed alongside: above that share means the sampler prefers
the object, which is what AdaMAE's sampling loss rewards).
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

import modeling_pretrain  # noqa: F401  (registers the models)
from engine_for_pretraining import pretrain_losses


def moving_square_clips(batch: int, frames: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy static background with a bright square moving in a random direction; returns clips and object masks."""
    clips = torch.rand(batch, 3, 1, size, size, generator=gen).mul(0.3).expand(-1, -1, frames, -1, -1).clone()
    obj = torch.zeros(batch, frames, size, size, dtype=torch.bool)
    side = size // 4
    for b in range(batch):
        y, x = torch.randint(0, size - side, (2,), generator=gen).tolist()
        dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
        for t in range(frames):
            yy, xx = (y + dy * t) % (size - side), (x + dx * t) % (size - side)
            obj[b, t, yy:yy + side, xx:xx + side] = True
    clips = torch.where(obj[:, None], torch.tensor([0.9, 0.8, 0.2]).view(1, 3, 1, 1, 1), clips)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    return (clips - mean) / std, obj


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    frames, size, patch, tubelet = 8, 64, 16, 2
    model = timm.create_model("pretrain_videomae_small_patch16_224", mask_type="adaptive", mask_ratio=0.75,
                              num_frames=frames, img_size=size, encoder_embed_dim=96, encoder_depth=4,
                              encoder_num_heads=4, decoder_embed_dim=64, decoder_num_heads=4, decoder_depth=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    print(f"tiny AdaMAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{model.num_visible} of {model.num_patches} tokens visible")
    t0 = time.time()
    for step in range(args.steps):
        videos, obj = moving_square_clips(args.batch_size, frames, size, gen)
        losses = pretrain_losses(model, videos, patch, tubelet, sampling_loss_weight=1e-2)
        opt.zero_grad(set_to_none=True)
        losses.loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            # Tokens touched by the object in either frame of their tubelet.
            tok = obj.view(args.batch_size, frames // tubelet, tubelet, size // patch, patch, size // patch, patch)
            on_obj = tok.any(dim=(2, 4, 6)).flatten(1)
            mass = (losses.probs.detach() * on_obj).sum(1).mean().item()
            print(f"step {step:3d}  reconstruction {losses.reconstruction.item():.4f}  "
                  f"sampling {losses.sampling.item():+.2e}  sampler mass on object {mass:.2f} "
                  f"(object covers {on_obj.float().mean().item():.2f} of tokens)  {time.time() - t0:.1f}s")
    print("done: forward, both losses, backward and AdamW steps ran on", next(model.parameters()).device)


if __name__ == "__main__":
    main()
