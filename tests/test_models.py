"""Model core: shapes, masks, checkpoint layouts of every registered model, precision, gradients."""
import re

import pytest
import timm
import torch

import modeling_finetune  # noqa: F401  (registers the models)
import modeling_pretrain  # noqa: F401
from masking_generator import num_visible_tokens
from modeling_pretrain import PretrainOutput, create_pretrain_model
from token_ops import masked_indices

SIZES = {"small": (384, 12, 192), "base": (768, 12, 384), "large": (1024, 24, 512), "huge": (1280, 32, 640)}


def _block_layout(prefix: str, dim: int, qkv_bias: bool = True, mlp: int = 4) -> dict[str, tuple]:
    keys = {f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,)}
    if qkv_bias:
        keys.update({f"{prefix}.attn.q_bias": (dim,), f"{prefix}.attn.v_bias": (dim,)})
    keys.update({
        f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.proj.weight": (dim, dim),
        f"{prefix}.attn.proj.bias": (dim,), f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (mlp * dim, dim), f"{prefix}.mlp.fc1.bias": (mlp * dim,),
        f"{prefix}.mlp.fc2.weight": (dim, mlp * dim), f"{prefix}.mlp.fc2.bias": (dim,),
    })
    return keys


def videomae_pretrain_layout(dim: int, depth: int, dec_dim: int, dec_depth: int, num_patches: int,
                             adaptive: bool) -> dict[str, tuple]:
    """The released VideoMAE (REFERENCE_CODEBASES §2.8) / AdaMAE pre-training layout, written out independently."""
    keys: dict[str, tuple] = {"mask_token": (1, 1, dec_dim)}
    if adaptive:
        keys["encoder.pos_embed_probs"] = (1, num_patches, dim)
    keys.update({"encoder.patch_embed.proj.weight": (dim, 3, 2, 16, 16), "encoder.patch_embed.proj.bias": (dim,)})
    for i in range(depth):
        keys.update(_block_layout(f"encoder.blocks.{i}", dim))
    keys.update({"encoder.norm.weight": (dim,), "encoder.norm.bias": (dim,)})
    if adaptive:
        keys.update(_block_layout("encoder.get_token_probs.0", dim, qkv_bias=False))
        keys.update({"encoder.get_token_probs.1.weight": (1, dim), "encoder.get_token_probs.1.bias": (1,)})
    for i in range(dec_depth):
        keys.update(_block_layout(f"decoder.blocks.{i}", dec_dim))
    keys.update({"decoder.norm.weight": (dec_dim,), "decoder.norm.bias": (dec_dim,),
                 "decoder.head.weight": (1536, dec_dim), "decoder.head.bias": (1536,),
                 "encoder_to_decoder.weight": (dec_dim, dim)})
    return keys


def videomae_finetune_layout(dim: int, depth: int, num_classes: int) -> dict[str, tuple]:
    keys = {"patch_embed.proj.weight": (dim, 3, 2, 16, 16), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        keys.update(_block_layout(f"blocks.{i}", dim))
    keys.update({"fc_norm.weight": (dim,), "fc_norm.bias": (dim,),
                 "head.weight": (num_classes, dim), "head.bias": (num_classes,)})
    return keys


def _layout(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("mask_type", ["adaptive", "learnable", "tube", "random", "frame"])
def test_pretrain_state_dict_matches_reference_layout(size, mask_type):
    dim, depth, dec_dim = SIZES[size]
    with torch.device("meta"):
        model = timm.create_model(f"pretrain_videomae_{size}_patch16_224", mask_type=mask_type,
                                  mask_ratio=0.9, decoder_depth=4)
    adaptive = mask_type in ("adaptive", "learnable")
    assert _layout(model) == videomae_pretrain_layout(dim, depth, dec_dim, 4, 1568, adaptive)


def test_adamae_base_parameter_count_and_key_order():
    with torch.device("meta"):
        model = timm.create_model("pretrain_videomae_base_patch16_224", mask_type="learnable", mask_ratio=0.95)
    sd = model.state_dict()
    # Counts checked against the released code in REFERENCE_CODEBASES §2.8.
    assert len(sd) == 232 and sum(v.numel() for v in sd.values()) == 102_501_505
    assert list(sd)[:3] == ["mask_token", "encoder.pos_embed_probs", "encoder.patch_embed.proj.weight"]
    assert list(sd)[-1] == "encoder_to_decoder.weight"
    # The sampler block: LayerNorm eps 1e-5, no qkv bias, 8 heads, dropout 0.1.
    blk = model.encoder.get_token_probs[0]
    assert blk.norm1.eps == 1e-5 and blk.attn.q_bias is None and blk.attn.num_heads == 8
    assert blk.attn.proj_drop.p == 0.1
    with torch.device("meta"):
        tube = timm.create_model("pretrain_videomae_base_patch16_224", mask_type="tube", mask_ratio=0.9)
    assert sum(v.numel() for v in tube.state_dict().values()) == 94_210_944


@pytest.mark.parametrize("size,millions", [("small", "22.03"), ("base", "86.53"), ("large", "304.3"),
                                           ("huge", "632.1")])
def test_finetune_state_dict_matches_reference_layout(size, millions):
    dim, depth, _ = SIZES[size]
    with torch.device("meta"):
        model = timm.create_model(f"vit_{size}_patch16_224", num_classes=400)
    assert _layout(model) == videomae_finetune_layout(dim, depth, 400)
    decimals = len(millions.split(".")[1])  # compare at the precision REFERENCE_CODEBASES §2.1 reports
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.{decimals}f}" == millions


def test_finetune_use_cls_layout_and_strict_load_from_pretrain_encoder():
    cls_model = timm.create_model("vit_small_patch16_224", num_classes=5, use_mean_pooling=False,
                                  num_frames=4, img_size=32)
    keys = set(cls_model.state_dict())
    assert {"norm.weight", "norm.bias"} <= keys and not any(k.startswith("fc_norm") for k in keys)
    # A VideoMAE-layout encoder (with its norm) loads strictly into the use_cls classifier after prefix removal.
    pre = timm.create_model("pretrain_videomae_small_patch16_224", mask_type="tube", mask_ratio=0.75,
                            num_frames=4, img_size=32)
    enc = {k[len("encoder."):]: v for k, v in pre.state_dict().items() if k.startswith("encoder.")}
    enc.update({k: v for k, v in cls_model.state_dict().items() if k.startswith("head.")})
    cls_model.load_state_dict(enc, strict=True)


def test_finetune_accepts_all_frames_alias_and_forward():
    model = timm.create_model("vit_small_patch16_224", num_classes=7, all_frames=4, img_size=32, drop_path_rate=0.1)
    assert model.patch_embed.num_frames == 4
    model2 = timm.create_model("vit_small_patch16_224", num_classes=7, num_frames=4, img_size=32,
                               use_checkpoint=True, tubelet_size=2)
    x = torch.randn(2, 3, 4, 32, 32, requires_grad=True)
    out = model2(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model2.patch_embed.proj.weight.grad is not None
    with pytest.raises(ValueError, match="4x32x32"):
        model2(torch.randn(1, 3, 8, 32, 32))


def test_head_init_scale_and_group_matcher():
    model = timm.create_model("vit_small_patch16_224", num_classes=10, num_frames=2, img_size=16, init_scale=0.001)
    assert model.head.weight.abs().max() < 0.001 * 0.1
    gm = model.group_matcher()
    assert re.match(gm["stem"], "patch_embed.proj.weight")
    assert re.match(gm["blocks"][0][0], "blocks.3.attn.qkv.weight")


def tiny_pretrain(mask_type="adaptive", mask_ratio=0.75, frames=4, size=32, **kw):
    return timm.create_model("pretrain_videomae_small_patch16_224", mask_type=mask_type, mask_ratio=mask_ratio,
                             num_frames=frames, img_size=size, encoder_embed_dim=64, encoder_depth=2,
                             encoder_num_heads=4, decoder_embed_dim=32, decoder_num_heads=4, decoder_depth=1, **kw)


@pytest.mark.parametrize("mask_type", ["adaptive", "tube", "random", "frame"])
def test_pretrain_forward_shapes_and_exact_visible_count(mask_type):
    torch.manual_seed(0)
    ratio = 0.875 if mask_type == "frame" else 0.75
    model = tiny_pretrain(mask_type, ratio, frames=8, size=32)
    x = torch.randn(3, 3, 8, 32, 32)
    out = model(x)
    assert isinstance(out, PretrainOutput)
    pred, probs, mask = out
    n = 4 * 2 * 2
    n_vis = num_visible_tokens(mask_type, (4, 2, 2), ratio)
    assert mask.dtype == torch.bool and mask.shape == (3, n)
    assert ((~mask).sum(1) == n_vis).all()
    assert pred.shape == (3, n - n_vis, 3 * 2 * 16 * 16)
    assert torch.equal(out.masked_idx, masked_indices(mask, n - n_vis))  # pred's order, computed once
    if mask_type == "adaptive":
        assert probs.shape == (3, n) and torch.allclose(probs.sum(1), torch.ones(3))
        assert out.log_probs.dtype == torch.float32
    else:
        assert probs is None
    if mask_type == "tube":  # one spatial mask repeated over time
        grid = mask.view(3, 4, 4)
        assert (grid == grid[:, :1]).all()
    if mask_type == "frame":  # whole time slices
        grid = mask.view(3, 4, 4)
        assert (grid == grid[:, :, :1]).all() and ((~grid[:, :, 0]).sum(1) == 1).all()


@pytest.mark.parametrize("size,frames,img", [("small", 8, 112), ("small", 16, 112), ("small", 8, 224),
                                             ("small", 16, 224), ("base", 8, 112)])
def test_registered_models_forward_at_paper_and_reduced_sizes(size, frames, img):
    torch.manual_seed(0)
    model = timm.create_model(f"pretrain_videomae_{size}_patch16_224", mask_type="adaptive", mask_ratio=0.95,
                              num_frames=frames, img_size=img, decoder_depth=1)
    n = frames // 2 * (img // 16) ** 2
    with torch.no_grad():
        pred, probs, mask = model(torch.randn(1, 3, frames, img, img))
    n_vis = num_visible_tokens("adaptive", (frames // 2, img // 16, img // 16), 0.95)
    assert pred.shape == (1, n - n_vis, 1536) and probs.shape == (1, n)
    assert (~mask).sum() == n_vis


def test_external_mask_is_used_as_is():
    torch.manual_seed(0)
    model = tiny_pretrain("tube", 0.5, frames=4, size=32).eval()
    n = 2 * 2 * 2
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, [1, 2, 5, 6]] = True
    mask[1, [0, 3, 4, 7]] = True
    out = model(torch.randn(2, 3, 4, 32, 32), mask)
    assert torch.equal(out.mask, mask)
    assert out.masked_idx.tolist() == [[1, 2, 5, 6], [0, 3, 4, 7]]
    bad = mask.clone()
    bad[1, 0] = False
    with pytest.raises(ValueError, match="same number of visible"):
        model(torch.randn(2, 3, 4, 32, 32), bad)
    # nothing masked: the decoder's x[:, -0:] would have predicted every token against no masked index
    for everything in (False, True):
        with pytest.raises(ValueError, match=f"between 1 and 7 of the 8 tokens visible, not {0 if everything else 8}"):
            model(torch.randn(2, 3, 4, 32, 32), torch.full((2, n), everything))


def test_decoder_predictions_follow_ascending_masked_order():
    """Swapping two masked tokens' pixels swaps nothing in the order: predictions are tied to positions."""
    torch.manual_seed(0)
    model = tiny_pretrain("random", 0.5, frames=4, size=32).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    mask = torch.tensor([[True, False, True, False, True, False, True, False]])
    pred = model(x, mask).pred
    # Rebuild the decoder input by hand in ascending order and compare.
    tokens = model.encoder.patch_embed(x)
    vis = torch.tensor([[1, 3, 5, 7]])
    masked = torch.tensor([[0, 2, 4, 6]])
    enc = model.encoder_to_decoder(model.encoder(tokens, vis))
    pos = model.pos_embed
    dec_in = torch.cat([enc + pos[:, vis[0]], model.mask_token + pos[:, masked[0]]], dim=1)
    assert torch.allclose(pred, model.decoder(dec_in, 4), atol=1e-6)


def test_bf16_autocast_forward_on_cpu_keeps_sampler_in_fp32():
    torch.manual_seed(0)
    model = tiny_pretrain("adaptive", 0.75)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 4, 32, 32))
    assert out.pred.dtype == torch.bfloat16
    assert out.probs.dtype == torch.float32 and out.log_probs.dtype == torch.float32
    assert torch.isfinite(out.pred.float()).all()


def test_use_checkpoint_gives_same_gradients():
    torch.manual_seed(0)
    a = tiny_pretrain("tube", 0.5)
    b = tiny_pretrain("tube", 0.5, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 4, 32, 32)
    mask = a.mask_generator(2, torch.device("cpu"))
    a(x, mask).pred.square().mean().backward()
    b(x, mask).pred.square().mean().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_sampler_options_build_ablation_variants():
    for kw in [dict(sampler_type="mlp"), dict(sampler_depth=2, sampler_dim=32), dict(sampler_dim=32)]:
        model = tiny_pretrain("adaptive", 0.75, **kw)
        out = model(torch.randn(1, 3, 4, 32, 32))
        assert out.probs.shape == (1, 8)
    proj = tiny_pretrain("adaptive", 0.75, sampler_dim=32).encoder.get_token_probs
    assert isinstance(proj[0], torch.nn.Linear) and proj[0].out_features == 32
    with pytest.raises(ValueError, match="sampler_type"):
        tiny_pretrain("adaptive", 0.75, sampler_type="cnn")


def test_temperature_divides_logits():
    torch.manual_seed(0)
    m1 = tiny_pretrain("adaptive", 0.75).eval()
    m2 = tiny_pretrain("adaptive", 0.75, sampler_temperature=2.0).eval()
    m2.load_state_dict(m1.state_dict())
    with torch.no_grad():
        m1.encoder.get_token_probs[-2].weight.normal_()
        m2.encoder.get_token_probs[-2].weight.copy_(m1.encoder.get_token_probs[-2].weight)
        x = torch.randn(1, 3, 4, 32, 32)
        t = m1.encoder.patch_embed(x)
        lp1, lp2 = m1.encoder.token_log_probs(t), m2.encoder.token_log_probs(t)
    assert torch.allclose(torch.log_softmax(lp1 / 2.0, -1), lp2, atol=1e-5)


def test_bad_mask_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match="visible"):
        tiny_pretrain("adaptive", 0.999)
    with pytest.raises(ValueError, match="unknown mask_type"):
        tiny_pretrain("checkerboard", 0.5)


def test_create_pretrain_model_maps_every_pretraining_flag(monkeypatch):
    """The one builder from pre-training flags: each flag reaches its constructor argument, overrides win, and
    the tiny model it builds is the one those arguments describe."""
    import run_mae_pretraining

    args = run_mae_pretraining.get_args_parser().parse_args([
        "--model", "pretrain_videomae_small_patch16_224", "--mask_type", "learnable", "--mask_ratio", "0.75",
        "--decoder_depth", "1", "--num_frames", "4", "--input_size", "32", "--tubelet_size", "1",
        "--drop_path", "0.1", "--use_checkpoint", "--sampler_type", "mlp", "--sampler_depth", "2",
        "--sampler_dim", "16", "--sampler_heads", "2", "--sampler_temperature", "2.0", "--sampler_detach_input",
        "--model_kwargs", '{"encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2}'])
    calls = []
    monkeypatch.setattr(modeling_pretrain.timm, "create_model", lambda name, **kw: calls.append((name, kw)))
    create_pretrain_model(args)
    create_pretrain_model(args, mask_type="tube", mask_ratio=0.5)
    expected = dict(mask_type="learnable", mask_ratio=0.75, decoder_depth=1, num_frames=4, img_size=32,
                    tubelet_size=1, drop_path_rate=0.1, use_checkpoint=True, sampler_type="mlp", sampler_depth=2,
                    sampler_dim=16, sampler_heads=2, sampler_temperature=2.0, sampler_detach_input=True,
                    encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2)
    assert calls[0] == ("pretrain_videomae_small_patch16_224", expected)
    assert calls[1] == ("pretrain_videomae_small_patch16_224", {**expected, "mask_type": "tube", "mask_ratio": 0.5})
    monkeypatch.undo()
    model = create_pretrain_model(args)
    assert model.mask_type == "adaptive" and model.tubelet_size == 1 and model.num_patches == 16
    assert model.encoder.sampler_detach_input and model.encoder.sampler_temperature == 2.0
    assert model.encoder.use_checkpoint and len(model.decoder.blocks) == 1
