"""Tests of the U-Net denoiser (chapter 05): shapes, zero init, conditioning, masks, errors, overfitting."""

import json

import pytest
import torch

from vitdiff.text import TextEncoder, Tokenizer
from vitdiff.unet import ResBlock, SpatialTransformer, UNet

TINY = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
            groups=4)


def randomise(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter, so the zero-initialised layers no longer hide the conditioning."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def text_inputs(b: int = 2, m: int = 5, dim: int = 6):
    context = torch.randn(b, m, dim)
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[:, -2:] = False  # last two tokens are padding
    return context, mask


@pytest.mark.parametrize("size, channel_mult", [(16, (1, 2, 2)), (28, (1, 2)), (28, (1, 2, 2)), (32, (1, 2, 2))])
@pytest.mark.parametrize("conditioning", ["none", "class", "text"])
def test_output_shape(size, channel_mult, conditioning):
    torch.manual_seed(0)
    cfg = dict(TINY, channel_mult=channel_mult, attention_resolutions=(len(channel_mult) - 1,))
    cond = {}
    if conditioning == "class":
        cfg["num_classes"] = 10
        cond["y"] = torch.tensor([3, 10])  # 10 is the null label
    elif conditioning == "text":
        cfg["context_dim"] = 6
        cond["context"], cond["context_mask"] = text_inputs()
    model = UNet(in_channels=3, **cfg)
    x = torch.randn(2, 3, size, size)
    assert model(x, torch.tensor([0, 999]), **cond).shape == x.shape


def test_out_channels_and_non_square_input():
    model = UNet(in_channels=3, out_channels=6, **TINY)
    assert model(torch.randn(2, 3, 16, 24), torch.tensor([1, 2])).shape == (2, 6, 16, 24)


def test_group_count_clamped_to_divide_channels():
    model = UNet(base_channels=12, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), num_heads=2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(n.num_channels % n.num_groups == 0 for n in norms)
    # the largest group count <= 32 that divides the channels (36 and 48 come from skip concatenations)
    assert {(n.num_channels, n.num_groups) for n in norms} == {(12, 12), (24, 24), (36, 18), (48, 24)}
    assert model(torch.randn(1, 1, 8, 8), torch.tensor([5])).shape == (1, 1, 8, 8)


def test_untrained_model_predicts_exactly_zero():
    model = UNet(num_classes=4, context_dim=6, **TINY)
    context, mask = text_inputs()
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), y=torch.tensor([0, 4]), context=context,
                context_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))


def test_conditioning_changes_output_after_perturbation():
    model = randomise(UNet(num_classes=4, context_dim=6, **TINY))
    x = torch.randn(2, 1, 16, 16)
    t, y = torch.tensor([10, 10]), torch.tensor([1, 1])
    context, mask = text_inputs()
    base = model(x, t, y=y, context=context, context_mask=mask)
    assert base.abs().max() > 1e-3
    assert not torch.allclose(model(x, torch.tensor([500, 500]), y=y, context=context, context_mask=mask), base)
    assert not torch.allclose(model(x, t, y=torch.tensor([2, 2]), context=context, context_mask=mask), base)
    assert not torch.allclose(model(x, t, y=y, context=context + 1, context_mask=mask), base)
    scalar_t = model(x, torch.tensor(10), y=y, context=context, context_mask=mask)  # a scalar t is broadcast
    torch.testing.assert_close(scalar_t, base)


def test_padded_context_tokens_do_not_matter():
    model = randomise(UNet(context_dim=6, **TINY)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([100, 200])
    context, mask = text_inputs()
    base = model(x, t, context=context, context_mask=mask)
    changed = context.clone()
    changed[:, -2:] = torch.randn(2, 2, 6) * 10  # padded positions
    torch.testing.assert_close(model(x, t, context=changed, context_mask=mask), base, atol=1e-5, rtol=1e-5)
    changed[:, 0] += 1.0  # a real token does matter
    assert not torch.allclose(model(x, t, context=changed, context_mask=mask), base, atol=1e-4)


def test_cross_attention_maps():
    model = randomise(UNet(context_dim=6, **TINY))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([100, 200])
    context, mask = text_inputs()
    maps = model.cross_attention_maps(x, t, context, mask)
    # one SpatialTransformer per block at level 1 (1 down + 2 up) and one in the middle
    assert len(maps) == 4
    assert [m.shape for m in maps] == [(2, 2, 64, 5), (2, 2, 16, 5), (2, 2, 64, 5), (2, 2, 64, 5)]
    for m in maps:
        torch.testing.assert_close(m.sum(dim=-1), torch.ones(m.shape[:-1]))
        assert torch.all(m[..., -2:] == 0)  # padded tokens get no weight
    assert all(not s.keep_attention and s.attention is None
               for s in model.modules() if isinstance(s, SpatialTransformer))


def test_keeping_attention_does_not_change_spatial_transformer_output():
    torch.manual_seed(0)
    block = randomise(SpatialTransformer(8, num_heads=2, context_dim=6, groups=4))
    x = torch.randn(2, 8, 4, 4)
    context, mask = text_inputs()
    plain = block(x, context, mask)
    block.keep_attention = True
    torch.testing.assert_close(block(x, context, mask), plain)
    assert block.attention.shape == (2, 2, 16, 5)


def test_resblock_without_embedding():
    x = torch.randn(2, 4, 8, 8)
    block = ResBlock(4, 8, emb_dim=None, groups=4)
    assert block(x).shape == (2, 8, 8, 8)
    same = ResBlock(4, groups=4)
    torch.testing.assert_close(same(x), x)  # zero-initialised last conv: a new block is its skip path
    with pytest.raises(ValueError, match="emb_dim=None"):
        block(x, torch.randn(2, 16))
    with pytest.raises(ValueError, match="pass emb"):
        ResBlock(4, 8, emb_dim=16, groups=4)(x)


def _hand_set_resblock(channels: int = 2, emb_dim: int = 2) -> ResBlock:
    """A ResBlock whose last conv is the identity (3×3 kernel with 1 at the centre), so that its output is
    x + silu(h·(1 + scale) + shift) with h = norm2(conv1(silu(norm1(x)))) and [scale, shift] = emb_proj(silu(emb))."""
    torch.manual_seed(0)
    block = ResBlock(channels, channels, emb_dim=emb_dim, groups=1)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.weight[range(channels), range(channels), 1, 1] = 1.0
        block.conv2.bias.zero_()
    return block


def _normalised_features(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    """h = norm2(conv1(silu(norm1(x)))): the features the embedding modulates."""
    return block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x))))


def test_resblock_modulation_is_h_times_one_plus_scale_plus_shift():
    block, x = _hand_set_resblock(), torch.randn(3, 2, 5, 5)
    scale, shift = torch.tensor([0.5, -0.25]), torch.tensor([0.3, -0.7])
    with torch.no_grad():
        block.emb_proj.weight.zero_()  # emb_proj(·) = bias = [scale, shift]: the first half is the scale
        block.emb_proj.bias.copy_(torch.cat([scale, shift]))
    h = _normalised_features(block, x)
    expected = x + torch.nn.functional.silu(h * (1 + scale[:, None, None]) + shift[:, None, None])
    torch.testing.assert_close(block(x, torch.randn(3, 2)), expected)
    # scale = -1 removes the features entirely: what is left is x + silu(shift), whatever x does to h
    with torch.no_grad():
        block.emb_proj.bias.copy_(torch.cat([-torch.ones(2), shift]))
    torch.testing.assert_close(block(x, torch.randn(3, 2)), x + torch.nn.functional.silu(shift)[:, None, None])
    # a zero projection leaves the features unmodulated (the "1 +": scale 0 means "keep h")
    with torch.no_grad():
        block.emb_proj.bias.zero_()
    torch.testing.assert_close(block(x, torch.randn(3, 2)), x + torch.nn.functional.silu(h))


def test_resblock_embedding_passes_through_silu_before_its_projection():
    block, x = _hand_set_resblock(), torch.randn(2, 2, 4, 4)
    emb = torch.tensor([[-2.0, 1.5], [0.7, -0.4]])
    with torch.no_grad():  # scale = -1 (features removed), shift = silu(emb): output = x + silu(silu(emb))
        block.emb_proj.weight.copy_(torch.cat([torch.zeros(2, 2), torch.eye(2)]))
        block.emb_proj.bias.copy_(torch.tensor([-1.0, -1.0, 0.0, 0.0]))
    expected = x + torch.nn.functional.silu(torch.nn.functional.silu(emb))[:, :, None, None]
    torch.testing.assert_close(block(x, emb), expected)


def test_clear_errors():
    plain = UNet(**TINY)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="3 channels.*in_channels=1"):
        plain(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="multiples of 4"):
        plain(torch.randn(2, 1, 18, 16), t)
    with pytest.raises(ValueError, match="multiples of 4"):
        plain(torch.randn(2, 1, 16, 30), t)
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        plain(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="not class-conditional"):
        plain(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, context=torch.randn(2, 3, 6))
    labelled = UNet(num_classes=3, **TINY)
    with pytest.raises(ValueError, match="class-conditional: pass y"):
        labelled(x, t)
    with pytest.raises(ValueError, match="0..3"):
        labelled(x, t, y=torch.tensor([0, 4]))
    texted = UNet(context_dim=6, **TINY)
    with pytest.raises(ValueError, match="text-conditional: pass context"):
        texted(x, t)
    with pytest.raises(ValueError, match="context_dim"):
        texted(x, t, context=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="at least one True"):
        texted(x, t, context=torch.randn(2, 3, 6), context_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs a text-conditional"):
        plain.cross_attention_maps(x, t, torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(**dict(TINY, attention_resolutions=(3,)))


def test_config_rebuilds_the_model():
    model = UNet(num_classes=5, context_dim=6, **TINY)
    config = json.loads(json.dumps(model.config))
    rebuilt = UNet(**config)
    rebuilt.load_state_dict(model.state_dict())  # same parameter names and shapes
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_runs_under_bfloat16_autocast():
    model = randomise(UNet(context_dim=6, **TINY))
    context, mask = text_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), context=context, context_mask=mask)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


def test_text_encoder_trains_jointly_through_cross_attention():
    tokenizer = Tokenizer(["red", "blue", "circle"], max_length=4)
    encoder = TextEncoder(tokenizer.vocab_size, tokenizer.max_length, dim=8, depth=1, num_heads=2)
    model = randomise(UNet(context_dim=8, **TINY))
    ids, mask = tokenizer.encode(["red circle", "blue"])
    tokens, mask, _ = encoder(ids, mask)
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([5, 5]), context=tokens, context_mask=mask)
    out.square().mean().backward()
    assert encoder.token_embed.weight.grad.abs().sum() > 0


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
                 groups=4)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.full((4,), 500)
    x_t = 0.5**0.5 * x0 + 0.5**0.5 * noise  # a fixed noisy batch at alpha_bar = 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = (model(x_t, t) - noise).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def _jitter(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every weight (a fresh U-Net's output layer is all zero, which would hide any difference)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_pooled_vector_is_added_to_the_timestep_embedding():
    torch.manual_seed(0)
    model = _jitter(UNet(in_channels=1, base_channels=8, channel_mult=(1, 2), attention_resolutions=(), groups=4,
                         pooled_dim=6))
    assert model.config["pooled_dim"] == 6
    x, t, pooled = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.randn(2, 6)
    with torch.no_grad():
        out = model(x, t, pooled=pooled)
        other = model(x, t, pooled=pooled.flip(0))
        # the pooled vector enters only through emb = time_embed(t) + pooled_embed(pooled): with its projection
        # zeroed, the model is the plain U-Net whatever `pooled` holds
        model.pooled_embed.weight.zero_()
        model.pooled_embed.bias.zero_()
        zeroed = model(x, t, pooled=pooled)
        plain = UNet(in_channels=1, base_channels=8, channel_mult=(1, 2), attention_resolutions=(), groups=4)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pooled_embed")})
        assert torch.allclose(zeroed, plain.eval()(x, t), atol=1e-6)
    assert (out - other).abs().mean() > 1e-3, "the pooled vector must change the prediction"
    with pytest.raises(ValueError, match="pooled=.*got None"):
        model(x, t)
    with pytest.raises(ValueError, match="got \\(2, 5\\)"):
        model(x, t, pooled=torch.randn(2, 5))
    with pytest.raises(ValueError, match="no pooled conditioning"):
        UNet(in_channels=1, base_channels=8, channel_mult=(1, 2), attention_resolutions=(), groups=4)(
            x, t, pooled=pooled)


def test_coordinate_channels_hold_y_and_x_in_minus_one_to_one():
    model = _jitter(UNet(in_channels=3, base_channels=8, channel_mult=(1, 2), attention_resolutions=(), groups=4,
                         coord_channels=True))
    assert model.conv_in.in_channels == 5 and model.config["coord_channels"] is True
    seen = []
    model.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.randn(2, 3, 6, 10)
    with torch.no_grad():
        model(x, torch.tensor([1, 2]))
    inp = seen[0]  # (B, 5, H, W)
    assert torch.equal(inp[:, :3], x)
    assert torch.allclose(inp[0, 3], torch.linspace(-1, 1, 6)[:, None].expand(6, 10))  # y: top -1, bottom +1
    assert torch.allclose(inp[1, 4], torch.linspace(-1, 1, 10)[None, :].expand(6, 10))  # x: left -1, right +1
    assert "coord_channels" not in UNet(in_channels=1, base_channels=8, channel_mult=(1, 2),
                                        attention_resolutions=(), groups=4).config  # old configs stay valid


def test_text_unet_feeds_the_pooled_caption_when_asked():
    from vitdiff.unet import TextUNet

    encoder = dict(vocab_size=17, max_length=8, dim=8, depth=1, num_heads=2)
    unet = dict(in_channels=3, base_channels=8, channel_mult=(1, 2), attention_resolutions=(1,), groups=4,
                context_dim=8, pooled_dim=8, coord_channels=True)
    model = _jitter(TextUNet(unet=unet, encoder=encoder))
    ids = torch.tensor([[2, 9, 6, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 800])
    with torch.no_grad():
        context, mask, pooled = model.encoder(ids, ids != 0)
        expected = model.unet(x, t, context=context, context_mask=mask, pooled=pooled)
        torch.testing.assert_close(model(x, t, ids, ids != 0), expected)
    with pytest.raises(ValueError, match="pooled_dim=4 must be None or the encoder dim=8"):
        TextUNet(unet={**unet, "pooled_dim": 4}, encoder=encoder)


def test_compiles_without_graph_breaks():
    """The value checks of the inputs (timestep range, labels, masks) stay out of the traced graph."""
    model = _jitter(UNet(in_channels=3, base_channels=8, channel_mult=(1, 2), attention_resolutions=(1,), groups=4,
                         num_classes=4, context_dim=6, pooled_dim=6, coord_channels=True))
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: any graph break is an error
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 700.0]), torch.tensor([1, 4])
    context, mask, pooled = torch.randn(2, 5, 6), torch.tensor([[True] * 5, [True, True, False, False, False]]), \
        torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y=y, context=context, context_mask=mask, pooled=pooled),
                                   model(x, t, y=y, context=context, context_mask=mask, pooled=pooled))
