"""vitdiff.dit: adaLN-Zero starts as the identity, label dropout, the conditioning variants, training under both
objectives, bf16 weights, guidance, checkpoints and clear errors."""

from __future__ import annotations

import math
import time

import pytest
import torch

from vitdiff import flow
from vitdiff.checkpoint import load_model, save_checkpoint
from vitdiff.diffusion import NoiseSchedule, classifier_free_guidance, ddim_sample, diffusion_loss
from vitdiff.dit import CONDITIONINGS, DiT, DiTBlock, LabelEmbedder
from vitdiff.layers import TimestepEmbedder
from vitdiff.unet import UNet

TINY = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=5)


def batch(config: dict = TINY, b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, timesteps (one fractional) and labels, the last one the null class."""
    size = config["input_size"]
    x = torch.randn(b, config["in_channels"], size, size)
    t = torch.tensor([0.0, 250.5, 999.0])[:b]
    y = torch.tensor([0, config["num_classes"] - 1, config["num_classes"]])[:b]
    return x, t, y


def wake(model: DiT, std: float = 0.05) -> DiT:
    """Give the zero-initialised tensors (adaLN modulation, output layer) random values, as after training."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, std)
    return model


# ----------------------------------------------------------------------------- initialisation


def test_adaln_zero_blocks_are_the_identity_at_init():
    model = DiT(**TINY)
    x, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in model.blocks:
        assert isinstance(block, DiTBlock)
        assert torch.equal(block(x, c), x)
    adaln = DiT(**TINY, conditioning="adaln")  # same blocks, modulation not zero-initialised
    assert not torch.allclose(adaln.blocks[0](x, c), x)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_outputs_zero_at_init_with_the_right_shape(conditioning, learn_sigma):
    model = DiT(**TINY, learn_sigma=learn_sigma, conditioning=conditioning)
    x, t, y = batch()
    out = model(x, t, y)
    channels = 2 * TINY["in_channels"] if learn_sigma else TINY["in_channels"]
    assert out.shape == (3, channels, 8, 8) and model.out_channels == channels
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()  # the zero output layer still gets gradients
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_reference_initialisation():
    model = DiT(**TINY)
    assert not any(name == "pos_embed" for name, _ in model.named_parameters())  # a fixed buffer
    assert "pos_embed" not in model.state_dict()
    assert model.pos_embed.shape == (1, 16, 32)
    for name in ("y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight"):
        std = model.get_parameter(name).std().item()
        assert 0.012 < std < 0.03, (name, std)
    fc1 = model.blocks[0].mlp.fc1.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert fc1.abs().max() <= math.sqrt(6 / sum(fc1.shape)) and torch.equal(model.blocks[0].mlp.fc1.bias,
                                                                           torch.zeros(128))
    for module in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1]]:
        assert not module.weight.any() and not module.bias.any()
    sizes = {c: sum(p.numel() for p in DiT(**TINY, conditioning=c).parameters()) for c in CONDITIONINGS}
    assert sizes["adaln-zero"] == sizes["adaln"] > sizes["cross-attention"] > sizes["in-context"]


def test_in_context_and_cross_attention_read_the_condition():
    for conditioning in ("cross-attention", "in-context"):
        model = DiT(**TINY, conditioning=conditioning).eval()  # eval: no label dropout
        torch.nn.init.normal_(model.final_layer.linear.weight)
        x, t, _ = batch()
        with torch.no_grad():
            a, b = model(x, t, torch.tensor([0, 1, 2])), model(x, t, torch.tensor([3, 1, 2]))
            c = model(x, t + 100, torch.tensor([0, 1, 2]))
        assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])  # labels act per sample
        assert not torch.allclose(a, c)


# ----------------------------------------------------------------------------- label dropout


def null_fraction(embedder: LabelEmbedder, labels: torch.Tensor, **kwargs) -> float:
    """The fraction of labels embedded as the null class."""
    emb = embedder(labels, **kwargs)
    null = embedder.embedding_table.weight[embedder.num_classes]
    return (emb == null).all(dim=1).float().mean().item()


def test_label_dropout_rate():
    n, p = 20_000, 0.3
    embedder = LabelEmbedder(10, 8, p).train()
    labels = torch.randint(0, 10, (n,))
    assert abs(null_fraction(embedder, labels) - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert null_fraction(embedder.eval(), labels) == 0.0  # never at evaluation
    never = LabelEmbedder(10, 8, 0.0).train()
    assert never.embedding_table.num_embeddings == 10  # no null class without dropout
    emb = never(labels)
    assert torch.equal(emb, never.embedding_table.weight[labels])


def test_force_drop_ids_and_the_null_label():
    embedder = LabelEmbedder(4, 6, 0.1).eval()
    labels = torch.tensor([0, 1, 2, 3])
    emb = embedder(labels, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    table = embedder.embedding_table.weight
    assert torch.equal(emb, table[torch.tensor([4, 1, 4, 3])])
    assert torch.equal(embedder(torch.tensor([4])), table[4:5])  # y = num_classes asks for the null class
    with pytest.raises(ValueError, match="class_dropout_prob > 0"):
        LabelEmbedder(4, 6, 0.0)(labels, force_drop_ids=torch.ones(4))


def test_model_drops_labels_only_in_training():
    model = DiT(**TINY, class_dropout_prob=0.5)
    torch.nn.init.normal_(model.final_layer.linear.weight)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight)  # let c (and so y) reach the output
    x, t, _ = batch(b=2)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x, t, y), model(x, t, y))
        model.train()
        outs = {tuple(model(x, t, y).flatten()[:4].tolist()) for _ in range(20)}
    assert len(outs) > 1  # some calls dropped a label


# ----------------------------------------------------------------------------- training


def overfit(objective: str) -> tuple[float, float, float]:
    """Train a tiny DiT on 4 fixed 8x8 images (the same noise and timesteps each step): (first, last, seconds)."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=4,
                learn_sigma=False)
    x0 = (torch.rand(4, 1, 8, 8) > 0.5).float() * 2 - 1
    y = torch.arange(4)
    schedule = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (4,), generator=g), torch.randn(4, 1, 8, 8, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    start, losses = time.perf_counter(), []
    model.eval()  # no label dropout: one fixed batch
    for _ in range(150):
        if objective == "epsilon":
            loss = diffusion_loss(model, schedule, x0, t=t, noise=noise, y=y)
        else:
            loss = flow.flow_loss(model, x0, "logit-normal", generator=torch.Generator().manual_seed(0), y=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1], time.perf_counter() - start


@pytest.mark.parametrize("objective", ["epsilon", "velocity"])
def test_overfits_one_batch_under_both_objectives(objective):
    first, last, seconds = overfit(objective)
    assert last < first / 5, (first, last)
    assert seconds < 10


# ----------------------------------------------------------------------------- dtypes, compile, guidance, checkpoints


def test_bfloat16_weights_run_on_cpu():
    model = wake(DiT(**TINY)).bfloat16()
    x, t, y = batch()
    out = model(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out = model(x.bfloat16(), torch.tensor([1, 2, 3]), y)  # integer timesteps too
    assert out.dtype == torch.bfloat16


def test_timestep_embedder_follows_the_weights_dtype():
    embedder = TimestepEmbedder(16).bfloat16()
    assert embedder(torch.tensor([1.0, 999.0])).dtype == torch.bfloat16
    assert embedder.double()(torch.tensor([3, 4])).dtype == torch.float64


def test_bfloat16_unet_runs_on_cpu():
    unet = UNet(in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                num_heads=2, num_classes=3, groups=8).bfloat16()
    out = unet(torch.randn(2, 1, 8, 8).bfloat16(), torch.tensor([10, 900]), y=torch.tensor([0, 3]))
    assert out.shape == (2, 1, 8, 8) and out.dtype == torch.bfloat16


def test_compiles_without_graph_breaks():
    model = wake(DiT(**TINY)).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: any graph break is an error
    x, t, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))


def test_guidance_with_the_null_label_through_both_samplers():
    model = wake(DiT(**TINY)).eval()
    y = torch.tensor([1, 3])
    null = torch.tensor([TINY["num_classes"]])
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([400, 400])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null.expand(2))
        assert not torch.allclose(cond, uncond)
        torch.testing.assert_close(classifier_free_guidance(model, 1.0, {"y": null})(x, t, y=y), cond)
        torch.testing.assert_close(classifier_free_guidance(model, 0.0, {"y": null})(x, t, y=y)[:, :2], uncond[:, :2])
        guided = classifier_free_guidance(model, 4.0, {"y": null})(x, t, y=y)
        torch.testing.assert_close(guided[:, :2], uncond[:, :2] + 4 * (cond[:, :2] - uncond[:, :2]))
        torch.testing.assert_close(guided[:, 2:], cond[:, 2:])  # the learned variance is not extrapolated
    guided = classifier_free_guidance(model, 4.0, {"y": null})
    out = ddim_sample(guided, NoiseSchedule(100), (2, 2, 8, 8), steps=3, progress=False, y=y)
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    velocity_model = wake(DiT(**TINY, learn_sigma=False)).eval()
    out = flow.sample(classifier_free_guidance(velocity_model, 4.0, {"y": null}), torch.randn(2, 2, 8, 8), steps=3,
                      progress=False, y=y)
    assert out.shape == (2, 2, 8, 8)


def test_config_rebuilds_the_model_through_a_checkpoint(tmp_path):
    model = DiT(**TINY, conditioning="in-context", learn_sigma=False).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight)
    save_checkpoint(tmp_path / "dit", model)
    loaded = load_model(tmp_path / "dit", DiT).eval()
    assert loaded.config == model.config
    x, t, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y))


# ----------------------------------------------------------------------------- errors


def test_constructor_errors():
    with pytest.raises(ValueError, match="input_size=10 is not divisible by patch_size=4"):
        DiT(**dict(TINY, input_size=10, patch_size=4))
    with pytest.raises(ValueError, match="hidden_size=32 is not divisible by num_heads=3"):
        DiT(**dict(TINY, num_heads=3))
    with pytest.raises(ValueError, match="conditioning must be one of"):
        DiT(**TINY, conditioning="film")
    with pytest.raises(ValueError, match="class_dropout_prob must lie in"):
        DiT(**TINY, class_dropout_prob=1.0)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        DiT(**dict(TINY, depth=0))


def test_input_errors():
    model = DiT(**TINY)
    x, t, y = batch()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 8, 8\)"):
        model(x[:, :1], t, y)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 8, 8\)"):
        model(torch.randn(3, 2, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"x must have shape"):
        model(x[0], t, y)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match=r"y must be integer labels of shape \(3,\)"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match=r"y must lie in 0..5 \(5 is the null class\), got values in -1..5"):
        model(x, t, torch.tensor([-1, 0, 5]))
    with pytest.raises(ValueError, match=r"got values in 0..6"):
        model(x, t, torch.tensor([0, 6, 1]))
    no_null = DiT(**TINY, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match=r"y must lie in 0..4 \(no null class: class_dropout_prob=0\)"):
        no_null(x, t, y)
    assert model(x, torch.tensor(10), y).shape == (3, 4, 8, 8)  # a scalar timestep is broadcast


def test_gflops_count_the_attention_products_on_the_cpu(monkeypatch):
    # the fused CPU attention kernel is invisible to torch's FLOP counter; bookmetrics.gflops must still count
    # QK^T and AV: 2 products of T x T x D multiply-adds per block, 2 FLOPs each
    from vitdiff import bookmetrics

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                num_classes=10).eval()
    x, t, y = torch.zeros(1, 4, 8, 8), torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)
    counted = bookmetrics.gflops(model, x, t, y=y)
    # the same model with attention that costs nothing: v passed through
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kwargs: v)
    without = bookmetrics.gflops(model, x, t, y=y)
    tokens, width, depth = 16, 32, 2
    assert math.isclose((counted - without) * 1e9, depth * 2 * 2 * tokens * tokens * width, rel_tol=1e-9)
