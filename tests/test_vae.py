"""Tests of the VAE (chapter 06): the Gaussian latent, shapes and errors, latent scaling, the loss, overfitting."""

import functools
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vitdiff.checkpoint import load_model, save_checkpoint
from vitdiff.data import Shapes
from vitdiff.train import TrainConfig, train
from vitdiff.vae import VAE, DiagonalGaussian, SmallVAE, vae_loss

TINY = dict(latent_channels=4, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, groups=4)


@pytest.mark.parametrize("shape", [(3, 2), (2, 8, 5, 5), (4, 2, 1, 3), (1, 6, 7, 2)])
def test_kl_matches_torch_distributions(shape):
    mean = torch.randn(shape[0], shape[1] // 2, *shape[2:])
    logvar = torch.randn_like(mean) * 2
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(dim=1)
    assert posterior.kl().shape == (shape[0],)
    torch.testing.assert_close(posterior.kl(), expected)


def test_nll_matches_torch_distributions_and_mode_is_mean():
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = torch.randn_like(mean)
    expected = -Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).flatten(1).sum(dim=1)
    torch.testing.assert_close(posterior.nll(z), expected)
    assert torch.equal(posterior.mode(), mean)


def test_logvar_is_clamped():
    posterior = DiagonalGaussian(torch.tensor([[0.0, 0.0, 100.0, -100.0]]))
    assert posterior.logvar.tolist() == [[20.0, -30.0]]
    assert torch.isfinite(posterior.kl()).all()


def test_parameters_need_an_even_channel_count():
    with pytest.raises(ValueError, match="2Z"):
        DiagonalGaussian(torch.randn(2, 3, 4, 4))


def test_samples_have_the_posterior_mean_and_variance():
    n = 20_000
    mean = torch.tensor([1.5, -2.0, 0.0])
    logvar = torch.tensor([0.0, 1.0, -2.0])
    params = torch.cat([mean, logvar])[None].expand(n, 6)  # n copies of one 3-D Gaussian
    z = DiagonalGaussian(params).sample(torch.Generator().manual_seed(0))  # (n, 3)
    std = torch.exp(0.5 * logvar)
    assert ((z.mean(0) - mean).abs() < 4 * std / n**0.5).all()
    torch.testing.assert_close(z.var(0), std**2, rtol=0.05, atol=0)
    again = DiagonalGaussian(params).sample(torch.Generator().manual_seed(0))
    assert torch.equal(z, again)  # the generator makes the draw reproducible


def test_gradients_flow_through_the_reparameterised_sample():
    mean = torch.randn(2, 3, 4, 4, requires_grad=True)
    logvar = torch.randn(2, 3, 4, 4, requires_grad=True)
    z = DiagonalGaussian(torch.cat([mean, logvar], dim=1)).sample()
    z.sum().backward()
    # z = mean + exp(logvar / 2)·ε: dz/dmean = 1, dz/dlogvar = exp(logvar / 2)·ε / 2 = (z − mean) / 2
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))
    torch.testing.assert_close(logvar.grad, (z - mean).detach() / 2)
    assert logvar.grad.abs().sum() > 0


@pytest.mark.parametrize("size, channel_mult", [(32, (1,)), (32, (1, 2)), (32, (1, 2, 2)), (32, (1, 2, 2, 4)),
                                                 (28, (1,)), (28, (1, 2)), (28, (1, 2, 2))])
def test_encode_decode_shapes_for_each_factor(size, channel_mult):
    vae = VAE(in_channels=3, **dict(TINY, channel_mult=channel_mult))
    f = 2 ** (len(channel_mult) - 1)
    assert vae.downsample_factor == f
    x = torch.randn(2, 3, size, size)
    posterior = vae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, size // f, size // f)
    assert vae.decode(posterior.sample()).shape == x.shape
    x_hat, _ = vae(x)
    assert x_hat.shape == x.shape


def test_non_square_images_and_mid_attention():
    vae = VAE(in_channels=1, mid_attention=True, **TINY)
    x = torch.randn(2, 1, 16, 24)
    assert vae.encode(x).mean.shape == (2, 4, 4, 6)
    assert vae(x)[0].shape == x.shape


def test_clear_errors_on_bad_input():
    vae = VAE(in_channels=1, **dict(TINY, channel_mult=(1, 2, 2, 4)))  # f = 8
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="in_channels=1"):
        vae.encode(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        vae.encode(torch.randn(1, 32, 32))
    with pytest.raises(ValueError, match="latent_channels=4"):
        vae.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="channel_mult"):
        VAE(channel_mult=())
    with pytest.raises(ValueError, match="latent_channels"):
        VAE(latent_channels=0)
    with pytest.raises(ValueError, match="recon"):
        vae_loss(vae, torch.randn(1, 1, 32, 32), recon="bce")


def test_estimate_scaling_factor_gives_unit_variance_and_is_saved(tmp_path):
    vae = VAE(in_channels=3, **TINY)
    images = Shapes(size=8, img_size=16).tensors()[0] * 2 - 1
    with torch.no_grad():
        raw_std = vae.encode(images).mode().std().item()
    factor = vae.estimate_scaling_factor(images, batch_size=3)  # three batches: 3 + 3 + 2
    assert factor == pytest.approx(1 / raw_std, rel=1e-4)
    assert factor != pytest.approx(1.0, abs=0.05)  # the test would be vacuous otherwise
    with torch.no_grad():
        assert vae.encode_latents(images).std().item() == pytest.approx(1.0, abs=1e-4)
    assert vae.state_dict()["scaling_factor"].item() == pytest.approx(factor)
    assert vae.config["scaling_factor"] == pytest.approx(factor)
    fresh = VAE(in_channels=3, **TINY)
    fresh.load_state_dict(vae.state_dict())
    assert fresh.scaling_factor.item() == pytest.approx(factor)
    save_checkpoint(tmp_path / "vae", vae)
    assert load_model(tmp_path / "vae", VAE).scaling_factor.item() == pytest.approx(factor)


def test_estimate_scaling_factor_with_sample_uses_sampled_latents():
    vae = VAE(in_channels=1, latent_channels=4, base_channels=4, channel_mult=(1,), groups=1)
    with torch.no_grad():  # hand-set encoder output: mean ±1 by channel, std 2 everywhere, whatever the image
        conv = vae.encoder.out[-1]
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, *[math.log(4.0)] * 4]))  # [mean, logvar = log 2²]
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    mean_values = torch.tensor([1.0, -1.0, 1.0, -1.0]).repeat_interleave(64).repeat(32)  # every latent mode
    assert vae.estimate_scaling_factor(images) == pytest.approx(1 / mean_values.std().item(), rel=1e-5)
    # sampled latents are mean + 2ε: variance 1 + 4 = 5, so the factor is 1/sqrt(5) (±3% over 8192 values)
    assert vae.estimate_scaling_factor(images, sample=True) == pytest.approx(1 / math.sqrt(5), rel=0.03)


def test_encode_latents_and_decode_latents_match_encode_and_decode():
    vae = VAE(in_channels=1, scaling_factor=0.37, **TINY)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        posterior = vae.encode(x)
        z_scaled = vae.encode_latents(x)
        torch.testing.assert_close(z_scaled, posterior.mode() * 0.37)
        torch.testing.assert_close(vae.decode_latents(z_scaled), vae.decode(posterior.mode()))
        sampled = vae.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(5))
        expected = posterior.sample(torch.Generator().manual_seed(5)) * 0.37
        torch.testing.assert_close(sampled, expected)


def test_small_vae_shapes_and_errors():
    vae = SmallVAE(latent_dim=2, img_size=28, hidden=32)
    x = torch.randn(5, 1, 28, 28)
    posterior = vae.encode(x)
    assert posterior.mean.shape == (5, 2) and posterior.kl().shape == (5,)
    assert vae.decode(posterior.sample()).shape == x.shape
    loss, parts = vae_loss(vae, (x, torch.zeros(5)))
    assert loss.ndim == 0 and set(parts) == {"recon", "kl", "mse"}
    with pytest.raises(ValueError, match="1, 28, 28"):
        vae.encode(torch.randn(5, 1, 32, 32))
    with pytest.raises(ValueError, match="latent_dim=2"):
        vae.decode(torch.randn(5, 3))


@pytest.mark.parametrize("recon", ["mse", "l1"])
def test_vae_loss_is_summed_recon_plus_beta_kl(recon):
    vae = VAE(in_channels=1, **TINY)
    x = torch.randn(3, 1, 16, 16)
    torch.manual_seed(1)
    loss, parts = vae_loss(vae, (x,), beta=0.3, recon=recon)
    torch.manual_seed(1)
    x_hat, posterior = vae(x)  # the same draw of the latent
    error = (x_hat - x) ** 2 if recon == "mse" else (x_hat - x).abs()
    recon_expected = error.sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(parts["recon"], recon_expected)
    torch.testing.assert_close(parts["kl"], posterior.kl().mean())
    torch.testing.assert_close(loss, recon_expected + 0.3 * posterior.kl().mean())
    torch.testing.assert_close(parts["mse"], ((x_hat - x) ** 2).mean())


def test_vae_loss_plugs_into_train():
    vae = VAE(in_channels=1, **TINY)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    result = train(vae, functools.partial(vae_loss, beta=1e-3), (images,),
                   TrainConfig(steps=3, batch_size=4), progress=False)
    assert len(result.history.loss) == 3 and {"recon", "kl", "mse"} <= set(result.history.metrics[0])


def test_overfits_one_batch():
    torch.manual_seed(0)
    x = Shapes(size=4, img_size=16).tensors()[0] * 2 - 1  # (4, 3, 16, 16)
    vae = VAE(in_channels=3, **TINY)  # f = 4: 4 latent channels at 4×4
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(200):
        loss, _ = vae_loss(vae, x, beta=1e-3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        mse = ((vae(x, sample=False)[0] - x) ** 2).mean()
    # Far better than the best reconstruction that ignores the latent (the batch's mean image).
    mean_image_mse = ((x - x.mean(0, keepdim=True)) ** 2).mean()
    assert mse < 0.25 * mean_image_mse
