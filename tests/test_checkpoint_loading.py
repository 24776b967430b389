"""Loading pre-training / released / fine-tuned checkpoints into the classifier (checkpoint_loading.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeling_finetune  # noqa: E402,F401
import modeling_pretrain  # noqa: E402,F401
from checkpoint_loading import (CheckpointMismatchError, checkpoint_files, interpolate_pos_embed,  # noqa: E402
                                load_pretrained_encoder, read_checkpoint)
from modeling_finetune import get_sinusoid_encoding_table  # noqa: E402

ENC = dict(embed_dim=32, depth=2, num_heads=2)


def pretrain_model(**kw) -> torch.nn.Module:
    cfg = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1,
               decoder_num_heads=2, num_frames=4, img_size=32, mask_ratio=0.75)
    cfg.update(kw)
    return timm.create_model("pretrain_videomae_small_patch16_224", **cfg)


def classifier(num_classes: int = 5, num_frames: int = 4, img_size: int = 32, **kw) -> torch.nn.Module:
    return timm.create_model("vit_small_patch16_224", num_classes=num_classes, num_frames=num_frames,
                             img_size=img_size, **{**ENC, **kw})


def encoder_keys_equal(model: torch.nn.Module, pre_sd: dict) -> None:
    for k, v in model.state_dict().items():
        if k.startswith(("patch_embed.", "blocks.")):
            assert torch.equal(v, pre_sd["encoder." + k]), k


def test_our_pretraining_checkpoint_loads_encoder_and_drops_decoder_sampler(tmp_path):
    pre = pretrain_model()
    sd = pre.state_dict()
    assert "encoder.pos_embed_probs" in sd and any(k.startswith("encoder.get_token_probs.") for k in sd)
    path = tmp_path / "checkpoint-latest.pth"
    torch.save({"model": sd, "kind": "pretrain", "epoch": 3, "args": {"num_frames": 4, "input_size": 32}}, path)
    model = classifier()
    head_before = model.head.weight.clone()
    report = load_pretrained_encoder(model, str(path), verbose=False)
    encoder_keys_equal(model, sd)
    assert report.model_key == "model" and report.kind == "pretrain"
    reasons = set(report.dropped.values())
    assert {"pre-training decoder", "AdaMAE sampler", "pre-training mask token",
            "pre-training decoder projection"} <= reasons
    assert "encoder.norm.weight" in report.dropped or "norm.weight" in report.dropped
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == [] and not report.head_loaded
    assert torch.equal(model.head.weight, head_before)
    text = str(report)
    assert "missing" in text and "dropped" in text and "sinusoid" in text


def test_released_layouts_module_key_compile_prefix_and_top_level(tmp_path):
    sd = pretrain_model(mask_type="tube").state_dict()  # VideoMAE layout: no sampler keys
    compiled = {"_orig_mod." + k: v for k, v in sd.items()}
    for i, ckpt in enumerate([{"module": sd}, {"model": compiled}, dict(sd), {"module": {"module." + k: v for k, v
                                                                                        in sd.items()}}]):
        p = tmp_path / f"ckpt{i}.pth"
        torch.save(ckpt, p)
        model = classifier()
        report = load_pretrained_encoder(model, str(p), verbose=False)
        encoder_keys_equal(model, sd)
        assert report.unexpected == []
    assert report.model_key == "module"


def test_head_dropped_when_class_count_differs_and_kept_when_equal(tmp_path):
    src = classifier(num_classes=7)
    torch.save({"model": src.state_dict(), "kind": "finetune"}, tmp_path / "ft.pth")
    other = classifier(num_classes=5)
    report = load_pretrained_encoder(other, str(tmp_path / "ft.pth"), verbose=False)
    assert "head.weight" in report.dropped and "class count differs" in report.dropped["head.weight"]
    assert torch.equal(other.fc_norm.weight, src.fc_norm.weight)
    same = classifier(num_classes=7)
    report = load_pretrained_encoder(same, str(tmp_path / "ft.pth"), require_head=True, verbose=False)
    # --eval with another class count: the head does not fit (it is a classifier, not a pre-training checkpoint)
    with pytest.raises(CheckpointMismatchError, match=r"ft.pth's classifier head is for 7 classes, this run's for 3 "
                                                      r"\(--nb_classes / --data_set\)"):
        load_pretrained_encoder(classifier(num_classes=3), str(tmp_path / "ft.pth"), require_head=True,
                                verbose=False)
    assert report.head_loaded and torch.equal(same.head.weight, src.head.weight)
    assert report.missing == []


def test_fails_loudly_on_missing_or_misshaped_encoder_and_on_eval_of_pretrain(tmp_path):
    sd = pretrain_model().state_dict()
    broken = {k: v for k, v in sd.items() if not k.startswith("encoder.blocks.1.")}
    with pytest.raises(CheckpointMismatchError, match="encoder weights do not match.*blocks.1"):
        load_pretrained_encoder(classifier(), {"model": broken}, verbose=False)
    with pytest.raises(CheckpointMismatchError, match="encoder weights do not match"):
        load_pretrained_encoder(classifier(depth=1), {"model": sd}, verbose=False)  # deeper checkpoint
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        load_pretrained_encoder(classifier(embed_dim=64, num_heads=2), {"model": sd}, verbose=False)
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        load_pretrained_encoder(classifier(tubelet_size=1), {"model": sd}, verbose=False)
    with pytest.raises(CheckpointMismatchError, match="no classifier head"):
        load_pretrained_encoder(classifier(), {"model": sd}, require_head=True, verbose=False)
    with pytest.raises(CheckpointMismatchError, match="no state dict"):
        load_pretrained_encoder(classifier(), {"epoch": 1}, verbose=False)


def test_a_classifier_with_other_pooling_is_refused_not_half_loaded():
    """A fine-tuned head over first-token LayerNorm (--use_cls) loaded into a mean-pooling model (or the reverse)
    would load every block and the head, leave fc_norm at its initialisation, and give meaningless accuracy."""
    cls_pooled = classifier(num_classes=3, use_mean_pooling=False)
    mean_pooled = classifier(num_classes=3)
    for src, dst in ((cls_pooled, classifier(num_classes=3)), (mean_pooled, classifier(num_classes=3,
                                                                                        use_mean_pooling=False))):
        for require_head in (True, False):
            with pytest.raises(CheckpointMismatchError, match="another --use_cls"):
                load_pretrained_encoder(dst, {"model": src.state_dict()}, require_head=require_head, verbose=False)
    # the same pooling loads; another class count drops the head and keeps the (fresh) pooling norm as it is
    report = load_pretrained_encoder(classifier(num_classes=3), {"model": mean_pooled.state_dict()}, verbose=False)
    assert report.head_loaded and not report.missing
    report = load_pretrained_encoder(classifier(num_classes=7), {"model": cls_pooled.state_dict()}, verbose=False)
    assert not report.head_loaded and "norm.weight" in report.dropped


def test_interpolate_pos_embed_time_and_space():
    d = 3
    # values = t: time is resized linearly (half-pixel centres), space is left alone
    table = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 14, 14, d).reshape(1, -1, d)
    out = interpolate_pos_embed(table, (8, 14, 14), (4, 14, 14)).view(4, 14, 14, d)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    # spatially constant per frame: a spatial resize keeps it, and the grid is right
    out = interpolate_pos_embed(table, (8, 14, 14), (8, 10, 10))
    assert out.shape == (1, 800, d) and torch.allclose(out.view(8, 100, d)[:, :, 0],
                                                        torch.arange(8.0)[:, None].expand(8, 100))
    same = interpolate_pos_embed(table, (8, 14, 14), (8, 14, 14))
    assert torch.equal(same, table)


@pytest.mark.parametrize("with_args", [True, False])
def test_learnable_pos_embed_16_to_8_frames_and_224_to_160_px(with_args):
    src = classifier(num_classes=3, num_frames=16, img_size=224, use_learnable_pos_emb=True)
    assert src.pos_embed.shape == (1, 8 * 14 * 14, 32)
    ckpt = {"model": src.state_dict()}
    if with_args:
        ckpt["args"] = {"num_frames": 16, "input_size": 224, "tubelet_size": 2}
    # time only, space only, both; without saved args 1568 tokens are VideoMAE's 8 x 14 x 14 (224 px), also for a
    # 112 px model (its own 7 x 7 frames gave 32 x 7 x 7)
    for frames, size in [(8, 224), (16, 160), (8, 160), (8, 112)]:
        dst = classifier(num_classes=3, num_frames=frames, img_size=size, use_learnable_pos_emb=True)
        report = load_pretrained_encoder(dst, ckpt, verbose=False)
        grid = (frames // 2, size // 16, size // 16)
        assert report.reshaped["pos_embed"] == ((1, 8 * 14 * 14, 32), (1, grid[0] * grid[1] * grid[2], 32))
        expected = interpolate_pos_embed(src.pos_embed.detach(), (8, 14, 14), grid)
        assert torch.allclose(dst.pos_embed, expected)
        with torch.no_grad():
            assert dst(torch.randn(1, 3, frames, size, size)).shape == (1, 3)


def test_a_token_count_no_grid_explains_is_refused():
    from checkpoint_loading import _infer_src_grid

    assert _infer_src_grid(1568, (4, 7, 7)) == (8, 14, 14) and _infer_src_grid(392, (4, 7, 7)) == (8, 7, 7)
    with pytest.raises(CheckpointMismatchError, match="cannot tell the token grid of a 1570-token pos_embed"):
        _infer_src_grid(1570, (4, 7, 7))


def test_sinusoid_model_rebuilds_its_table_and_drops_a_stored_one():
    src = classifier(num_frames=16, img_size=224, use_learnable_pos_emb=True)
    dst = classifier(num_frames=8, img_size=160)
    assert "pos_embed" not in dst.state_dict()  # a non-persistent buffer
    report = load_pretrained_encoder(dst, {"model": src.state_dict()}, verbose=False)
    assert report.dropped["pos_embed"] == "model uses a fixed sinusoid table"
    assert torch.equal(dst.pos_embed, get_sinusoid_encoding_table(4 * 10 * 10, 32))


def test_deepspeed_folder_is_read_from_its_model_states(tmp_path):
    src = classifier()
    tag = tmp_path / "checkpoint-3"
    tag.mkdir()
    torch.save({"module": src.state_dict(), "epoch": 3}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("checkpoint-3")
    assert set(read_checkpoint(tmp_path)["module"]) == set(src.state_dict())
    dst = classifier()
    report = load_pretrained_encoder(dst, str(tag), require_head=True, verbose=False)
    assert report.model_key == "module" and torch.equal(dst.head.weight, src.head.weight)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.pth")


def test_checkpoint_files_are_what_read_checkpoint_reads(tmp_path):
    """The files a features cache fingerprints: the file itself, a DeepSpeed folder's model states (through
    ``latest``), nothing for a URL."""
    tag = tmp_path / "checkpoint-3"
    tag.mkdir()
    torch.save({"module": classifier().state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("checkpoint-3")
    states = str(tag / "mp_rank_00_model_states.pt")
    assert checkpoint_files(tmp_path) == checkpoint_files(tag) == checkpoint_files(states) == [states]
    assert checkpoint_files("https://example.org/ckpt.pth") == []
