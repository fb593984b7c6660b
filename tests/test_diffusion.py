"""Tests of vitdiff.diffusion: schedules, forward process, posterior, loss, samplers, inpainting, guidance."""

from __future__ import annotations

import math

import pytest
import torch

from vitdiff.diffusion import (
    ExpertDenoisers,
    NoiseSchedule,
    classifier_free_guidance,
    cosine_betas,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    diffusion_loss,
    img2img_start,
    matching_timesteps,
    min_snr_weight,
    timesteps_for,
)

SHAPE = (2, 1, 4, 4)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, smooth stand-in for a trained denoiser (any function of x and t will do for plumbing tests)."""
    return torch.tanh(x) * (0.5 + t.float().view(-1, *[1] * (x.ndim - 1)) / 1000)


def one_point_oracle(schedule: NoiseSchedule, c: torch.Tensor):
    """The exact ε-predictor when the data is the single point c: ε = (x_t - sqrt(ᾱ) c) / sqrt(1-ᾱ)."""
    def model(x, t):
        a = schedule.alphas_cumprod.double()[t].view(-1, *[1] * (x.ndim - 1))
        return ((x.double() - a.sqrt() * c) / (1 - a).sqrt()).to(x.dtype)
    return model


def gaussian_oracle(schedule: NoiseSchedule, mu: float, sd: float):
    """The exact ε-predictor E[ε | x_t] for data x0 ~ N(mu, sd²): sqrt(1-ᾱ) (x_t - sqrt(ᾱ) mu) / (ᾱ sd² + 1-ᾱ)."""
    def model(x, t):
        a = schedule.alphas_cumprod.double()[t].view(-1, *[1] * (x.ndim - 1))
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * sd**2 + 1 - a)).to(x.dtype)
    return model


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_is_the_cumulative_product_of_one_minus_beta(kind):
    s = NoiseSchedule(100, kind)
    betas = s.betas.double()
    assert s.betas.dtype == torch.float32 and s.betas.shape == (100,)
    assert (betas > 0).all() and (betas <= 0.999 + 1e-7).all()  # cosine clips at 0.999
    torch.testing.assert_close(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.alphas_cumprod_prev[0] == 1


def test_linear_and_cosine_betas_follow_their_definitions():
    s = NoiseSchedule(50, "linear", beta_start=1e-3, beta_end=0.05)
    assert s.betas[0].item() == pytest.approx(1e-3) and s.betas[-1].item() == pytest.approx(0.05)
    torch.testing.assert_close(s.betas[1:] - s.betas[:-1], torch.full((49,), (0.05 - 1e-3) / 49), atol=1e-7, rtol=0)
    # cosine: ᾱ_t = f(t+1) / f(0) with f(u) = cos²((u/T + s)/(1 + s) · π/2), until the 0.999 clip bites
    T, s_ = 50, 0.008
    f = [math.cos((u / T + s_) / (1 + s_) * math.pi / 2) ** 2 for u in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    unclipped = cosine_betas(T) < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last beta is clipped at T = 50
    torch.testing.assert_close(NoiseSchedule(T, "cosine").alphas_cumprod.double()[unclipped], expected[unclipped],
                               atol=1e-7, rtol=1e-6)


def test_schedule_buffers_move_with_the_module():
    s = NoiseSchedule(10).double()
    assert s.alphas_cumprod.dtype == torch.float64 and s.posterior_variance.dtype == torch.float64
    assert s.state_dict() == {}  # the tables are rebuilt from the config, not saved
    assert s.config == dict(num_timesteps=10, schedule="linear", beta_start=1e-4, beta_end=0.02)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("shift", [2.0, 4.0])
def test_a_shifted_schedule_divides_every_snr_by_the_shift_squared(kind, shift):
    plain, shifted = NoiseSchedule(1000, kind), NoiseSchedule(1000, kind, shift=shift)
    # the float64 copies of ᾱ: 1 - ᾱ cancels in float32 near t = 0
    a, b = (torch.tensor(s.alphas_cumprod_float64, dtype=torch.float64) for s in (plain, shifted))
    torch.testing.assert_close(b / (1 - b), a / (1 - a) / shift**2, rtol=1e-9, atol=0)
    # every table is rebuilt from the shifted ᾱ: β_t = 1 - ᾱ_t / ᾱ_{t-1}, and the posterior from those β
    torch.testing.assert_close(shifted.alphas_cumprod.double(), torch.cumprod(1 - shifted.betas.double(), 0),
                               rtol=1e-5, atol=1e-9)
    assert (b < a).all() and (shifted.betas > 0).all() and (shifted.betas < 1).all()
    assert shifted.config["shift"] == shift and "shift" not in plain.config
    # SD3's timestep shift for flow matching is the same map: a VP step of SNR r sits at flow time
    # σ = 1 / (1 + sqrt(r)) (flow's SNR is ((1-σ)/σ)²), and σ' = sσ / (1 + (s-1)σ) there
    sigma, sigma_shifted = 1 / (1 + (a / (1 - a)).sqrt()), 1 / (1 + (b / (1 - b)).sqrt())
    torch.testing.assert_close(sigma_shifted, shift * sigma / (1 + (shift - 1) * sigma), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_an_interpolated_shift_moves_log_snr_linearly_in_t(kind):
    plain, shifted = NoiseSchedule(1000, kind), NoiseSchedule(1000, kind, shift=(1.0, 8.0))
    a, b = (torch.tensor(s.alphas_cumprod_float64, dtype=torch.float64) for s in (plain, shifted))
    log_ratio = (a / (1 - a)).log() - (b / (1 - b)).log()  # log SNR(t) - log SNR'(t) = 2 log s_t
    u = torch.linspace(0, 1, 1000, dtype=torch.float64)
    torch.testing.assert_close(log_ratio, 2 * u * math.log(8.0), rtol=0, atol=1e-9)
    assert shifted.config["shift"] == (1.0, 8.0) and (shifted.snr(torch.arange(1, 1000)) < shifted.snr(
        torch.arange(999))).all()  # still a noise level that grows with t
    for name, table in NoiseSchedule(100, kind, shift=(3.0, 3.0)).named_buffers():  # a constant pair = one shift
        assert torch.equal(table, getattr(NoiseSchedule(100, kind, shift=3.0), name)), name


def test_a_shift_of_one_changes_nothing_and_bad_shifts_are_refused():
    for kind in ("linear", "cosine"):
        plain, same = NoiseSchedule(100, kind), NoiseSchedule(100, kind, shift=1.0)
        for name, table in plain.named_buffers():
            assert torch.equal(table, getattr(same, name)), name
    for bad in (0.0, -2.0, float("inf"), float("nan"), True, "4", (1.0,), (1.0, 2.0, 3.0), (0.0, 4.0), (1.0, None)):
        with pytest.raises(ValueError, match="shift must be a positive finite number"):
            NoiseSchedule(100, "cosine", shift=bad)
    with pytest.raises(ValueError, match="noise level fall"):  # a shift that shrinks faster than the SNR falls
        NoiseSchedule(100, "cosine", shift=(1e6, 1e-6))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_snr_is_strictly_decreasing(kind):
    s = NoiseSchedule(1000, kind)
    snr = s.snr(torch.arange(1000))
    assert (snr[1:] < snr[:-1]).all()
    a = torch.cumprod(1 - s.betas.double(), 0)  # in float64: 1 - ᾱ cancels in float32 near t = 0
    torch.testing.assert_close(snr.double(), a / (1 - a), rtol=2e-5, atol=0)


# ----------------------------------------------------------------------------- forward process and posterior


def test_q_sample_matches_closed_form_and_step_by_step_noising():
    s = NoiseSchedule(50)
    n, t = 40_000, 40
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0]).expand(n, 4)
    a = s.alphas_cumprod[t].item()
    mean, var = math.sqrt(a) * x0[0], torch.full((4,), 1 - a)

    jump = s.q_sample(x0, t, generator=g)  # x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε
    steps = x0.clone()
    for k in range(t + 1):  # x_k = sqrt(1-β_k) x_{k-1} + sqrt(β_k) ε
        beta = s.betas[k].item()
        steps = math.sqrt(1 - beta) * steps + math.sqrt(beta) * torch.randn(steps.shape, generator=g)
    for x in (jump, steps):
        se_mean, se_var = math.sqrt((1 - a) / n), (1 - a) * math.sqrt(2 / n)  # standard errors
        torch.testing.assert_close(x.mean(0), mean, atol=5 * se_mean, rtol=0)
        torch.testing.assert_close(x.var(0), var, atol=5 * se_var, rtol=0)


def test_q_sample_with_given_noise_and_per_sample_timesteps():
    s = NoiseSchedule(100)
    x0, noise, t = torch.randn(3, 2, 2), torch.randn(3, 2, 2), torch.tensor([0, 50, 99])
    expected = torch.stack([s.alphas_cumprod[k].sqrt() * x0[i] + (1 - s.alphas_cumprod[k]).sqrt() * noise[i]
                            for i, k in enumerate(t.tolist())])
    torch.testing.assert_close(s.q_sample(x0, t, noise), expected)


def test_posterior_is_bayes_rule_on_gaussians():
    s = NoiseSchedule(100, "cosine")
    betas = s.betas.double()
    a_bar = torch.cumprod(1 - betas, 0)
    x0, x_t = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([1, 2, 30, 70, 99])
    mean, var, log_var = s.q_posterior(x0, x_t, t)

    # prior x_{t-1} | x0 ~ N(sqrt(ᾱ_{t-1}) x0, 1-ᾱ_{t-1}); likelihood x_t | x_{t-1} ~ N(sqrt(α_t) x_{t-1}, β_t)
    a_prev, b, alpha = a_bar[t - 1, None], betas[t, None], 1 - betas[t, None]
    precision = 1 / (1 - a_prev) + alpha / b
    expected_var = 1 / precision
    expected_mean = expected_var * (a_prev.sqrt() * x0.double() / (1 - a_prev) + alpha.sqrt() * x_t.double() / b)
    torch.testing.assert_close(mean.double(), expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), expected_var, atol=0, rtol=1e-5)
    torch.testing.assert_close(log_var, var.log())
    # at t = 0 the posterior is the point x0; its clipped log-variance borrows t = 1's
    mean0, var0, log_var0 = s.q_posterior(x0, x_t, 0)
    torch.testing.assert_close(mean0, x0)
    assert var0.item() == 0 and log_var0.item() == pytest.approx(s.posterior_variance[1].log().item())


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_prediction_conversions_round_trip(prediction):
    s = NoiseSchedule(1000, "cosine")
    x0, noise = torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    t = torch.tensor([0, 1, 100, 500, 900, 990])
    x_t = s.q_sample(x0, t, noise)
    target = s.target(x0, noise, t, prediction)
    torch.testing.assert_close(s.predict_x0(x_t, t, target, prediction), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(s.predict_eps(x_t, t, target, prediction), noise, atol=2e-4, rtol=1e-4)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    torch.testing.assert_close(target, expected)


def test_diffusion_loss_is_the_mse_to_the_target():
    s = NoiseSchedule(100)
    x0, noise, t = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.tensor([3, 30, 60, 99])
    zero = lambda x, t: torch.zeros_like(x)
    assert diffusion_loss(zero, s, x0, t=t, noise=noise).item() == pytest.approx(noise.pow(2).mean().item())
    assert diffusion_loss(zero, s, x0, "x0", t=t, noise=noise).item() == pytest.approx(x0.pow(2).mean().item())

    seen = {}

    def oracle_v(x, t, y):  # knows x0 and noise, answers v; records what the loss passed in
        seen.update(t=t, y=y)
        return s.target(x0, noise, t, "v")

    assert diffusion_loss(oracle_v, s, x0, "v", t=t, noise=noise, y=torch.arange(4)).item() < 1e-12
    assert torch.equal(seen["y"], torch.arange(4)) and torch.equal(seen["t"], t)

    weight = torch.ones((), requires_grad=True)
    loss = diffusion_loss(lambda x, t: weight * x, s, x0)  # random t and noise
    loss.backward()
    assert weight.grad is not None and seen["t"].shape == (4,)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_min_snr_loss_is_the_x0_error_weighted_by_snr_capped_at_gamma(prediction, schedule_name):
    s, gamma = NoiseSchedule(1000, schedule_name).double(), 5.0
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 1, 3, 3, dtype=torch.float64), torch.randn(6, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 10, 200, 500, 900, 999])  # SNR from 1e4 down to about 0
    x0_guess = x0 + 0.3 * torch.randn_like(x0)  # an imperfect denoiser, answering in the prediction's terms

    def model(x_t, t):
        eps = s.predict_eps(x_t, t, x0_guess, "x0")
        return {"epsilon": eps, "x0": x0_guess, "v": s.target(x0_guess, eps, t, "v")}[prediction]

    snr = s.snr(t)
    per_sample_x0_error = (x0 - x0_guess).pow(2).flatten(1).mean(1)
    expected = (snr.clamp(max=gamma) * per_sample_x0_error).mean()
    loss = diffusion_loss(model, s, x0, prediction, t=t, noise=noise, snr_gamma=gamma)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)  # the schedule tables are stored in float32
    assert snr.min() < gamma < snr.max()  # both sides of the cap are exercised
    # unweighted, the same model's loss is dominated by other steps: the weighting changes the number
    assert not torch.isclose(diffusion_loss(model, s, x0, prediction, t=t, noise=noise), expected)


def test_min_snr_weights_of_the_epsilon_loss_are_one_below_gamma_and_finite_at_zero_snr():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0, 1e4])
    torch.testing.assert_close(min_snr_weight(snr, 5.0), torch.tensor([1.0, 1.0, 1.0, 0.1, 5e-4]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.0, 0.5, 5.0, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51, 5 / 10001]))
    s, x0 = NoiseSchedule(100), torch.randn(8, 1, 2, 2)
    t, noise = torch.arange(0, 100, 13), torch.randn(8, 1, 2, 2)
    half = lambda x, t: 0.5 * x
    big = diffusion_loss(half, s, x0, t=t, noise=noise, snr_gamma=1e9)  # γ above every SNR: the plain ε loss
    torch.testing.assert_close(big, diffusion_loss(half, s, x0, t=t, noise=noise))
    scalar_data = diffusion_loss(half, s, torch.randn(8), t=t, noise=torch.randn(8), snr_gamma=5.0)  # x0: (B,)
    assert scalar_data.ndim == 0 and torch.isfinite(scalar_data)
    for bad in (0, -1.0, math.inf, True, "5"):
        with pytest.raises(ValueError, match="gamma"):
            diffusion_loss(half, s, x0, snr_gamma=bad)


def test_input_perturbation_feeds_x_t_of_perturbed_noise_and_keeps_the_clean_target():
    s = NoiseSchedule(100)
    torch.manual_seed(0)
    x0, noise, t, gamma = torch.randn(64, 1, 4, 4), torch.randn(64, 1, 4, 4), torch.randint(0, 100, (64,)), 0.1
    seen = {}

    def recorder(x, t):
        seen["x_t"] = x
        return torch.zeros_like(x)

    torch.manual_seed(1)
    loss = diffusion_loss(recorder, s, x0, t=t, noise=noise, input_perturbation=gamma)
    torch.manual_seed(1)
    xi = torch.randn_like(x0)  # the loss's one fresh draw
    torch.testing.assert_close(seen["x_t"], s.q_sample(x0, t, noise + gamma * xi))
    torch.testing.assert_close(loss, noise.pow(2).mean())  # the target is still ε, not ε + γ ξ
    # an ε oracle that reads the perturbed input back is off by exactly γ ξ: the loss is γ² E[ξ²]
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    read_eps = lambda x, t: (x - a.sqrt() * x0) / (1 - a).sqrt()
    torch.manual_seed(1)
    torch.testing.assert_close(diffusion_loss(read_eps, s, x0, t=t, noise=noise, input_perturbation=gamma),
                               (gamma * xi).pow(2).mean(), rtol=1e-3, atol=1e-6)
    for off in (None, 0.0):  # no perturbation: x_t from ε itself
        diffusion_loss(recorder, s, x0, t=t, noise=noise, input_perturbation=off)
        torch.testing.assert_close(seen["x_t"], s.q_sample(x0, t, noise))
    for bad in (-0.1, math.inf, True, "0.1"):
        with pytest.raises(ValueError, match="input_perturbation"):
            diffusion_loss(recorder, s, x0, input_perturbation=bad)


def test_diffusion_loss_draws_t_uniformly_from_all_of_0_to_T_minus_1():
    s, n = NoiseSchedule(4), 8000
    seen = []

    def recorder(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    torch.manual_seed(1)
    for _ in range(4):
        diffusion_loss(recorder, s, torch.zeros(n // 4, 1))
    t = torch.cat(seen)
    counts = torch.bincount(t, minlength=6)
    assert t.dtype == torch.int64 and counts[4:].sum() == 0  # never T or beyond
    # each of 0..3 with probability 1/4: the counts lie within 5 standard deviations of n/4 (t = 0 included)
    assert ((counts[:4] - n / 4).abs() < 5 * math.sqrt(n * 0.25 * 0.75)).all(), counts


# ----------------------------------------------------------------------------- timesteps and samplers


def test_timesteps_for_spacings():
    assert timesteps_for(1000, 50, "leading").tolist() == list(range(980, -1, -20))
    assert timesteps_for(1000, 50, "trailing").tolist() == list(range(999, 18, -20))
    ts = timesteps_for(1000, 7, "linspace")
    assert ts[0] == 999 and ts[-1] == 0 and ts.dtype == torch.int64
    for spacing in ("leading", "trailing", "linspace"):
        ts = timesteps_for(100, 30, spacing)
        assert len(ts) == 30 and (ts[1:] < ts[:-1]).all() and 0 <= ts.min() and ts.max() <= 99
        assert timesteps_for(100, 100, spacing).tolist() == list(range(99, -1, -1))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim_eta1"])
def test_samplers_are_reproducible_from_the_generator(sampler):
    s = NoiseSchedule(30)
    run = {
        "ddpm": lambda g: ddpm_sample(toy_model, s, SHAPE, generator=g, progress=False),
        "ddim": lambda g: ddim_sample(toy_model, s, SHAPE, steps=10, generator=g, progress=False),
        "ddim_eta1": lambda g: ddim_sample(toy_model, s, SHAPE, steps=10, eta=1.0, generator=g, progress=False),
    }[sampler]
    a, b, c = (run(torch.Generator().manual_seed(seed)) for seed in (0, 0, 1))
    assert a.shape == SHAPE and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_with_eta_zero_is_deterministic_given_x_T():
    s = NoiseSchedule(50, "cosine")
    x_T = torch.randn(SHAPE)
    a, b = (ddim_sample(toy_model, s, SHAPE, steps=10, x_T=x_T, generator=torch.Generator().manual_seed(seed),
                        progress=False) for seed in (0, 1))
    assert torch.equal(a, b)
    c = ddim_sample(toy_model, s, SHAPE, steps=10, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(1),
                    progress=False)
    assert not torch.allclose(a, c)  # eta > 0 draws fresh noise


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_with_every_step_and_eta_one_is_ddpm(prediction):
    # σ² = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t = β̃_t, and then DDIM's mean equals the posterior mean μ̃(x̂0, x_t).
    # Same generator -> same noise: DDIM's extra draw at the last step is multiplied by σ_0 = 0.
    s = NoiseSchedule(40)
    kwargs = dict(clip_x0=False, prediction=prediction, progress=False)
    ddpm = ddpm_sample(toy_model, s, SHAPE, generator=torch.Generator().manual_seed(3), **kwargs)
    ddim = ddim_sample(toy_model, s, SHAPE, steps=40, eta=1.0, generator=torch.Generator().manual_seed(3), **kwargs)
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_samplers_recover_a_one_point_distribution_with_the_exact_denoiser(sampler):
    s = NoiseSchedule(100)
    c = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    x = sampler(one_point_oracle(s, c), s, SHAPE, generator=torch.Generator().manual_seed(0), clip_x0=False,
                progress=False)
    torch.testing.assert_close(x, c.expand(SHAPE), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_a_gaussian_with_the_exact_denoiser(sampler):
    # data N(0.5, 0.3²): with the exact E[ε | x_t] and 1000 steps both samplers reproduce mean and spread
    s = NoiseSchedule(1000)
    model, g = gaussian_oracle(s, 0.5, 0.3), torch.Generator().manual_seed(0)
    if sampler == "ddpm":
        x = ddpm_sample(model, s, (4000, 1), generator=g, clip_x0=False, progress=False)
    else:
        x = ddim_sample(model, s, (4000, 1), steps=1000, generator=g, clip_x0=False, progress=False)
    assert x.mean().item() == pytest.approx(0.5, abs=0.02)
    assert x.std().item() == pytest.approx(0.3, abs=0.015)


def test_ddpm_step_at_t0_returns_the_clipped_x0_prediction():
    s = NoiseSchedule(100)
    x_t, out = torch.randn(SHAPE), torch.randn(SHAPE) * 3
    x0 = ddpm_step(s, out, 0, x_t, None, prediction="x0")
    torch.testing.assert_close(x0, out.clamp(-1, 1))
    x_prev = ddim_step(s, out, 5, -1, x_t, prediction="x0", clip_x0=False)  # t_prev = -1: ᾱ_prev = 1
    torch.testing.assert_close(x_prev, out)


# ----------------------------------------------------------------------------- inpainting and image-to-image


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpainting_keeps_the_known_pixels_exactly(sampler):
    s, shape = NoiseSchedule(30), (8, 1, 8, 8)
    known = torch.rand(1, 1, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1  # left half known, as 0/1 floats
    inputs = {}

    def recording(x, t):
        inputs[t[0].item()] = x.clone()
        return toy_model(x, t)

    kwargs = dict(generator=torch.Generator().manual_seed(0), known=known, known_mask=mask, progress=False)
    if sampler == "ddpm":
        x = ddpm_sample(recording, s, shape, **kwargs)
    else:
        x = ddim_sample(recording, s, shape, steps=10, eta=0.5, **kwargs)
    m, known = mask.bool().expand(shape), known.expand(shape)
    assert torch.equal(x[m], known[m])
    assert not torch.allclose(x[~m], known[~m])  # the rest was generated
    # along the way the model sees the known pixels noised to its step: q_sample(known, t)
    for t in (0, 12):
        a = s.alphas_cumprod[t].item()
        residual = (inputs[t] - math.sqrt(a) * known)[m]
        assert residual.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.2)


def test_img2img_starts_the_reverse_process_at_start_t():
    s = NoiseSchedule(100)
    x0 = torch.rand(SHAPE) * 2 - 1
    x_t, start_t = img2img_start(s, x0, 0.3, generator=torch.Generator().manual_seed(0))
    assert start_t == round(0.3 * 99) and x_t.shape == SHAPE

    calls = []

    def recording(x, t):
        calls.append(t[0].item())
        assert torch.equal(t, torch.full((SHAPE[0],), t[0].item()))
        return toy_model(x, t)

    ddpm_sample(recording, s, SHAPE, x_T=x_t, start_t=start_t, progress=False)
    assert calls == list(range(start_t, -1, -1))
    calls.clear()
    ddim_sample(recording, s, SHAPE, steps=10, x_T=x_t, start_t=start_t, progress=False)
    assert calls == [start_t] + [t for t in timesteps_for(100, 10).tolist() if t < start_t]
    # strength 0 keeps the image: one step from the least-noised level
    x_t0, start0 = img2img_start(s, x0, 0.0)
    assert start0 == 0
    torch.testing.assert_close(ddim_sample(one_point_oracle(s, x0), s, SHAPE, x_T=x_t0, start_t=0, progress=False),
                               x0, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- classifier-free guidance


class LabelModel:
    """A toy conditional denoiser that records its calls: out = x · w[y] + t/100."""

    def __init__(self):
        self.w = torch.tensor([0.5, 2.0, -1.0])
        self.batch_sizes = []

    def __call__(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        return x * self.w[y].view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) / 100


def test_guidance_interpolates_and_extrapolates_between_conditional_and_unconditional():
    model, x, t, y = LabelModel(), torch.randn(SHAPE), torch.tensor([10, 20]), torch.tensor([0, 1])
    null = {"y": torch.tensor([2])}  # batch 1, broadcast to the batch
    out_c, out_u = model(x, t, y=y), model(x, t, y=torch.tensor([2, 2]))
    model.batch_sizes.clear()
    torch.testing.assert_close(classifier_free_guidance(model, 1.0, null)(x, t, y=y), out_c)
    torch.testing.assert_close(classifier_free_guidance(model, 0.0, null)(x, t, y=y), out_u)
    torch.testing.assert_close(classifier_free_guidance(model, 4.0, null)(x, t, y=y), out_u + 4 * (out_c - out_u))
    assert model.batch_sizes == [4, 4, 4]  # one batched call with both halves


def test_guidance_with_text_context_and_a_negative_prompt_works_in_a_sampler():
    def text_model(x, t, context, context_mask):  # (B, C, H, W), (B,), (B, M, D), (B, M)
        pooled = (context * context_mask[..., None]).sum((1, 2)) / context_mask.sum(1)
        return torch.tanh(x) + pooled.view(-1, 1, 1, 1)

    context, mask = torch.randn(2, 3, 4), torch.tensor([[True, True, False], [True, False, False]])
    negative = {"context": torch.randn(1, 3, 4), "context_mask": torch.tensor([[True, True, True]])}
    guided = classifier_free_guidance(text_model, 3.0, negative)
    x, t = torch.randn(SHAPE), torch.tensor([5, 5])
    out_c = text_model(x, t, context, mask)
    out_u = text_model(x, t, negative["context"].expand(2, 3, 4), negative["context_mask"].expand(2, 3))
    torch.testing.assert_close(guided(x, t, context=context, context_mask=mask), out_u + 3 * (out_c - out_u))
    x = ddim_sample(guided, NoiseSchedule(20), SHAPE, steps=5, context=context, context_mask=mask, progress=False)
    assert x.shape == SHAPE


# ----------------------------------------------------------------------------- errors


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="schedule"):
        NoiseSchedule(10, "quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule(1)
    with pytest.raises(ValueError, match="beta_end"):
        NoiseSchedule(10, beta_end=1.5)
    s, x = NoiseSchedule(10), torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\], got values in \[0, 10\]"):
        s.q_sample(x, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="t must lie"):
        s.q_sample(x, -1)
    with pytest.raises(TypeError, match="integer"):
        s.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        s.q_sample(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise must have the shape"):
        s.q_sample(x, 3, torch.randn(2, 1, 4, 5))
    with pytest.raises(ValueError, match="prediction"):
        s.predict_x0(x, 3, x, "score")
    with pytest.raises(ValueError, match="spacing"):
        timesteps_for(10, 5, "random")
    with pytest.raises(ValueError, match="steps"):
        timesteps_for(10, 11)
    with pytest.raises(ValueError, match="variance"):
        ddpm_sample(toy_model, s, SHAPE, variance="huge", progress=False)
    with pytest.raises(ValueError, match="x_T"):
        ddpm_sample(toy_model, s, SHAPE, x_T=torch.randn(1, 1, 4, 4), progress=False)
    with pytest.raises(ValueError, match="start_t"):
        ddim_sample(toy_model, s, SHAPE, steps=5, start_t=3, progress=False)
    with pytest.raises(ValueError, match="known_mask"):
        ddpm_sample(toy_model, s, SHAPE, known=x, progress=False)
    with pytest.raises(ValueError, match="model output"):
        ddpm_sample(lambda x, t: x[:, :, :2], s, SHAPE, progress=False)
    with pytest.raises(ValueError, match="noise is required"):
        ddpm_step(s, x, 3, x, None)
    with pytest.raises(ValueError, match="t_prev"):
        ddim_step(s, x, 3, 3, x)
    with pytest.raises(ValueError, match="strength"):
        img2img_start(s, x, 1.5)
    guided = classifier_free_guidance(LabelModel(), 2.0, {"y": torch.tensor([2])})
    with pytest.raises(ValueError, match="condition keywords"):
        guided(x, torch.tensor([1, 1]), label=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="scale"):
        classifier_free_guidance(LabelModel(), "7", {"y": torch.tensor([2])})


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddim_with_eps_from_clipped_x0_is_the_clipped_ddpm_step(schedule_name):
    # DDIM with eta = 1 one step back is DDPM only if x̂0 and ε̂ still add up to x_t: the posterior mean
    # uses the clipped x̂0 with x_t itself, which is the pair (clipped x̂0, ε̂ re-derived from it)
    s = NoiseSchedule(1000, schedule_name)
    g = torch.Generator().manual_seed(0)
    x_t, eps_hat, z = (torch.randn(4, 1, 6, 6, generator=g) for _ in range(3))
    for t in (999, 700, 300):
        assert (s.predict_x0(x_t, t, eps_hat).abs() > 1).any()  # the clip is active
        ddpm = ddpm_step(s, eps_hat, t, x_t, z, clip_x0=True)
        consistent = ddim_step(s, eps_hat, t, t - 1, x_t, eta=1.0, noise=z, eps_from_clipped_x0=True)
        torch.testing.assert_close(consistent, ddpm, atol=1e-5, rtol=1e-5)
        kept = ddim_step(s, eps_hat, t, t - 1, x_t, eta=1.0, noise=z)  # diffusers' default keeps the model's ε̂
        assert (kept - ddpm).abs().max() > 1e-2


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_eps_re_derived_from_an_unclipped_x0_is_the_models_own(prediction):
    # x̂0 already inside [-1, 1]: the clamp does nothing, so the re-derived ε̂ must invert predict_x0 exactly
    s = NoiseSchedule(1000, "cosine")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(4, 1, 6, 6, generator=g) - 0.5, torch.randn(4, 1, 6, 6, generator=g)
    for t, t_prev in ((999, 899), (500, 300), (20, -1)):
        a = s.alphas_cumprod.double()[t]
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
        output = {"epsilon": eps, "x0": x0, "v": (a.sqrt() * eps - (1 - a).sqrt() * x0).float()}[prediction]
        for eta in (0.0, 1.0):
            noise = torch.randn(x0.shape, generator=g)
            kept = ddim_step(s, output, t, t_prev, x_t, eta, noise, prediction=prediction)
            re_derived = ddim_step(s, output, t, t_prev, x_t, eta, noise, prediction=prediction,
                                   eps_from_clipped_x0=True)
            torch.testing.assert_close(re_derived, kept, atol=2e-4, rtol=1e-4)


def test_generate_passes_eps_from_clipped_x0_to_ddim():
    from vitdiff.bookmetrics import generate

    class Scale(torch.nn.Module):  # ε̂ = 3 x: x̂0 far outside [-1, 1]
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor(3.0))

        def forward(self, x, t):
            return self.weight * x

    s, model = NoiseSchedule(100, "linear"), Scale()
    out = {flag: generate(model, s, (1, 4, 4), 3, steps=5, eps_from_clipped_x0=flag, progress=False)
           for flag in (False, True)}
    with torch.no_grad():
        expected = ddim_sample(model, s, (3, 1, 4, 4), steps=5, spacing="trailing", eps_from_clipped_x0=True,
                               generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(out[True], expected)
    assert (out[True] - out[False]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- expert denoisers


def test_matching_timesteps_pair_the_noise_levels_of_two_schedules():
    plain = NoiseSchedule(1000, "cosine")
    assert torch.equal(matching_timesteps(plain, plain), torch.arange(1000))
    shifted = NoiseSchedule(1000, "cosine", shift=4.0)
    table = matching_timesteps(shifted, plain)  # (1000,)
    assert table.shape == (1000,) and table.dtype == torch.int64
    assert (table.diff() >= 0).all() and (table <= torch.arange(1000)).all()  # the shifted one is noisier at every t
    a, a_ref = (torch.tensor(s.alphas_cumprod_float64) for s in (shifted, plain))
    gaps = (a[table] - a_ref).abs()  # the nearest ᾱ: no neighbour of the chosen timestep is closer
    for step in (-1, 1):
        neighbour = (table + step).clamp(0, 999)
        assert (gaps <= (a[neighbour] - a_ref).abs() + 1e-15).all()
    assert gaps.max() < 0.02
    with pytest.raises(TypeError, match="reference must be a NoiseSchedule"):
        matching_timesteps(plain, "cosine")


class _Tagged(torch.nn.Module):
    """A stand-in expert whose output records who ran, at which timestep, with which condition row."""

    def __init__(self, tag: float):
        super().__init__()
        self.tag = tag

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.tag + 0 * x + (t.float() + 1000 * y.float()).view(-1, 1, 1, 1)


def test_expert_denoisers_route_each_row_by_its_noise_level():
    shifted, plain = NoiseSchedule(1000, "cosine", shift=4.0), NoiseSchedule(1000, "cosine")
    experts = ExpertDenoisers(_Tagged(0.25), _Tagged(0.5), shifted, plain, switch_abar=0.5)
    table = matching_timesteps(plain, shifted)
    t = torch.tensor([999, 600, 300, 100, 20, 0])
    y = torch.arange(6)
    out = experts(torch.zeros(6, 1, 2, 2), t, y=y)  # (6, 1, 2, 2)
    low = torch.tensor(shifted.alphas_cumprod_float64)[t] >= 0.5
    assert low.tolist() == [False, False, False, True, True, True]  # both experts run in this batch
    expected = torch.where(low, 0.5 + table[t].float(), 0.25 + t.float()) + 1000 * y.float()
    assert torch.equal(out[:, 0, 0, 0], expected)  # the right expert, its own timestep, its own condition row
    for t_all in (999, 0):  # a sampler's step: one expert for the whole batch
        out = experts(torch.zeros(6, 1, 2, 2), torch.tensor(t_all), y=y)
        step = table[0].item() + 0.5 if t_all == 0 else 999 + 0.25  # the low expert at its own matching timestep
        assert torch.allclose(out[:, 0, 0, 0] - 1000 * y.float(), torch.full((6,), float(step)))
    for bad in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="switch_abar"):
            ExpertDenoisers(_Tagged(0), _Tagged(1), shifted, plain, switch_abar=bad)


def test_expert_denoisers_of_one_model_on_one_schedule_are_that_model():
    schedule = NoiseSchedule(100, "linear")
    experts = ExpertDenoisers(_Tagged(0.0), _Tagged(0.0), schedule, schedule, switch_abar=0.7)
    x, t, y = torch.randn(5, 1, 2, 2), torch.tensor([99, 70, 40, 10, 0]), torch.arange(5)
    abar = schedule.alphas_cumprod[t]
    assert (abar < 0.7).sum() == 2 and (abar >= 0.7).sum() == 3  # both experts run, in one batch
    assert torch.equal(experts(x, t, y=y), _Tagged(0.0)(x, t, y))
    guided = classifier_free_guidance(experts, 3.0, {"y": torch.zeros(1, dtype=torch.long)})  # a 2B batch inside
    out_c, out_u = _Tagged(0.0)(x, t, y), _Tagged(0.0)(x, t, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(guided(x, t, y=y), out_u + 3.0 * (out_c - out_u))
