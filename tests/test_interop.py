"""Reference equivalence: timm VisionTransformer -> vitdiff ViT with copied weights gives the same numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitdiff.interop import vit_from_timm
from vitdiff.vit import ViT

timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is a dev dependency")

CONFIGS = {
    "cifar-like": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10),
    "mnist-like": dict(img_size=28, patch_size=7, in_chans=1, embed_dim=48, depth=3, num_heads=3, num_classes=10),
    "imagenet-size": dict(img_size=224, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=1000),
    "no-qkv-bias": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                        qkv_bias=False, mlp_ratio=2.0),
    "avg-pool": dict(img_size=16, patch_size=2, embed_dim=40, depth=2, num_heads=5, num_classes=4,
                     global_pool="avg", fc_norm=False, mlp_ratio=3.0),
    "no-head": dict(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=0),
}


def random_timm_vit(**kwargs) -> nn.Module:
    """A timm VisionTransformer with every parameter random (no zero biases, no unit norms), in eval mode."""
    model = timm_vit.VisionTransformer(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            fan_in = math.prod(p.shape[1:]) if p.ndim >= 2 and p.shape[0] > 1 else 4
            p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vit_from_timm_gives_equal_outputs(name):
    config = CONFIGS[name]
    reference = random_timm_vit(**config)
    model = vit_from_timm(reference)
    assert isinstance(model, ViT) and not model.training
    assert model.config["global_pool"] == config.get("global_pool", "token")
    x = torch.randn(2, config.get("in_chans", 3), config["img_size"], config["img_size"])
    with torch.no_grad():
        expected_features, features = reference.forward_features(x), model.forward_features(x)
        expected, out = reference(x), model(x)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert expected.abs().max() > 0.1  # the comparison is not between near-zero numbers
    assert (features - expected_features).abs().max() <= 1e-5
    assert (out - expected).abs().max() <= 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), reference.forward_head(expected_features, pre_logits=True),
                                   atol=1e-5, rtol=0)


def test_vit_from_timm_is_independent_and_keeps_dtype_and_mode():
    reference = random_timm_vit(**CONFIGS["no-head"]).double().train()
    model = vit_from_timm(reference)
    assert model.training and model.pos_embed.dtype == torch.float64
    model.eval(), reference.eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-12, rtol=0)
        reference.blocks[0].attn.qkv.weight.add_(1.0)  # the copy does not share storage with timm's model
        assert not torch.allclose(model(x), reference(x))


def test_qkv_is_split_into_q_and_kv():
    reference = random_timm_vit(**CONFIGS["cifar-like"])
    model = vit_from_timm(reference)
    qkv, attn = reference.blocks[1].attn.qkv, model.blocks[1].attn
    assert torch.equal(attn.q.weight, qkv.weight[:64]) and torch.equal(attn.kv.weight, qkv.weight[64:])
    assert torch.equal(attn.q.bias, qkv.bias[:64]) and torch.equal(attn.kv.bias, qkv.bias[64:])


SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_token=False, global_pool="avg", fc_norm=False), "class token"),
    (dict(global_pool="avg"), "fc_norm"),
    (dict(global_pool="map"), "global_pool='map'"),
    (dict(global_pool="max", fc_norm=False), "global_pool='max'"),
    (dict(reg_tokens=4), "register tokens"),
    (dict(init_values=1e-5), "layer scale"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(no_embed_class=True), "no_embed_class"),
    (dict(pre_norm=True), "pre_norm"),
    (dict(final_norm=False), "final norm"),
    (dict(pos_embed="none"), "position embedding"),
    (dict(dynamic_img_size=True), "dynamic"),
    (dict(norm_layer="rmsnorm"), "LayerNorm"),
    (dict(act_layer="gelu_tanh"), "GELU"),
    (dict(proj_bias=False), "bias"),
    (dict(img_size=(16, 8)), "not square"),
])
def test_vit_from_timm_rejects_unsupported_variants(kwargs, match):
    reference = timm_vit.VisionTransformer(**{**SMALL, **kwargs})
    with pytest.raises(ValueError, match=match):
        vit_from_timm(reference)


def test_vit_from_timm_rejects_other_models():
    with pytest.raises(TypeError, match="VisionTransformer.*ViT"):
        vit_from_timm(ViT(**{**SMALL, "mlp_ratio": 2.0}))
