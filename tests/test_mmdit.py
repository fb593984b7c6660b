"""vitdiff.mmdit: joint attention is one attention over [context; image] with per-stream weights, text padding is
masked, the streams' weights are separate, adaLN-Zero starts as the identity, training, bf16, compile, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitdiff import flow
from vitdiff.layers import get_2d_sincos_pos_embed
from vitdiff.mmdit import CrossDiT, CrossDiTBlock, JointBlock, MMDiT, TextMMDiT
from vitdiff.text import Tokenizer

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2, context_dim=24,
            pooled_dim=20)


def wake(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Give every zero-initialised tensor (adaLN regressions, output layer) random values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(config: dict = TINY, b: int = 2, m: int = 5, seed: int = 1):
    """Images, timesteps (one fractional), text tokens and pooled text vectors."""
    g = torch.Generator().manual_seed(seed)
    size = config["input_size"]
    x = torch.randn(b, config["in_channels"], size, size, generator=g)
    t = torch.tensor([0.0, 437.5, 999.0])[:b]
    context = torch.randn(b, m, config["context_dim"], generator=g)
    pooled = torch.randn(b, config["pooled_dim"], generator=g)
    return x, t, context, pooled


def streams(b: int = 2, m: int = 5, n: int = 16, d: int = 32, seed: int = 2):
    """Block-level inputs: context tokens (B, M, D), image tokens (B, N, D), conditioning vector (B, D)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, d, generator=g), torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g)


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_adaln_zero_blocks_are_the_identity_and_the_model_outputs_zero(qk_norm):
    model = MMDiT(**TINY, qk_norm=qk_norm)
    context, x, c = streams()
    for block in model.joint_blocks[:-1]:
        new_context, new_x = block(context, x, c)
        assert torch.equal(new_context, context) and torch.equal(new_x, x)
    last = model.joint_blocks[-1]
    assert last.context_pre_only and not any(b.context_pre_only for b in model.joint_blocks[:-1])
    new_context, new_x = last(context, x, c)
    assert new_context is None and torch.equal(new_x, x)
    images, t, text, pooled = inputs()
    out = model(images, t, text, pooled)
    assert out.shape == images.shape and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()  # the zero output layer still gets gradients
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_config_rebuilds_the_model_and_out_channels():
    model = wake(MMDiT(**TINY, out_channels=6, qk_norm="rms_norm")).eval()
    assert "pos_embed" not in model.state_dict()  # a fixed table, rebuilt from the config
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(32, 4))
    rebuilt = MMDiT(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    x, t, context, pooled = inputs()
    with torch.no_grad():
        out = model(x, t, context, pooled)
        assert out.shape == (2, 6, 8, 8)
        assert torch.equal(rebuilt.eval()(x, t, context, pooled), out)
    last = model.joint_blocks[-1].context_block
    assert last.attn.proj is None and not hasattr(last, "mlp") and last.adaLN_modulation[-1].out_features == 64


# ----------------------------------------------------------------------------- joint attention


def hand_joint_block(block: JointBlock, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor,
                     key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The joint block written out from the paper: per-stream adaLN and projections, ONE softmax attention over
    the concatenated tokens, split, per-stream output projection and MLP. Plain tensor algebra throughout."""
    heads = block.x_block.attn.num_heads
    d = x.shape[-1] // heads

    def modulation(stream):
        return (stream.adaLN_modulation[1](F.silu(c))).chunk(2 if stream.pre_only else 6, dim=1)

    def adaln(tokens, shift, scale):
        return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def rms(z, norm):
        if isinstance(norm, torch.nn.Identity):
            return z
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight

    def heads_of(tokens, stream):  # (B, L, D) -> q, k, v (B, h, L, d) with this stream's own weights
        q, k, v = F.linear(tokens, stream.attn.qkv.weight, stream.attn.qkv.bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(*z.shape[:2], heads, d).transpose(1, 2) for z in (q, k, v))
        return rms(q, stream.attn.ln_q), rms(k, stream.attn.ln_k), v

    mc, mx = modulation(block.context_block), modulation(block.x_block)
    qc, kc, vc = heads_of(adaln(context, mc[0], mc[1]), block.context_block)
    qx, kx, vx = heads_of(adaln(x, mx[0], mx[1]), block.x_block)
    q, k, v = torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)  # one sequence [c; x]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    m = context.shape[1]

    def post(tokens, attn_out, stream, mods):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        tokens = tokens + gate_msa[:, None] * stream.attn.proj(attn_out)
        hidden = F.gelu(stream.mlp.fc1(adaln(tokens, shift_mlp, scale_mlp)), approximate="tanh")
        return tokens + gate_mlp[:, None] * stream.mlp.fc2(hidden)

    new_x = post(x, out[:, m:], block.x_block, mx)
    new_context = None if block.context_pre_only else post(context, out[:, :m], block.context_block, mc)
    return new_context, new_x


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("pre_only", [False, True])
def test_joint_attention_is_one_attention_over_the_concatenation(qk_norm, pre_only):
    block = wake(JointBlock(32, 2, qk_norm=qk_norm, context_pre_only=pre_only))
    if qk_norm:
        with torch.no_grad():
            for stream in (block.context_block, block.x_block):
                stream.attn.ln_q.weight.uniform_(0.5, 1.5)
                stream.attn.ln_k.weight.uniform_(0.5, 1.5)
    context, x, c = streams()
    with torch.no_grad():
        new_context, new_x = block(context, x, c)
        hand_context, hand_x = hand_joint_block(block, context, x, c)
        torch.testing.assert_close(new_x, hand_x, atol=1e-5, rtol=1e-5)
        if pre_only:
            assert new_context is None
        else:
            torch.testing.assert_close(new_context, hand_context, atol=1e-5, rtol=1e-5)
        # with weights: the explicit attention path gives the same outputs, and each row sums to one
        explicit_context, explicit_x, weights = block(context, x, c, return_attn=True)
        torch.testing.assert_close(explicit_x, new_x, atol=1e-5, rtol=1e-5)
    queries = 16 if pre_only else 21
    assert weights.shape == (2, 2, queries, 21)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, queries))


def test_the_order_of_the_concatenation_does_not_matter():
    """diffusers concatenates [image; context], SD3's reference [context; image]: the same attention."""
    block = wake(JointBlock(32, 2))
    context, x, c = streams()
    with torch.no_grad():
        (qc, kc, vc), _ = block.context_block.pre_attention(context, c)
        (qx, kx, vx), _ = block.x_block.pre_attention(x, c)
        ctx_first = F.scaled_dot_product_attention(*(torch.cat(p, 2) for p in ((qc, qx), (kc, kx), (vc, vx))))
        img_first = F.scaled_dot_product_attention(*(torch.cat(p, 2) for p in ((qx, qc), (kx, kc), (vx, vc))))
    torch.testing.assert_close(ctx_first, torch.cat([img_first[:, :, 16:], img_first[:, :, :16]], 2))


# ----------------------------------------------------------------------------- padding masks


def padded(context: torch.Tensor, extra: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt followed by `extra` pad tokens with garbage embeddings, and the mask that marks them."""
    g = torch.Generator().manual_seed(seed)
    b, m, width = context.shape
    garbage = 10 * torch.randn(b, extra, width, generator=g)
    mask = torch.cat([torch.ones(b, m, dtype=torch.bool), torch.zeros(b, extra, dtype=torch.bool)], dim=1)
    return torch.cat([context, garbage], dim=1), mask


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_padding_a_prompt_does_not_change_the_image(qk_norm):
    model = wake(MMDiT(**TINY, qk_norm=qk_norm)).eval()
    x, t, context, pooled = inputs()
    long_context, mask = padded(context, extra=7)
    with torch.no_grad():
        short = model(x, t, context, pooled)
        masked = model(x, t, long_context, pooled, context_mask=mask)
        unmasked = model(x, t, long_context, pooled)
        all_real = model(x, t, context, pooled, context_mask=torch.ones(2, 5, dtype=torch.bool))
    assert short.abs().max() > 0.1
    torch.testing.assert_close(masked, short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(all_real, short, atol=1e-6, rtol=1e-6)
    assert (unmasked - short).abs().max() > 1e-2  # without the mask the garbage tokens are read


def test_prompts_of_different_lengths_in_one_batch():
    """Row i padded from its own length: each image equals the one computed from its unpadded prompt alone."""
    model = wake(MMDiT(**TINY)).eval()
    x, t, context, pooled = inputs(m=6)
    lengths = [2, 6]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]  # (B, M)
    garbage = torch.where(mask[..., None], context, 5 * torch.randn_like(context))
    with torch.no_grad():
        batched = model(x, t, garbage, pooled, context_mask=mask)
        for i, length in enumerate(lengths):
            alone = model(x[i:i + 1], t[i:i + 1], context[i:i + 1, :length], pooled[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        _, maps = model(x, t, garbage, pooled, context_mask=mask, return_attn=True)
    assert len(maps) == 3 and maps[0].shape == (2, 2, 6 + 16, 6 + 16) and maps[-1].shape == (2, 2, 16, 6 + 16)
    for weights in maps:  # no query attends to a padded key
        assert torch.equal(weights[0, :, :, 2:6], torch.zeros_like(weights[0, :, :, 2:6]))
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


# ----------------------------------------------------------------------------- separate weights per stream


def test_each_stream_of_a_block_has_its_own_weights():
    """Within a block, the image output does not depend on the text stream's output projection or MLP (they act
    after attention, on text tokens only), and the text output not on the image stream's; both read each other's
    q, k, v through the joint attention."""
    block = wake(JointBlock(32, 2))
    context, x, c = streams()
    new_context, new_x = block(context, x, c)
    own = {"context_block": ["attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"],
           "x_block": ["attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]}
    for output, other in ((new_x, "context_block"), (new_context, "x_block")):
        params = [block.get_parameter(f"{other}.{name}") for name in own[other]]
        grads = torch.autograd.grad(output.square().sum(), params + [block.get_parameter(f"{other}.attn.qkv.weight")],
                                    retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads[:-1])  # not even in the graph
        assert grads[-1].abs().sum() > 0  # but the other stream's keys and values are read


def test_the_last_block_only_reads_the_text():
    """In the context_pre_only block the text supplies keys and values only: its queries get no gradient from the
    image loss; block 0's text MLP reaches the image only through block 1's attention."""
    model = wake(MMDiT(**{**TINY, "depth": 2})).eval()
    x, t, context, pooled = inputs()
    model(x, t, context, pooled).square().mean().backward()
    qkv = model.joint_blocks[-1].context_block.attn.qkv
    d = TINY["hidden_size"]
    assert not qkv.weight.grad[:d].any() and not qkv.bias.grad[:d].any()  # the text queries are unused
    assert qkv.weight.grad[d:].abs().sum() > 0  # keys and values are
    first = model.joint_blocks[0]
    assert first.context_block.mlp.fc2.weight.grad.abs().sum() > 0  # via block 1's attention

    with torch.no_grad():
        tokens = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(pooled)
        text = model.context_embedder(context)
        before_context, before_x = first(text, tokens, c)
        before = model(x, t, context, pooled)
        first.context_block.mlp.fc2.weight.add_(1.0)
        after_context, after_x = first(text, tokens, c)
        after = model(x, t, context, pooled)
    assert torch.equal(after_x, before_x) and not torch.allclose(after_context, before_context)
    assert (after - before).abs().max() > 1e-3


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("backbone", [MMDiT, CrossDiT])
def test_overfits_one_batch_with_the_flow_loss(backbone):
    torch.manual_seed(0)
    model = backbone(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, context_dim=16,
                  pooled_dim=8)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float() * 2 - 1
    context, pooled = torch.randn(4, 3, 16, generator=g), torch.randn(4, 8, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):  # the same noise and timesteps every step: one fixed regression problem
        loss = flow.flow_loss(model, x0, "logit-normal", generator=torch.Generator().manual_seed(0),
                              context=context, pooled=pooled)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# ----------------------------------------------------------------------------- dtypes, sizes, compile


@pytest.mark.parametrize("backbone", [MMDiT, CrossDiT])
def test_bfloat16_weights_run_on_cpu(backbone):
    model = wake(backbone(**TINY, qk_norm="rms_norm", pos_embed_max_size=8)).bfloat16()
    x, t, context, pooled = inputs()
    long_context, mask = padded(context, extra=2)
    out = model(x.bfloat16(), t, long_context.bfloat16(), pooled.bfloat16(), context_mask=mask)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out).all()
    out = model(x.bfloat16(), torch.tensor([1, 2]), context.bfloat16(), pooled.bfloat16())  # integer timesteps
    assert out.dtype == torch.bfloat16


def test_cropped_position_table_takes_other_sizes():
    model = wake(MMDiT(**TINY, pos_embed_max_size=8)).eval()  # an 8x8 table stretched over the 4x4 training grid
    assert model.state_dict()["pos_embed"].shape == (1, 64, 32)  # stored with the weights, as in SD3
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(32, 8, base_size=4))
    crop = model.cropped_pos_embed(4, 6).reshape(4, 6, 32)
    torch.testing.assert_close(crop, model.pos_embed.reshape(8, 8, 32)[2:6, 1:7])
    _, t, context, pooled = inputs()
    for h, w in ((8, 8), (12, 16), (16, 16), (2, 4)):
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            assert model(x, t, context, pooled).shape == (2, 3, h, w)
    with pytest.raises(ValueError, match="at most 8x8"):
        model(torch.randn(2, 3, 18, 8), t, context, pooled)
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        model(torch.randn(2, 3, 9, 8), t, context, pooled)


@pytest.mark.parametrize("backbone", [MMDiT, CrossDiT])
def test_compiles_without_graph_breaks(backbone):
    model = wake(backbone(**TINY, qk_norm="rms_norm")).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # any graph break is an error
    x, t, context, pooled = inputs()
    long_context, mask = padded(context, extra=2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, long_context, pooled, context_mask=mask),
                                   model(x, t, long_context, pooled, context_mask=mask))


# ----------------------------------------------------------------------------- errors


def test_clear_errors_for_bad_inputs():
    model = MMDiT(**TINY)
    x, t, context, pooled = inputs()
    cases = [
        (dict(context=torch.randn(2, 5, 16)), "context has width 16, expected context_dim=24"),
        (dict(x=torch.randn(2, 3, 12, 12)), "must be 8x8 \\(input_size"),
        (dict(x=torch.randn(2, 4, 8, 8)), "in_channels=3"),
        (dict(pooled=torch.randn(2, 7)), "pooled has width 7, expected pooled_dim=20"),
        (dict(pooled=torch.randn(3, 20)), "pooled must have shape \\(B, pooled_dim\\)=\\(2, 20\\)"),
        (dict(context=torch.randn(0, 5, 24)), "empty prompt batch \\(B=0\\)"),
        (dict(context=torch.randn(3, 5, 24)), "3 prompts for a batch of B=2"),
        (dict(context=torch.randn(2, 0, 24)), "no tokens \\(M=0\\)"),
        (dict(x=torch.randn(0, 3, 8, 8)), "empty batch \\(B=0\\)"),
        (dict(t=torch.zeros(3)), "t must be a scalar or have shape \\(B,\\)=\\(2,\\)"),
        (dict(context_mask=torch.ones(2, 5)), "context_mask must be a bool tensor .* got torch.float32"),
        (dict(context_mask=torch.ones(2, 4, dtype=torch.bool)), "context_mask must have shape \\(B, M\\)=\\(2, 5\\)"),
        (dict(context_mask=torch.tensor([[True] * 5, [False] * 5])), "context_mask rows \\[1\\] have no real token"),
    ]
    for change, message in cases:
        args = dict(x=x, t=t, context=context, pooled=pooled, context_mask=None) | change
        with pytest.raises(ValueError, match=message):
            model(**args)


def test_clear_errors_for_bad_configs():
    with pytest.raises(ValueError, match="input_size=9 is not divisible by patch_size=2"):
        MMDiT(**{**TINY, "input_size": 9})
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        MMDiT(**TINY, qk_norm="layer_norm")
    with pytest.raises(ValueError, match="pos_embed_max_size=2 is smaller than the training grid"):
        MMDiT(**TINY, pos_embed_max_size=2)
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        MMDiT(**{**TINY, "hidden_size": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="context_dim must be a positive int, got 0"):
        MMDiT(**{**TINY, "context_dim": 0})


# ----------------------------------------------------------------------------- TextMMDiT (chapters 09-10)

TEXT_TINY = {"mmdit": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                           context_dim=16, pooled_dim=16),
             "encoder": dict(vocab_size=17, max_length=8, dim=16, depth=1, num_heads=2)}


def _ids(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from vitdiff.data import shapes_vocabulary

    return Tokenizer(shapes_vocabulary(), max_length=8).encode(captions)


def test_text_mmdit_reads_the_encoder_tokens_and_their_mean():
    torch.manual_seed(0)
    model = TextMMDiT(**TEXT_TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # leave adaLN-Zero's all-zero start
    ids, mask = _ids(["a red circle at the top left", "a square"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        context, context_mask, pooled = model.encoder(ids, mask)
        expected = model.mmdit(x, t, context, pooled, context_mask=context_mask)
        out = model(x, t, ids=ids, ids_mask=mask)
    assert out.abs().mean() > 1e-3
    torch.testing.assert_close(out, expected)
    other_ids, other_mask = _ids(["a blue circle at the top left", "a square"])
    assert (model(x, t, ids=other_ids, ids_mask=other_mask)[0] - out[0]).abs().mean() > 1e-4  # one word changes it
    assert TextMMDiT(**model.config).config == model.config  # the config rebuilds it


def test_text_mmdit_needs_matching_widths():
    bad = {**TEXT_TINY, "mmdit": {**TEXT_TINY["mmdit"], "pooled_dim": 8}}
    with pytest.raises(ValueError, match="pooled_dim=8 must equal the encoder dim=16"):
        TextMMDiT(**bad)


def test_text_mmdit_overfits_one_batch_of_captioned_latents():
    torch.manual_seed(0)
    model = TextMMDiT(**TEXT_TINY)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 4, 8, 8, generator=g)
    ids, mask = _ids(["a red circle", "a blue square at the top left", "a triangle", ""])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(120):
        loss = flow.flow_loss(model, z0, "logit-normal", generator=torch.Generator().manual_seed(0), ids=ids,
                              ids_mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


# ----------------------------------------------------------------------------- the cross-attention baseline (CrossDiT)


def test_crossdit_blocks_start_as_the_identity_and_the_model_outputs_zero():
    model = CrossDiT(**TINY)
    context, x, c = streams()
    for block in model.joint_blocks:
        assert isinstance(block, CrossDiTBlock)
        new_context, new_x = block(context, x, c)
        assert new_context is context and torch.equal(new_x, x)  # adaLN-Zero gates and cross-attention output at 0
    images, t, text, pooled = inputs()
    assert torch.equal(model(images, t, text, pooled), torch.zeros_like(images))


def test_crossdit_block_is_self_attention_cross_attention_and_mlp():
    """The block written out from its weights: gated self-attention, ungated cross-attention to the text, gated MLP."""
    block = wake(CrossDiT(**TINY)).joint_blocks[0].eval()
    context, x, c = streams()
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    full_mask = torch.cat([mask, torch.ones(2, 16, dtype=torch.bool)], dim=1)[:, None, None]  # as MMDiT.forward
    with torch.no_grad():
        out_context, out = block(context, x, c, full_mask)
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
        h = F.layer_norm(x, (32,), eps=1e-6) * (1 + scale1[:, None]) + shift1[:, None]
        expected = x + gate1[:, None] * block.attn(h)
        expected = expected + torch.stack([block.cross_attn(block.norm_cross(expected[i:i + 1]),
                                                            context=context[i:i + 1, mask[i]])[0] for i in range(2)])
        h = F.layer_norm(expected, (32,), eps=1e-6) * (1 + scale2[:, None]) + shift2[:, None]
        expected = expected + gate2[:, None] * block.mlp(h)
    assert out_context is context  # the text tokens are only read
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_crossdit_masks_padding_and_reads_the_text():
    model = wake(CrossDiT(**TINY)).eval()
    x, t, context, pooled = inputs()
    long_context, mask = padded(context, extra=4)
    with torch.no_grad():
        short = model(x, t, context, pooled)
        masked = model(x, t, long_context, pooled, context_mask=mask)
        other_text = model(x, t, torch.randn_like(context), pooled)
    torch.testing.assert_close(masked, short, atol=1e-5, rtol=1e-5)
    assert (other_text - short).abs().max() > 1e-2  # the tokens, not just the pooled vector, reach the image


def test_text_mmdit_backbones_share_the_interface_and_differ_in_blocks():
    config = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2,
              "context_dim": 16, "pooled_dim": 16}
    encoder = {"vocab_size": 10, "max_length": 6, "dim": 16, "depth": 1, "num_heads": 2}
    joint, cross = TextMMDiT(config, encoder), TextMMDiT(config, encoder, backbone="crossdit")
    assert isinstance(cross.mmdit, CrossDiT) and type(joint.mmdit) is MMDiT
    assert "backbone" not in joint.config and cross.config["backbone"] == "crossdit"
    assert isinstance(TextMMDiT(**cross.config).mmdit, CrossDiT)  # the config rebuilds it
    ids = torch.tensor([[3, 4, 1, 0, 0, 0], [5, 1, 0, 0, 0, 0]])
    out = wake(cross)(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), ids, ids != 0)
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="backbone"):
        TextMMDiT(config, encoder, backbone="unet")

