"""Mask generators, the Gumbel-top-k sampler, token operations, pixel targets and both losses."""
import math

import pytest
import timm
import torch
from torch.distributions import Categorical

import modeling_pretrain  # noqa: F401
from losses import masked_token_error, pixel_targets, pixel_targets01, pretrain_losses, reconstruction_error, \
    sampling_loss, unnormalize
from masking_generator import MaskGenerator, gumbel_topk, mask_from_visible, num_visible_tokens
from token_ops import gather_tokens, masked_indices, patchify, scatter_tokens, unpatchify
from video_transforms import normalize_clips


def test_visible_counts_follow_each_reference_without_float_error():
    grid = (8, 14, 14)
    assert num_visible_tokens("adaptive", grid, 0.95) == 78      # AdaMAE: int(1568 * 0.05)
    assert num_visible_tokens("learnable", grid, 0.90) == 156
    assert num_visible_tokens("tube", grid, 0.90) == 160         # VideoMAE: 176 masked per frame
    assert num_visible_tokens("tube", grid, 0.95) == 80
    assert num_visible_tokens("random", grid, 0.90) == 1568 - 1411
    assert num_visible_tokens("frame", grid, 0.875) == 196       # one of eight time slices
    # 10 * (1 - 0.9) == 0.9999999999999998 in floats; a naive int() would give 0 visible tokens.
    assert int(10 * (1 - 0.9)) == 0
    assert num_visible_tokens("adaptive", (1, 2, 5), 0.9) == 1
    assert num_visible_tokens("adaptive", (1, 1, 100), 0.7) == 30  # int(100 * 0.30000000000000004) is fine too


@pytest.mark.parametrize("kind,ratio", [("tube", 0.9), ("random", 0.9), ("frame", 0.875)])
def test_mask_generators_exact_counts_dtype_device(kind, ratio):
    gen = MaskGenerator(kind, (8, 14, 14), ratio)
    torch.manual_seed(0)  # a frame mask keeps 1 of 8 slices: two samples may agree, the whole batch should not
    mask = gen(4, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (4, 1568)
    assert ((~mask).sum(1) == gen.num_visible).all()
    assert not all(torch.equal(mask[0], m) for m in mask[1:])  # independent per sample


def test_gumbel_topk_matches_multinomial_without_replacement():
    """Inclusion frequencies of k-subsets agree with torch.multinomial within sampling error."""
    torch.manual_seed(0)
    n, k, draws = 8, 3, 40_000
    probs = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02])
    log_probs = probs.log().expand(draws, n)
    ours = torch.zeros(n).index_add_(0, gumbel_topk(log_probs, k).flatten(), torch.ones(draws * k))
    ref = torch.zeros(n).index_add_(0, torch.multinomial(probs.expand(draws, n), k, replacement=False).flatten(),
                                    torch.ones(draws * k))
    p_ours, p_ref = ours / draws, ref / draws
    # Each inclusion frequency is a Bernoulli mean; 5 standard errors of the difference of two estimates.
    se = torch.sqrt(2 * p_ref * (1 - p_ref) / draws)
    assert (p_ours - p_ref).abs().max() < (5 * se).max()
    assert torch.allclose(p_ours.sum(), torch.tensor(float(k)))
    # The first pick alone is a plain categorical draw.
    first = torch.bincount(gumbel_topk(log_probs, 1).flatten(), minlength=n) / draws
    assert (first - probs).abs().max() < 5 * math.sqrt(0.25 / draws)


def test_gumbel_topk_returns_distinct_tokens_for_a_collapsed_distribution():
    log_probs = torch.full((2, 100), -float("inf"))
    log_probs[:, 7] = 0.0  # all mass on one token (older torch.multinomial raises here)
    idx = gumbel_topk(log_probs, 10)
    assert idx.shape == (2, 10)
    for row in idx:
        assert len(set(row.tolist())) == 10 and 7 in row.tolist()
    # Underflowed but finite log-probabilities behave the same.
    peaked = torch.full((1, 100), -1e4)
    peaked[0, :3] = 0.0
    assert len(set(gumbel_topk(peaked, 20)[0].tolist())) == 20


def test_masked_indices_ascending_and_mask_roundtrip():
    mask = mask_from_visible(torch.tensor([[4, 0, 2], [5, 1, 3]]), 6)
    assert mask.tolist() == [[False, True, False, True, False, True], [True, False, True, False, True, False]]
    assert masked_indices(mask, 3).tolist() == [[1, 3, 5], [0, 2, 4]]
    x = torch.arange(12.0).view(2, 6)
    picked = gather_tokens(x, masked_indices(mask, 3))
    assert picked.tolist() == [[1, 3, 5], [6, 8, 10]]
    assert torch.equal(scatter_tokens(torch.zeros_like(x), masked_indices(mask, 3), picked), x * mask)


def test_patchify_layout_and_normalised_targets():
    torch.manual_seed(0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    raw = torch.rand(2, 3, 4, 32, 32)
    videos = (raw - mean) / std
    assert torch.allclose(unnormalize(videos), raw, atol=1e-6)
    patches = patchify(raw, 16, 2)
    assert patches.shape == (2, 2 * 2 * 2, 2 * 16 * 16, 3)
    # Token index t*H'*W' + h*W' + w; pixel vector ordered (p0 p1 p2), then channel.
    t, h, w, p0, p1, p2, c = 1, 0, 1, 1, 3, 5, 2
    assert patches[0, t * 4 + h * 2 + w, p0 * 256 + p1 * 16 + p2, c] == raw[0, c, 2 * t + p0, 16 * h + p1, 16 * w + p2]
    flat = pixel_targets(videos, 16, 2, normalize=False)
    assert torch.allclose(unpatchify(flat, (2, 2, 2), 16, 2), raw, atol=1e-6)
    tgt = pixel_targets(videos, 16, 2, normalize=True).view(2, 8, 512, 3)
    assert torch.allclose(tgt.mean(2), torch.zeros(2, 8, 3), atol=1e-5)
    assert torch.allclose(tgt.std(2, unbiased=True), torch.ones(2, 8, 3), atol=1e-3)


def test_reconstruction_error_types():
    pred, target = torch.zeros(2, 3, 4), torch.full((2, 3, 4), 2.0)
    assert torch.equal(reconstruction_error(pred, target, "mse"), torch.full((2, 3), 4.0))
    assert torch.equal(reconstruction_error(pred, target, "l1"), torch.full((2, 3), 2.0))
    with pytest.raises(ValueError):
        reconstruction_error(pred, target, "huber")


def _loop_sampling_loss(probs, mask, err):
    """AdaMAE's per-sample reference formulation, written out plainly."""
    losses = []
    for i in range(probs.shape[0]):
        logp = Categorical(probs=probs[i]).log_prob(torch.arange(probs.shape[1]))
        losses.append(-(logp[mask[i]] * err[i]).mean())
    return torch.stack(losses).mean()


def test_vectorised_sampling_loss_equals_per_sample_loop():
    torch.manual_seed(0)
    b, n, n_vis = 4, 50, 10
    logits = torch.randn(b, n, dtype=torch.float64)
    log_probs = torch.log_softmax(logits, -1)
    mask = mask_from_visible(gumbel_topk(log_probs, n_vis), n)
    err = torch.rand(b, n - n_vis, dtype=torch.float64)
    ours = sampling_loss(log_probs, masked_indices(mask, n - n_vis), err)
    ref = _loop_sampling_loss(log_probs.exp(), mask, err)
    assert abs(ours.item() - ref.item()) < 1e-6


def test_categorical_log_prob_is_adamaes_also_for_a_peaked_sampler():
    """AdaMAE scores masked tokens with Categorical(probs=softmax).log_prob, which clamps p at float32 eps: for a
    peaked sampler (many p < 1.2e-7) the default matches it in value and gradient; log_softmax (exact) does not."""
    from losses import sampler_log_probs

    torch.manual_seed(0)
    b, n, n_vis = 3, 300, 15
    logits = (6 * torch.randn(b, n)).requires_grad_()
    log_probs = torch.log_softmax(logits, -1)
    assert (log_probs.exp() < 1.2e-7).float().mean() > 0.3  # peaked
    mask = mask_from_visible(gumbel_topk(log_probs.detach(), n_vis), n)
    idx, err = masked_indices(mask, n - n_vis), torch.rand(b, n - n_vis)
    ours = sampling_loss(sampler_log_probs(log_probs), idx, err)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = _loop_sampling_loss(torch.softmax(logits, -1), mask, err)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(ours, ref, rtol=1e-6) and torch.allclose(g_ours, g_ref, rtol=1e-5, atol=1e-9)
    exact = sampling_loss(sampler_log_probs(log_probs, "log_softmax"), idx, err)
    assert exact > 1.05 * ref  # uncapped -log p of the tiny probabilities
    with pytest.raises(ValueError):
        sampler_log_probs(log_probs, "logits")


def test_sgd_step_on_sampling_loss_raises_logit_of_high_error_token_more():
    torch.manual_seed(0)
    n = 6
    logits = torch.zeros(1, n, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, False, False]])
    err = torch.tensor([[3.0, 1.0, 0.1]])  # tokens 0, 1, 2 are masked with decreasing error
    sampling_loss(torch.log_softmax(logits, -1), masked_indices(mask, 3), err).backward()
    with torch.no_grad():
        new = logits - 0.5 * logits.grad
    rise = (new - logits)[0]
    assert rise[0] > rise[1] > rise[2]
    assert rise[0] > 0


def tiny(mask_type="adaptive", **kw):
    return timm.create_model("pretrain_videomae_small_patch16_224", mask_type=mask_type, mask_ratio=0.75,
                             num_frames=4, img_size=32, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                             decoder_embed_dim=32, decoder_num_heads=4, decoder_depth=1, **kw)


def _total_loss(model, x, weight=1e-4):
    out = model(x)
    err = masked_token_error(out, pixel_targets(x, model.patch_size, model.tubelet_size))
    loss = err.mean()
    if out.log_probs is not None:
        loss = loss + weight * sampling_loss(out.log_probs, out.masked_idx, err)
    return loss


@pytest.mark.parametrize("mask_type", ["adaptive", "tube"])
def test_output_carries_masked_indices_and_loss_matches_the_mask(mask_type):
    """The forward's ``masked_idx`` are the mask's masked tokens in prediction order, and the step loss that uses
    them equals the loss computed from the mask alone."""
    torch.manual_seed(0)
    model = tiny(mask_type).eval()  # no sampler dropout: two forwards with the same noise agree
    videos = torch.rand(3, 3, 4, 32, 32)
    noise = torch.rand(3, model.num_patches)
    out = model(normalize_clips(videos), noise=noise)
    num_masked = model.num_patches - model.num_visible
    assert out.masked_idx.shape == (3, num_masked) and out.masked_idx.dtype == torch.int64
    assert torch.equal(out.masked_idx, masked_indices(out.mask, num_masked))
    assert out.mask.gather(1, out.masked_idx).all()

    losses = pretrain_losses(model, videos, model.patch_size, model.tubelet_size, sampling_loss_weight=1e-2,
                             noise=noise)
    assert torch.equal(losses.mask, out.mask)  # same noise, same mask
    # the reference: indices recomputed from the mask, written out without the carried ones
    idx = masked_indices(losses.mask, num_masked)
    target = gather_tokens(pixel_targets01(videos, model.patch_size, model.tubelet_size), idx)
    err = reconstruction_error(out.pred, target)
    assert torch.equal(losses.reconstruction, err.mean())
    if mask_type == "adaptive":
        ref = -(out.log_probs.gather(1, idx) * err.detach()).mean(1).mean() * 1e-2
        assert torch.equal(losses.sampling, ref) and losses.sampling != 0
    else:
        assert losses.sampling == 0
    assert torch.equal(losses.loss, losses.reconstruction + losses.sampling)


@pytest.mark.parametrize("mask_type", ["adaptive", "tube", "random", "frame"])
def test_total_loss_gives_every_parameter_a_gradient(mask_type):
    torch.manual_seed(0)
    model = tiny(mask_type) if mask_type != "frame" else timm.create_model(
        "pretrain_videomae_small_patch16_224", mask_type="frame", mask_ratio=0.5, num_frames=4, img_size=32,
        encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32, decoder_num_heads=4,
        decoder_depth=1)
    _total_loss(model, torch.randn(2, 3, 4, 32, 32)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    if mask_type == "adaptive":
        assert model.encoder.pos_embed_probs.grad.abs().sum() > 0
        assert model.encoder.get_token_probs[0].attn.qkv.weight.grad.abs().sum() > 0


def test_sampling_loss_reaches_patch_embedding_unless_detached():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 32, 32)
    for detach, expect_grad in [(False, True), (True, False)]:
        model = tiny("adaptive", sampler_detach_input=detach)
        out = model(x)
        err = torch.rand(2, out.pred.shape[1])
        sampling_loss(out.log_probs, out.masked_idx, err).backward()
        g = model.encoder.patch_embed.proj.weight.grad
        assert (g is not None and g.abs().sum() > 0) == expect_grad
        assert model.encoder.pos_embed_probs.grad.abs().sum() > 0


def test_no_weight_decay_names_exist():
    model = tiny("adaptive")
    names = dict(model.named_parameters())
    for n in model.no_weight_decay():
        assert n in names or n == "pos_embed"
    # AdaMAE decays the sampler's position table (its skip list does not name it)
    assert "encoder.pos_embed_probs" not in model.no_weight_decay()


@pytest.mark.parametrize("num_sample", [1, 2, 3])
def test_mask_noise_follows_each_clip_to_its_process(num_sample):
    """With 2 processes, rank r's clips (num_sample per video, videos r, r+2, ... of the global batch) get exactly the
    noise rows the 1-process run gives the same clips; with num_sample 1 the table is what it always was."""
    from engine_for_pretraining import mask_noise

    videos, n, cpu = 3, 5, torch.device("cpu")
    full = mask_noise(7, 11, 2 * videos * num_sample, n, cpu, num_sample, world=1, rank=0)
    full = full.view(2 * videos, num_sample, n)
    for rank in (0, 1):
        mine = mask_noise(7, 11, videos * num_sample, n, cpu, num_sample, world=2, rank=rank)
        assert torch.equal(mine.view(videos, num_sample, n), full[rank::2])
    if num_sample == 1:
        gen = torch.Generator().manual_seed(7 * 1_000_003 + 11)
        assert torch.equal(full.view(2 * videos, n), torch.rand(2 * videos, n, generator=gen))
