"""Tests of vitdiff.layers: patches, position embeddings, attention and masks, blocks, timestep embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitdiff.layers import (
    Attention,
    PatchEmbed,
    TimestepEmbedder,
    TransformerBlock,
    attention,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    patchify,
    timestep_embedding,
    unpatchify,
)

# ----------------------------------------------------------------------------- helpers


def reference_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention written out head by head with plain matrix products; mask (B, Nq, Nk) or None."""
    source = x if context is None else context
    dim, heads = attn.q.out_features, attn.num_heads
    d = dim // heads
    q = x @ attn.q.weight.T + attn.q.bias  # (B, N, D)
    kv = source @ attn.kv.weight.T + attn.kv.bias  # (B, M, 2D)
    k, v = kv[..., :dim], kv[..., dim:]  # (B, M, D) each
    outs = []
    for i in range(heads):
        cols = slice(i * d, (i + 1) * d)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(d)  # (B, N, M)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v[..., cols])  # (B, N, d)
    return torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias  # (B, N, D)


def random_key_mask(batch: int, n_q: int, n_k: int) -> torch.Tensor:
    """A random (B, Nq, Nk) bool mask with at least one allowed key in every row."""
    mask = torch.rand(batch, n_q, n_k) > 0.5
    mask[..., 0] = True
    return mask


def randomize_(module: nn.Module) -> nn.Module:
    """Overwrite every parameter with N(0, 0.3²) noise so no weight or bias is trivially zero or one."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


# ----------------------------------------------------------------------------- PatchEmbed and patches


def test_patch_embed_shapes():
    embed = PatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=24)
    assert embed.grid_size == 8 and embed.num_patches == 64
    assert embed(torch.randn(2, 3, 32, 32)).shape == (2, 64, 24)


def test_patch_embed_gives_a_contiguous_residual_stream():
    # a transposed (B, N, D) view would propagate through every residual add of a DiT (no class token to
    # concatenate) and make each LayerNorm and Linear copy its input first: 3% of a CPU training step
    tokens = PatchEmbed(img_size=16, patch_size=2, in_chans=4, embed_dim=32)(torch.randn(2, 4, 16, 16))
    assert tokens.is_contiguous()
    assert (tokens + torch.zeros(1, 64, 32)).is_contiguous()


def test_patch_embed_equals_flatten_then_linear():
    p, c, d = 4, 3, 10
    embed = randomize_(PatchEmbed(img_size=16, patch_size=p, in_chans=c, embed_dim=d))
    linear = nn.Linear(p * p * c, d)
    with torch.no_grad():
        # conv weight (D, C, P, P) -> (D, P*P*C) in patchify's (row, column, channel) order
        linear.weight.copy_(embed.proj.weight.permute(0, 2, 3, 1).reshape(d, -1))
        linear.bias.copy_(embed.proj.bias)
    x = torch.randn(2, c, 16, 16)
    torch.testing.assert_close(embed(x), linear(patchify(x, p)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(1, 1, 32, 32), "in_chans=3"),
    (torch.randn(1, 3, 28, 28), "32x32"),
    (torch.randn(1, 3, 32, 28), "32x32"),
    (torch.randn(3, 32, 32), r"\(B, C, H, W\)"),
    (torch.randn(1, 1, 3, 32, 32), r"\(B, C, H, W\)"),
])
def test_patch_embed_rejects_bad_input(bad, match):
    embed = PatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=8)
    with pytest.raises(ValueError, match=match):
        embed(bad)


def test_patch_embed_rejects_indivisible_img_size():
    with pytest.raises(ValueError, match="img_size=30.*patch_size=4"):
        PatchEmbed(img_size=30, patch_size=4)


def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)  # (B, 16, 12)
    assert tokens.shape == (2, 16, 12)
    # token 0 is the top-left patch flattened (row, column, channel); token 1 is the patch to its right
    torch.testing.assert_close(tokens[:, 0], x[:, :, :2, :2].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(tokens[:, 1], x[:, :, :2, 2:4].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(tokens[:, 4], x[:, :, 2:4, :2].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(unpatchify(tokens, 2, 3), x)
    t = torch.randn(2, 9, 4 * 4 * 1)
    assert torch.equal(patchify(unpatchify(t, 4, 1), 4), t)


def test_patchify_unpatchify_errors():
    with pytest.raises(ValueError, match="patch_size"):
        patchify(torch.randn(1, 3, 9, 8), 2)
    with pytest.raises(ValueError, match="square"):
        unpatchify(torch.randn(1, 8, 12), 2, 3)
    with pytest.raises(ValueError, match="P\\*P\\*C=12"):
        unpatchify(torch.randn(1, 16, 10), 2, 3)


# ----------------------------------------------------------------------------- sin-cos position embeddings


def test_1d_sincos_matches_formula():
    dim, pos = 8, torch.tensor([0.0, 1.0, 5.0, 17.0])
    emb = get_1d_sincos_pos_embed(dim, pos)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    for m, p in enumerate(pos.tolist()):
        for k in range(dim // 2):
            angle = p / 10000 ** (2 * k / dim)
            assert emb[m, k].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert emb[m, dim // 2 + k].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_2d_sincos_properties():
    dim, grid = 16, 5
    emb = get_2d_sincos_pos_embed(dim, grid)
    assert emb.shape == (grid * grid, dim)
    assert emb.abs().max() <= 1.0
    table = emb.reshape(grid, grid, dim)  # (row, column, D), patches in row-major order
    half = dim // 2
    # first half: a function of the column only; second half: of the row only
    assert torch.equal(table[:, :, :half], table[:1, :, :half].expand(grid, -1, -1))
    assert torch.equal(table[:, :, half:], table[:, :1, half:].expand(-1, grid, -1))
    cols = torch.arange(grid, dtype=torch.float32)
    torch.testing.assert_close(table[0, :, :half], get_1d_sincos_pos_embed(half, cols))
    torch.testing.assert_close(table[:, 0, half:], get_1d_sincos_pos_embed(half, cols))
    assert len({tuple(row.tolist()) for row in emb}) == grid * grid  # every position is distinct

    with_cls = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert with_cls.shape == (1 + grid * grid, dim)
    assert torch.equal(with_cls[0], torch.zeros(dim))
    assert torch.equal(with_cls[1:], emb)


@pytest.mark.parametrize("dim", [6, 10, 7])
def test_2d_sincos_rejects_dim_not_divisible_by_4(dim):
    with pytest.raises(ValueError, match=f"divisible by 4.*{dim}"):
        get_2d_sincos_pos_embed(dim, 4)


def test_1d_sincos_rejects_odd_dim():
    with pytest.raises(ValueError, match="even"):
        get_1d_sincos_pos_embed(7, torch.arange(3))


# ----------------------------------------------------------------------------- attention


def test_attention_function_rows_sum_to_one_and_formula():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    out, weights = attention(q, k, v, return_attn=True)
    assert out.shape == (2, 3, 5, 4) and weights.shape == (2, 3, 5, 7)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5))
    expected = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v  # √d = 2
    torch.testing.assert_close(out, expected)


def test_attention_function_mask_zeroes_weights_and_ignores_masked_values():
    q, k, v = torch.randn(2, 5, 4), torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    mask = random_key_mask(2, 5, 7)
    out, weights = attention(q, k, v, mask=mask, return_attn=True)
    assert (weights[~mask] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    # keys/values that no query may see can change arbitrarily without changing the output
    hidden = ~mask.any(dim=1)  # (B, Nk) keys masked for every query
    hidden[:, 1] = True
    mask = mask & ~hidden[:, None, :]
    out = attention(q, k, v, mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[hidden], v2[hidden] = 100 * torch.randn_like(k2[hidden]), 100 * torch.randn_like(v2[hidden])
    torch.testing.assert_close(attention(q, k2, v2, mask=mask), out)


def test_attention_fully_masked_row_matches_fused_kernel():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 0, :] = False  # query 0 may attend to nothing (e.g. an all-padding caption)
    out = attention(q, k, v, mask=mask)
    assert not out.isnan().any()
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_attention_module_weights_rows_sum_to_one():
    attn = Attention(16, num_heads=4)
    out, weights = attn(torch.randn(2, 6, 16), return_attn=True)
    assert out.shape == (2, 6, 16) and weights.shape == (2, 4, 6, 6)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))


@pytest.mark.parametrize("fused", [True, False])
def test_attention_equals_hand_written_multi_head(fused):
    attn = randomize_(Attention(24, num_heads=3, fused=fused))
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=1e-5, rtol=1e-5)
    cross = randomize_(Attention(24, num_heads=3, context_dim=10, fused=fused))
    context, mask = torch.randn(2, 5, 10), random_key_mask(2, 7, 5)
    torch.testing.assert_close(cross(x, context=context, mask=mask), reference_attention(cross, x, context, mask),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_equals_torch_multihead_attention(use_mask):
    dim, heads = 32, 4
    ours = randomize_(Attention(dim, num_heads=heads))
    theirs = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))  # rows: q, k, v
        theirs.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        theirs.out_proj.weight.copy_(ours.proj.weight)
        theirs.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, 9, dim)
    keep = torch.rand(3, 9) > 0.4
    keep[:, 0] = True
    mask = keep if use_mask else None
    expected, _ = theirs(x, x, x, key_padding_mask=None if mask is None else ~mask, need_weights=False)
    torch.testing.assert_close(ours(x, mask=mask), expected, atol=1e-5, rtol=1e-5)


def test_attention_masked_weights_are_zero_and_masked_keys_do_not_matter():
    attn = randomize_(Attention(16, num_heads=2, context_dim=12))
    x, context = torch.randn(2, 4, 16), torch.randn(2, 6, 12)
    keep = torch.tensor([[True, True, True, False, False, False], [True, False, True, False, True, True]])
    out, weights = attn(x, context=context, mask=keep, return_attn=True)  # (B, h, N, M)
    assert (weights.masked_select(~keep[:, None, None, :]) == 0).all()
    assert (weights.masked_select(keep[:, None, None, :]) > 0).all()
    changed = context.clone()
    changed[~keep] = 50 * torch.randn_like(changed[~keep])
    for fused in (True, False):
        attn.fused = fused
        torch.testing.assert_close(attn(x, context=changed, mask=keep), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(attn(x, context=changed), attn(x, context=context))  # unmasked: it matters


@pytest.mark.parametrize("shape", [(2, 6), (2, 4, 6), (1, 4, 6), (2, 2, 4, 6), (1, 1, 4, 6), (2, 1, 4, 6)])
def test_attention_accepts_mask_shapes(shape):
    attn = randomize_(Attention(16, num_heads=2, context_dim=8))
    x, context = torch.randn(2, 4, 16), torch.randn(2, 6, 8)
    mask = torch.rand(shape) > 0.5
    mask[..., 0] = True
    if mask.ndim == 2:
        full = mask[:, None, None, :]  # key padding (B, Nk)
    elif mask.ndim == 3:
        full = mask[:, None]  # (B or 1, Nq, Nk)
    else:
        full = mask
    full = full.expand(2, 2, 4, 6)  # (B, h, Nq, Nk)
    out, weights = attn(x, context=context, mask=mask, return_attn=True)
    assert (weights[~full] == 0).all() and (weights[full] > 0).all()
    attn.fused = True
    torch.testing.assert_close(attn(x, context=context, mask=mask), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4), (3, 6), (6,), (2, 5, 6), (3, 4, 6), (2, 2, 4, 5), (3, 1, 4, 6),
                                   (2, 1, 1, 4, 6)])
def test_attention_rejects_wrong_mask_shapes(shape):
    attn = Attention(16, num_heads=2, context_dim=8)
    with pytest.raises(ValueError, match="mask has shape"):
        attn(torch.randn(2, 4, 16), context=torch.randn(2, 6, 8), mask=torch.ones(shape, dtype=torch.bool))


def test_attention_rejects_mask_with_wrong_head_count():
    attn = Attention(16, num_heads=2)
    with pytest.raises(ValueError, match="mask has shape"):
        attn(torch.randn(2, 4, 16), mask=torch.ones(2, 3, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_attention_rejects_non_bool_masks(dtype):
    attn = Attention(16, num_heads=2)
    with pytest.raises(TypeError, match="bool"):
        attn(torch.randn(2, 4, 16), mask=torch.ones(2, 4, dtype=dtype))


def test_attention_rejects_wrong_feature_count():
    with pytest.raises(ValueError, match="context has 9 features, expected 8"):
        Attention(16, num_heads=2, context_dim=8)(torch.randn(1, 3, 16), context=torch.randn(1, 2, 9))
    with pytest.raises(ValueError, match="x has 12 features"):
        Attention(16, num_heads=2)(torch.randn(1, 3, 12))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_equals_explicit_with_masks(cross, qk_norm):
    kwargs = dict(num_heads=4, context_dim=20 if cross else None, qk_norm=qk_norm)
    fused = randomize_(Attention(32, fused=True, **kwargs))
    explicit = Attention(32, fused=False, **kwargs)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(3, 10, 32)
    context = torch.randn(3, 7, 20) if cross else None
    n_k = 7 if cross else 10
    for mask in (None, random_key_mask(3, 10, n_k), random_key_mask(3, 10, n_k)[:, 0]):
        torch.testing.assert_close(fused(x, context=context, mask=mask), explicit(x, context=context, mask=mask),
                                   atol=1e-5, rtol=1e-5)


def test_attention_and_block_are_permutation_equivariant():
    x, perm = torch.randn(2, 9, 24), torch.randperm(9)
    attn = randomize_(Attention(24, num_heads=3))
    torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], atol=1e-5, rtol=1e-5)
    block = randomize_(TransformerBlock(24, num_heads=3, mlp_ratio=2.0))
    torch.testing.assert_close(block(x[:, perm]), block(x)[:, perm], atol=1e-5, rtol=1e-5)
    # with cross-attention: equivariant in the queries, invariant to the order of the context tokens
    cross = randomize_(TransformerBlock(24, num_heads=3, context_dim=8))
    context, cperm = torch.randn(2, 5, 8), torch.randperm(5)
    out = cross(x, context=context)
    torch.testing.assert_close(cross(x[:, perm], context=context), out[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cross(x, context=context[:, cperm]), out, atol=1e-5, rtol=1e-5)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="dim=30.*num_heads=4"):
        Attention(30, num_heads=4)
    with pytest.raises(ValueError, match="dim=30.*num_heads=4"):
        TransformerBlock(30, num_heads=4)


def test_transformer_block_is_pre_norm_residual():
    block = randomize_(TransformerBlock(16, num_heads=2, mlp_ratio=3.0))
    x = torch.randn(2, 5, 16)
    h = x + reference_attention(block.attn, block.norm1(x))
    expected = h + block.mlp.fc2(nn.functional.gelu(block.mlp.fc1(block.norm2(h))))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    out, weights = block(x, return_attn=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert weights["self"].shape == (2, 2, 5, 5) and weights["cross"] is None


def test_transformer_block_context_rules():
    with_ctx = TransformerBlock(16, num_heads=2, context_dim=8)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    assert with_ctx(x, context=context).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="context"):
        with_ctx(x)
    without = TransformerBlock(16, num_heads=2)
    with pytest.raises(ValueError, match="context_dim"):
        without(x, context=context)
    # the context mask reaches the cross-attention: masked context tokens do not matter
    keep = torch.tensor([[True, True, False], [True, False, False]])
    changed = context.clone()
    changed[~keep] = 10.0
    torch.testing.assert_close(with_ctx(x, context=changed, context_mask=keep),
                               with_ctx(x, context=context, context_mask=keep), atol=1e-5, rtol=1e-5)


def test_qk_norm_normalises_queries_and_keys():
    attn = Attention(32, num_heads=4, qk_norm=True)
    assert isinstance(attn.q_norm, nn.RMSNorm) and isinstance(attn.k_norm, nn.RMSNorm)
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.update(q_in=i[0], q=o))
    attn.k_norm.register_forward_hook(lambda m, i, o: seen.update(k=o))
    out = attn(10 * torch.randn(2, 6, 32))
    assert out.shape == (2, 6, 32) and torch.isfinite(out).all()
    assert seen["q"].shape == (2, 4, 6, 8)  # (B, h, N, d): normalised per head
    for name in ("q", "k"):
        rms = seen[name].pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=1e-4)
    assert (seen["q_in"].pow(2).mean(-1).sqrt() - 1).abs().max() > 0.5  # it was not normalised before
    plain = Attention(32, num_heads=4)
    assert isinstance(plain.q_norm, nn.Identity) and isinstance(plain.k_norm, nn.Identity)


# ----------------------------------------------------------------------------- timestep embedding


def test_timestep_embedding_matches_formula():
    t, dim = torch.tensor([0.0, 1.0, 10.5, 999.0]), 8
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim)
    half = dim // 2
    for b, tb in enumerate(t.tolist()):
        for k in range(half):
            freq = 10000.0 ** (-k / half)
            assert emb[b, k].item() == pytest.approx(math.cos(tb * freq), abs=1e-4)
            assert emb[b, half + k].item() == pytest.approx(math.sin(tb * freq), abs=1e-4)
    torch.testing.assert_close(timestep_embedding(t, dim, max_period=100.0)[:, 1],
                               torch.cos(t * 100.0 ** (-1 / half)))


def test_timestep_embedding_odd_dim_and_integer_input():
    t = torch.tensor([3, 7, 250])
    even, odd = timestep_embedding(t, 6), timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and odd.dtype == torch.float32
    assert torch.equal(odd[:, :6], even) and torch.equal(odd[:, 6], torch.zeros(3))


def test_timestep_embedding_rejects_2d():
    with pytest.raises(ValueError, match=r"1-D.*\(2, 1\)"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_timestep_embedder_shape():
    embedder = TimestepEmbedder(hidden_size=24, frequency_embedding_size=16)
    out = embedder(torch.tensor([0.0, 500.0, 999.0]))
    assert out.shape == (3, 24)
    assert not torch.allclose(out[0], out[1])


def test_timestep_embedder_is_linear_silu_linear_on_the_sinusoidal_features():
    embedder = TimestepEmbedder(hidden_size=4, frequency_embedding_size=4)
    with torch.no_grad():  # hand-set: both linears the identity, the first shifted by -0.5
        for layer, bias in ((embedder.mlp[0], -0.5), (embedder.mlp[2], 0.0)):
            layer.weight.copy_(torch.eye(4))
            layer.bias.fill_(bias)
    t = torch.tensor([0.0, 3.0, 250.0])
    expected = torch.nn.functional.silu(timestep_embedding(t, 4) - 0.5)  # cos(0) - 0.5 = 0.5 -> silu(0.5), ...
    torch.testing.assert_close(embedder(t), expected)


def test_attention_and_patch_embed_reject_malformed_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(16, num_heads=0)
    with pytest.raises(ValueError, match=r"\(B, N, dim\)"):
        Attention(16, num_heads=2)(torch.randn(5, 16))
    with pytest.raises(ValueError, match="img_size"):
        PatchEmbed(img_size=(32, 32), patch_size=4)


def test_two_dimensional_mask_is_key_padding_even_when_batch_equals_tokens():
    attn = Attention(8, num_heads=2)
    x = torch.randn(4, 4, 8)  # B == N: a (4, 4) mask must still mean key padding (B, Nk)
    padding = torch.tensor([[True, True, True, False]] * 4)
    torch.testing.assert_close(attn(x, mask=padding), attn(x, mask=padding[:, None, :].expand(4, 4, 4)))
