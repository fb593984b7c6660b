"""Tests of vitdiff.vit: shapes, pooling, position embeddings, attention maps and rollout, errors, overfitting."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vitdiff.layers import get_2d_sincos_pos_embed
from vitdiff.vit import ViT, attention_rollout, distillation_loss

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4,
            mlp_ratio=2.0)


def tiny_vit(**overrides) -> ViT:
    """A 16×16, patch-4 ViT: 16 patch tokens (+1 CLS), width 32, two blocks."""
    return ViT(**{**TINY, **overrides}).eval()


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("pos_embed", ["learn", "sincos"])
def test_output_shapes(global_pool, pos_embed):
    model = tiny_vit(global_pool=global_pool, pos_embed=pos_embed)
    x = torch.rand(3, 3, 16, 16)
    assert model(x).shape == (3, 5)
    features = model.forward_features(x)
    assert features.shape == (3, 17, 32)
    assert model.forward_head(features).shape == (3, 5)
    assert model.forward_head(features, pre_logits=True).shape == (3, 32)
    assert model.embed(x).shape == (3, 32)
    torch.testing.assert_close(model.forward_head(features), model(x))


def test_pooling_reads_the_right_tokens():
    x = torch.rand(2, 3, 16, 16)
    token = tiny_vit(global_pool="token")
    features = token.forward_features(x)
    torch.testing.assert_close(token.embed(x), features[:, 0])
    avg = tiny_vit(global_pool="avg")
    features = avg.forward_features(x)
    torch.testing.assert_close(avg.embed(x), features[:, 1:].mean(dim=1))
    no_cls = tiny_vit(global_pool="avg", class_token=False)
    assert no_cls.forward_features(x).shape == (2, 16, 32)
    assert no_cls(x).shape == (2, 5)


def test_position_embeddings():
    learned = tiny_vit(pos_embed="learn")
    assert isinstance(learned.pos_embed, torch.nn.Parameter) and learned.pos_embed.shape == (1, 17, 32)
    fixed = tiny_vit(pos_embed="sincos")
    assert not any(p is fixed.pos_embed for p in fixed.parameters())
    torch.testing.assert_close(fixed.pos_embed[0], get_2d_sincos_pos_embed(32, 4, cls_token=True))
    # positions matter: the same patches in another order give other features
    x = torch.rand(1, 3, 16, 16)
    swapped = torch.cat([x[..., 8:, :], x[..., :8, :]], dim=-2)  # swap top and bottom halves
    for model in (learned, fixed):
        assert not torch.allclose(model(x), model(swapped), atol=1e-4)


def test_no_num_classes_gives_embeddings():
    model = tiny_vit(num_classes=0)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 32)


def test_config_rebuilds_the_model():
    model = tiny_vit(global_pool="avg", pos_embed="sincos")
    config = json.loads(json.dumps(model.config))  # JSON-serialisable
    rebuilt = ViT(**config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_attention_maps_shapes_and_agreement_with_forward():
    model = tiny_vit(depth=3)
    x = torch.rand(2, 3, 16, 16)
    maps = model.attention_maps(x)
    assert len(maps) == 3
    for weights in maps:
        assert weights.shape == (2, 4, 17, 17)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 17))

    # the last map is softmax(q kᵀ / √d) of what the last block receives during the ordinary forward pass
    seen = {}
    model.blocks[-1].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    model.forward_features(x)
    attn = model.blocks[-1].attn
    h = model.blocks[-1].norm1(seen["x"])
    q = attn.q(h).reshape(2, 17, 4, 8).transpose(1, 2)  # (B, h, T, d)
    k = attn.kv(h)[..., :32].reshape(2, 17, 4, 8).transpose(1, 2)
    torch.testing.assert_close(maps[-1], torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1),
                               atol=1e-5, rtol=1e-5)

    # running the blocks with return_attn=True (the maps path) gives the same features as forward_features
    tokens = model._tokens(x)
    for block, expected in zip(model.blocks, maps):
        tokens, weights = block(tokens, return_attn=True)
        torch.testing.assert_close(weights["self"], expected)
    torch.testing.assert_close(model.norm(tokens), model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_attention_rollout():
    model = tiny_vit(depth=3)
    maps = model.attention_maps(torch.rand(2, 3, 16, 16))
    rollout = attention_rollout(maps)
    assert rollout.shape == (2, 17, 17)
    assert (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 17))
    # one layer without the residual is just the head-averaged map
    torch.testing.assert_close(attention_rollout(maps[:1], residual=False), maps[0].mean(dim=1))
    # two layers multiply: later layer on the left
    a0 = maps[0].mean(1) + torch.eye(17)
    a1 = maps[1].mean(1) + torch.eye(17)
    expected = (a1 / a1.sum(-1, keepdim=True)) @ (a0 / a0.sum(-1, keepdim=True))
    torch.testing.assert_close(attention_rollout(maps[:2]), expected)
    with pytest.raises(ValueError, match="at least one"):
        attention_rollout([])


@pytest.mark.parametrize("bad, match", [
    (torch.rand(1, 3, 32, 32), "16x16"),
    (torch.rand(1, 1, 16, 16), "in_chans=3"),
    (torch.rand(3, 16, 16), r"\(B, C, H, W\)"),
])
def test_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit()(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_pool="max"), "global_pool"),
    (dict(global_pool="map"), "global_pool"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(pos_embed="none"), "pos_embed"),
    (dict(global_pool="token", class_token=False), "class_token"),
    (dict(img_size=18), "img_size=18"),
    (dict(embed_dim=30), "num_heads"),
])
def test_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit(**kwargs)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = ViT(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=4)
    images, labels = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:  # well past the point where every label is predicted
            break
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy == 1.0, f"train accuracy {accuracy:.2f} after overfitting (loss {loss.item():.3f})"


def test_conv_stem_gives_the_same_token_grid_and_overlapping_receptive_fields():
    patch, conv = tiny_vit(), tiny_vit(stem="conv")
    assert "stem" not in patch.config and conv.config["stem"] == "conv"
    assert conv.patch_embed.grid_size == patch.patch_embed.grid_size == 4
    assert conv.pos_embed.shape == patch.pos_embed.shape
    x = torch.rand(2, 3, 16, 16)
    tokens = conv.patch_embed(x)
    assert tokens.shape == patch.patch_embed(x).shape == (2, 16, 32)
    # a pixel changed in patch 0 reaches patch 1 through the 3x3 kernels; a hard 4x4 cut keeps it in patch 0
    y = x.clone()
    y[:, :, 1, 3] += 1.0
    with torch.no_grad():
        moved = lambda stem: (stem(y) - stem(x)).abs().sum(dim=(0, 2)) > 0  # (16,) which tokens changed
        assert moved(conv.patch_embed)[:2].tolist() == [True, True]
        assert moved(patch.patch_embed)[:2].tolist() == [True, False]
    assert isinstance(ViT(**conv.config).patch_embed, type(conv.patch_embed))  # the config rebuilds it
    with pytest.raises(ValueError, match="stem must be"):
        tiny_vit(stem="hybrid")
    with pytest.raises(ValueError, match="power of two"):
        tiny_vit(stem="conv", patch_size=3, img_size=15)
    with pytest.raises(ValueError, match="ConvStem expects"):
        conv(torch.rand(2, 3, 12, 12))


# ----------------------------------------------------------------------------- distillation (DeiT)


def test_distillation_loss_closed_form():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T, w = 3.0, 0.4
    p_teacher, log_p_student = (t / T).softmax(1), (s / T).log_softmax(1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(1).mean()
    expected = (1 - w) * F.cross_entropy(s, y) + w * T**2 * kl
    torch.testing.assert_close(distillation_loss(s, t, y, T, w), expected)
    torch.testing.assert_close(distillation_loss(s, t, y, T, 0.0), F.cross_entropy(s, y))
    # a student that already agrees with the teacher pays only the label term
    torch.testing.assert_close(distillation_loss(t, t, y, T, w), (1 - w) * F.cross_entropy(t, y))


def test_hard_distillation_uses_the_teachers_decision_only():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    expected = 0.7 * F.cross_entropy(s, y) + 0.3 * F.cross_entropy(s, t.argmax(1))
    torch.testing.assert_close(distillation_loss(s, t, y, 2.0, 0.3, hard=True), expected)
    # only the argmax matters: a sharper or hotter teacher with the same decisions gives the same loss
    torch.testing.assert_close(distillation_loss(s, 5 * t, y, 7.0, 0.3, hard=True), expected)
    # a teacher that agrees with the labels leaves plain cross-entropy
    torch.testing.assert_close(distillation_loss(s, F.one_hot(y, 5).float(), y, 2.0, 0.3, hard=True),
                               F.cross_entropy(s, y))


def test_distillation_loss_teacher_gets_no_gradient_and_bad_input():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    distillation_loss(s, t, torch.tensor([0, 1, 2, 0])).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="must both be"):
        distillation_loss(torch.randn(4, 3), torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature > 0"):
        distillation_loss(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), temperature=0)
