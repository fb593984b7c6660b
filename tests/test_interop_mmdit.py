"""Reference equivalence for the MMDiT: diffusers' SD3Transformer2DModel, every tensor random, copied into vitdiff's
MMDiT with `interop.mmdit_from_diffusers`; equal outputs in float32 (with and without QK-norm, with a fixed or a
cropped position table, at several input sizes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitdiff.interop import mmdit_from_diffusers
from vitdiff.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency")

TOLERANCE = 1e-4
# diffusers SD3Transformer2DModel arguments (caption_projection_dim = heads * head_dim, the model width)
CONFIGS = {
    "plain": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20,
                  out_channels=4, pos_embed_max_size=None, qk_norm=None),
    "qk-norm": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                    pooled_projection_dim=20, out_channels=4, pos_embed_max_size=None, qk_norm="rms_norm"),
    "cropped-qk-norm": dict(sample_size=8, patch_size=2, in_channels=3, num_layers=3, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                            pooled_projection_dim=20, out_channels=6, pos_embed_max_size=8, qk_norm="rms_norm"),
    "cropped-one-layer": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                              num_attention_heads=3, joint_attention_dim=24, caption_projection_dim=48,
                              pooled_projection_dim=20, out_channels=4, pos_embed_max_size=6, qk_norm=None),
}


def random_sd3(config: dict, seed: int = 0) -> nn.Module:
    """A diffusers SD3Transformer2DModel whose every stored tensor is random: zero-initialised adaLN and output
    layers, RMSNorm scales and (when stored: pos_embed_max_size) the position table too."""
    model = diffusers.SD3Transformer2DModel(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            fan_in = math.prod(tensor.shape[1:]) if tensor.ndim >= 2 else 4
            tensor.copy_(torch.randn(tensor.shape, generator=g) / math.sqrt(fan_in))
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                tensor.abs_().add_(0.5)  # QK-norm scales: positive, around one
    return model.eval()


def inputs(config: dict, size: tuple[int, int] | None = None, b: int = 3, m: int = 7):
    """Latents, timesteps over 0..1000 (one fractional), text tokens and pooled vectors."""
    g = torch.Generator().manual_seed(1)
    h, w = size or (config["sample_size"], config["sample_size"])
    x = torch.randn(b, config["in_channels"], h, w, generator=g)
    t = torch.tensor([0.0, 437.5, 999.0])[:b]
    context = torch.randn(b, m, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(b, config["pooled_projection_dim"], generator=g)
    return x, t, context, pooled


def compare(reference: nn.Module, model: MMDiT, config: dict, size: tuple[int, int] | None = None) -> float:
    """Largest |output difference| of the two models on the same inputs (diffusers: no text mask)."""
    x, t, context, pooled = inputs(config, size)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        out = model(x, t, context, pooled)
    assert out.shape == expected.shape and expected.abs().max() > 0.1
    return (out - expected).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mmdit_from_diffusers_gives_equal_outputs(name):
    config = CONFIGS[name]
    reference = random_sd3(config)
    model = mmdit_from_diffusers(reference)
    assert isinstance(model, MMDiT) and not model.training
    assert model.config["qk_norm"] == config["qk_norm"]
    assert model.config["pos_embed_max_size"] == config["pos_embed_max_size"]
    assert compare(reference, model, config) <= TOLERANCE


@pytest.mark.parametrize("size", [(8, 8), (12, 12), (4, 4), (16, 8), (6, 14)])
def test_cropped_position_table_at_other_sizes(size):
    """pos_embed_max_size: both models take the centre crop of the stored (random) table for each grid."""
    config = CONFIGS["cropped-qk-norm"]
    reference = random_sd3(config)
    model = mmdit_from_diffusers(reference)
    torch.testing.assert_close(model.pos_embed, reference.pos_embed.pos_embed, rtol=0, atol=0)
    assert compare(reference, model, config, size) <= TOLERANCE


@pytest.mark.parametrize("name", list(CONFIGS))
def test_untouched_position_tables_agree(name):
    """vitdiff computes the same tables as diffusers: fixed (sample_size grid) or stretched over it (max size)."""
    config = CONFIGS[name]
    theirs = diffusers.SD3Transformer2DModel(**config).pos_embed.pos_embed
    ours = MMDiT(input_size=config["sample_size"], patch_size=2, in_channels=config["in_channels"],
                 hidden_size=config["caption_projection_dim"], depth=1, num_heads=config["num_attention_heads"],
                 context_dim=24, pooled_dim=20, pos_embed_max_size=config["pos_embed_max_size"]).pos_embed
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_rebuilds_from_config_and_keeps_mode():
    config = CONFIGS["cropped-qk-norm"]
    reference = random_sd3(config).train()
    model = mmdit_from_diffusers(reference)
    assert model.training
    rebuilt = MMDiT(**model.config)
    rebuilt.load_state_dict(model.state_dict())  # the cropped table travels with the weights
    assert compare(reference.eval(), rebuilt.eval(), config) <= TOLERANCE


def test_the_mask_is_what_diffusers_lacks():
    """diffusers' SD3 attends to every text token, padding too; vitdiff masks padding, so padding changes nothing."""
    config = CONFIGS["qk-norm"]
    reference = random_sd3(config)
    model = mmdit_from_diffusers(reference)
    x, t, context, pooled = inputs(config)
    garbage = 3 * torch.randn(3, 4, config["joint_attention_dim"])
    long_context = torch.cat([context, garbage], dim=1)
    mask = torch.cat([torch.ones(3, 7, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        theirs_padded = reference(x, encoder_hidden_states=long_context, pooled_projections=pooled, timestep=t).sample
        ours_padded = model(x, t, long_context, pooled, context_mask=mask)
    assert (ours_padded - expected).abs().max() <= TOLERANCE
    assert (theirs_padded - expected).abs().max() > 1e-2


def test_mmdit_from_diffusers_errors():
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        mmdit_from_diffusers(nn.Linear(2, 2))
    base = CONFIGS["plain"]
    for change, message in ((dict(dual_attention_layers=(0,)), "dual_attention_layers=\\(0,\\)"),
                            (dict(qk_norm="layer_norm"), "qk_norm='layer_norm'"),
                            (dict(caption_projection_dim=16), "caption_projection_dim=16 differs")):
        with pytest.raises(ValueError, match=message):
            mmdit_from_diffusers(diffusers.SD3Transformer2DModel(**(base | change)))
    odd = diffusers.SD3Transformer2DModel(**base)
    with torch.no_grad():
        odd.pos_embed.pos_embed.add_(1.0)  # a fixed table that is not the sin-cos one
    with pytest.raises(ValueError, match="not the fixed 2-D sin-cos table"):
        mmdit_from_diffusers(odd)
