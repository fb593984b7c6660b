"""Reference equivalence for the DiT: facebookresearch/DiT's layout and diffusers' DiTTransformer2DModel.

The official layout is checked against `PaperDiT`, written here from the paper's description (Peebles & Xie
2023, section 3.2 and the appendix) with the official parameter names, so that `dit_from_official` is
tested on the names and shapes of a real checkpoint without copying its code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitdiff.dit import DiT
from vitdiff.interop import dit_from_diffusers, dit_from_official

CONFIGS = {
    "patch2-sigma": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                         num_classes=10, learn_sigma=True),
    "patch4-no-sigma": dict(input_size=16, patch_size=4, in_channels=3, hidden_size=48, depth=3, num_heads=2,
                            num_classes=7, learn_sigma=False),
    "one-head-deep": dict(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=4, num_heads=1,
                          num_classes=3, learn_sigma=True, mlp_ratio=2.0),
}
TOLERANCE = 1e-5


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (the zero-initialised adaLN and output layers too), scaled by 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:  # the paper model's fixed pos_embed
                continue
            fan_in = math.prod(p.shape[1:]) if p.ndim >= 2 else 4
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def inputs(config: dict, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images, timesteps spread over 0..999 (one fractional) and labels including the null class."""
    g = torch.Generator().manual_seed(1)
    size = config["input_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    t = torch.tensor([0.0, 437.5, 999.0])[:batch]
    y = torch.tensor([0, config["num_classes"] - 1, config["num_classes"]])[:batch]  # the last is the null class
    return x, t, y


# ----------------------------------------------------------------------------- the paper's DiT, from its text


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT 2-D sin-cos positions (N, dim): the first half encodes the column, the second the row."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)


class PaperAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class PaperMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PaperBlock(nn.Module):
    """adaLN-Zero: γ, β, α for attention and MLP regressed from c; LayerNorms without their own weights."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = PaperAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = PaperMlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        beta1, gamma1, alpha1, beta2, gamma2, alpha2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + alpha1 * self.attn(self.norm1(x) * (1 + gamma1) + beta1)
        return x + alpha2 * self.mlp(self.norm2(x) * (1 + gamma2) + beta2)


class PaperFinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        beta, gamma = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + gamma) + beta)


class PaperDiT(nn.Module):
    """Patchify + sin-cos positions, t and y embeddings summed into c, adaLN-Zero blocks, final layer."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes,
                 learn_sigma, mlp_ratio=4.0):
        super().__init__()
        self.p, self.c_out = patch_size, in_channels * (2 if learn_sigma else 1)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # + the null class
        pos = sincos_2d(hidden_size, input_size // patch_size)
        self.pos_embed = nn.Parameter(torch.from_numpy(pos).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList([PaperBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = PaperFinalLayer(hidden_size, patch_size * patch_size * self.c_out)

    def forward(self, x, t, y):
        b, _, h, w = x.shape
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)  # 256 features: [cos, sin]
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)  # (B, N, p*p*c_out), each patch laid out (p, q, c)
        gh, gw, p = h // self.p, w // self.p, self.p
        return x.reshape(b, gh, gw, p, p, self.c_out).permute(0, 5, 1, 3, 2, 4).reshape(b, self.c_out, h, w)


# ----------------------------------------------------------------------------- official layout


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dit_from_official_gives_equal_outputs(name):
    config = CONFIGS[name]
    reference = randomize(PaperDiT(**config)).eval()
    state = reference.state_dict()
    assert "pos_embed" in state and "blocks.0.attn.qkv.weight" in state  # the official names and buffers
    model = dit_from_official(state, num_heads=config["num_heads"])
    assert isinstance(model, DiT) and not model.training
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_classes", "learn_sigma"):
        assert model.config[key] == config[key], key
    assert model.config["mlp_ratio"] == config.get("mlp_ratio", 4.0)
    x, t, y = inputs(config)
    with torch.no_grad():
        expected, out = reference(x, t, y), model(x, t, y)
    assert out.shape == expected.shape == (3, model.out_channels, config["input_size"], config["input_size"])
    assert expected.abs().max() > 0.1
    assert (out - expected).abs().max() <= TOLERANCE


def test_vitdiff_init_loaded_into_the_paper_model_is_the_same_function():
    """The other direction of the renaming: vitdiff's own (random) weights, in the paper model's names."""
    config = CONFIGS["patch2-sigma"]
    ours = randomize(DiT(**config), seed=3).eval()
    state = {k: v for k, v in ours.state_dict().items() if ".attn.q." not in k and ".attn.kv." not in k}
    for i in range(config["depth"]):
        for kind in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([ours.state_dict()[f"blocks.{i}.attn.q.{kind}"],
                                                              ours.state_dict()[f"blocks.{i}.attn.kv.{kind}"]])
    reference = PaperDiT(**config).eval()
    state["pos_embed"] = reference.pos_embed.detach().clone()
    reference.load_state_dict(state)
    x, t, y = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), reference(x, t, y), atol=TOLERANCE, rtol=0)


def test_dit_from_official_label_table_and_errors():
    config = CONFIGS["patch4-no-sigma"]
    state = randomize(PaperDiT(**config)).state_dict()
    assert dit_from_official(state, num_heads=2).config["class_dropout_prob"] == 0.1
    no_null = dict(state, **{"y_embedder.embedding_table.weight": state["y_embedder.embedding_table.weight"][:-1]})
    model = dit_from_official(no_null, num_heads=2, num_classes=7)
    assert model.config["class_dropout_prob"] == 0.0 and model.num_labels == 7
    with pytest.raises(ValueError, match="num_classes=5"):
        dit_from_official(state, num_heads=2, num_classes=5)
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        dit_from_official(state, num_heads=5)
    with pytest.raises(ValueError, match="checkpoint\\['ema'\\]"):
        dit_from_official({"model": state}, num_heads=2)
    with pytest.raises(ValueError, match="lacks"):
        dit_from_official({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}, num_heads=2)
    with pytest.raises(ValueError, match="no place"):
        dit_from_official(dict(state, extra=torch.zeros(1)), num_heads=2)
    with pytest.raises(ValueError, match="sin-cos"):
        dit_from_official(dict(state, pos_embed=torch.randn_like(state["pos_embed"])), num_heads=2)
    bad_out = dict(state, **{"final_layer.linear.weight": torch.zeros(16 * 5, 48),
                             "final_layer.linear.bias": torch.zeros(16 * 5)})
    with pytest.raises(ValueError, match="5 output channels"):
        dit_from_official(bad_out, num_heads=2)


# ----------------------------------------------------------------------------- diffusers

diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency")


def random_diffusers_dit(config: dict, seed: int = 0) -> nn.Module:
    """A diffusers DiTTransformer2DModel for `config`, every weight random, one embedder shared by all blocks."""
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=config["num_heads"], attention_head_dim=config["hidden_size"] // config["num_heads"],
        in_channels=config["in_channels"],
        out_channels=config["in_channels"] * (2 if config["learn_sigma"] else 1), num_layers=config["depth"],
        sample_size=config["input_size"], patch_size=config["patch_size"],
        num_embeds_ada_norm=config["num_classes"])
    randomize(model, seed).eval()
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:  # as in converted checkpoints: one embedder, copied per block
        block.norm1.emb.load_state_dict(shared)
    return model


def test_timestep_features_with_diffusers_frequency_shift():
    from diffusers.models.embeddings import get_timestep_embedding

    from vitdiff.layers import timestep_embedding

    t = torch.tensor([0.0, 1.0, 437.5, 999.0])
    for shift in (0, 1):
        expected = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=shift)
        torch.testing.assert_close(timestep_embedding(t, 256, downscale_freq_shift=shift), expected)


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.get("mlp_ratio", 4.0) == 4.0])  # diffusers: 4
def test_dit_from_diffusers_gives_equal_outputs(name):
    config = CONFIGS[name]
    reference = random_diffusers_dit(config)
    model = dit_from_diffusers(reference)
    assert isinstance(model, DiT) and not model.training
    assert model.config["mlp_norm_eps"] == 1e-5 and model.config["timestep_freq_shift"] == 1.0
    x, t, y = inputs(config)
    with torch.no_grad():
        expected, out = reference(x, t, y).sample, model(x, t, y)
    assert out.shape == expected.shape and expected.abs().max() > 0.1
    assert (out - expected).abs().max() <= TOLERANCE


def test_dit_from_diffusers_rebuilds_from_config_and_keeps_mode():
    reference = random_diffusers_dit(CONFIGS["patch2-sigma"]).train()
    model = dit_from_diffusers(reference)
    assert model.training
    rebuilt = DiT(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    x, t, y = inputs(CONFIGS["patch2-sigma"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, t, y), reference.eval()(x, t, y).sample, atol=TOLERANCE, rtol=0)


def test_dit_from_diffusers_errors():
    config = CONFIGS["patch2-sigma"]
    reference = random_diffusers_dit(config)
    with torch.no_grad():
        reference.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="transformer_blocks\\[1\\] has its own"):
        dit_from_diffusers(reference)
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        dit_from_diffusers(nn.Linear(2, 2))
    odd = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                          out_channels=6, num_layers=1, sample_size=8, num_embeds_ada_norm=3)
    with pytest.raises(ValueError, match="6 output channels for 4 input channels"):
        dit_from_diffusers(odd)
