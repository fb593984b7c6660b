"""vitdiff.diffusion against diffusers' DDPMScheduler and DDIMScheduler: schedules, noising, single steps,
timestep spacings and whole sampling loops.

Precision: diffusers builds ᾱ and the step coefficients in float32, where 1 - ᾱ_t and β_t = 1 - ᾱ_t/ᾱ_{t-1}
lose up to four digits near t = 0 (catastrophic cancellation); vitdiff computes its tables in float64. So each
step is compared (a) tightly (1e-5) with diffusers' own step code evaluated in float64 (`in_float64`), and
(b) loosely (1e-3) with diffusers as shipped, where the difference is diffusers' float32 rounding.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from vitdiff.diffusion import (
    NoiseSchedule,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    min_snr_weight,
    timesteps_for,
)

SHAPE = (2, 3, 4, 4)
SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]  # (vitdiff, diffusers)
PREDICTIONS = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCES = {"small": "fixed_small", "large": "fixed_large"}
TIGHT = dict(atol=1e-5, rtol=1e-5)
FLOAT32_DIFFUSERS = dict(atol=1e-3, rtol=1e-3)  # diffusers' float32 cancellation near t = 0, see the docstring


def in_float64(scheduler):
    """The same diffusers scheduler with its ᾱ table (and ᾱ_{-1} = 1) in float64, from its own betas."""
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)  # DDPM's ᾱ_{-1}
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)  # DDIM's ᾱ_{-1} (set_alpha_to_one)
    return scheduler


def random_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample x_t and a model output, both N(0, I) (B, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth function of (x, t), standing in for a trained denoiser; t may be () or (B,)."""
    return torch.tanh(x) * (0.3 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 200)


# ----------------------------------------------------------------------------- schedule and noising


@pytest.mark.parametrize("num_timesteps", [1000, 100])
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_schedules_match_diffusers(ours, theirs, num_timesteps):
    s, ref = NoiseSchedule(num_timesteps, ours), DDPMScheduler(num_timesteps, beta_schedule=theirs)
    torch.testing.assert_close(s.betas, ref.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.alphas, ref.alphas, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_q_sample_and_v_target_match_add_noise_and_get_velocity(ours, theirs):
    s, ref = NoiseSchedule(1000, ours), DDPMScheduler(1000, beta_schedule=theirs)
    x0, noise = random_inputs(0)
    x0, noise = torch.cat([x0, noise]), torch.cat([noise, x0])  # (4, C, H, W)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(s.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), **TIGHT)
    torch.testing.assert_close(s.target(x0, noise, t, "v"), ref.get_velocity(x0, noise, t), **TIGHT)


# ----------------------------------------------------------------------------- single steps


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_ddpm_step_matches_diffusers(ours, theirs, variance, clip, prediction):
    s = NoiseSchedule(1000, ours)
    config = dict(beta_schedule=theirs, variance_type=VARIANCES[variance], clip_sample=clip,
                  prediction_type=PREDICTIONS[prediction])
    ref32, ref64 = DDPMScheduler(1000, **config), in_float64(DDPMScheduler(1000, **config))
    for t in (999, 998, 700, 300, 20, 2, 1, 0):
        x_t, out = random_inputs(t)
        # diffusers draws its noise with torch.randn(shape, generator=, dtype=model_output.dtype) when t > 0
        expected64 = ref64.step(out.double(), t, x_t.double(), generator=torch.Generator().manual_seed(t)).prev_sample
        expected32 = ref32.step(out, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        noise64 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        noise32 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(ddpm_step(s, out, t, x_t, noise64.float(), variance, clip, prediction),
                                   expected64.float(), **TIGHT)
        torch.testing.assert_close(ddpm_step(s, out, t, x_t, noise32, variance, clip, prediction), expected32,
                                   **FLOAT32_DIFFUSERS)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip,eps_from_clipped_x0", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_ddim_step_matches_diffusers(ours, theirs, eta, clip, eps_from_clipped_x0, prediction):
    s = NoiseSchedule(1000, ours)
    for spacing, steps in itertools.product(("leading", "trailing", "linspace"), (7, 50)):
        config = dict(beta_schedule=theirs, clip_sample=clip, prediction_type=PREDICTIONS[prediction],
                      timestep_spacing=spacing)
        ref32, ref64 = DDIMScheduler(1000, **config), in_float64(DDIMScheduler(1000, **config))
        ref32.set_timesteps(steps)
        ref64.set_timesteps(steps)
        for t in ref32.timesteps.tolist():
            # diffusers steps to t - T // steps whatever the spacing (-1 and below mean ᾱ_prev = 1)
            t_prev = max(t - 1000 // steps, -1)
            x_t, out = random_inputs(t)
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
            kwargs = dict(eta=eta, use_clipped_model_output=eps_from_clipped_x0)
            expected64 = ref64.step(out.double(), t, x_t.double(), variance_noise=noise.double(), **kwargs)
            expected32 = ref32.step(out, t, x_t, variance_noise=noise, **kwargs)
            ours_ = ddim_step(s, out, t, t_prev, x_t, eta, noise, clip, prediction, eps_from_clipped_x0)
            torch.testing.assert_close(ours_, expected64.prev_sample.float(), **TIGHT)
            torch.testing.assert_close(ours_, expected32.prev_sample, **FLOAT32_DIFFUSERS)


# ----------------------------------------------------------------------------- timesteps and whole loops


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_timesteps", [50, 1000, 1001])
def test_timesteps_match_set_timesteps(num_timesteps, spacing):
    ref = DDIMScheduler(num_timesteps, timestep_spacing=spacing)
    for steps in range(1, num_timesteps + 1):
        ref.set_timesteps(steps)
        expected = ref.timesteps
        if len(expected) == steps + 1:
            # diffusers 0.42's "trailing" float arange sometimes overshoots by one element, a timestep of -1
            assert spacing == "trailing" and expected[-1] == -1
            expected = expected[:steps]
        assert torch.equal(timesteps_for(num_timesteps, steps, spacing), expected), (steps, spacing)


def diffusers_loop(scheduler, model, generator: torch.Generator, dtype: torch.dtype, **step_kwargs) -> torch.Tensor:
    """diffusers' DDPMPipeline/DDIMPipeline loop: x_T ~ N(0, I) from the generator, then one step per timestep."""
    x = torch.randn(SHAPE, generator=generator, dtype=dtype)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim_eta1", "ddim_trailing"])
def test_whole_sampling_loops_match_diffusers(sampler):
    s = NoiseSchedule(100, "cosine")
    kind = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    spacing = "trailing" if sampler == "ddim_trailing" else "leading"
    eta = 1.0 if sampler == "ddim_eta1" else 0.0
    config = dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, timestep_spacing=spacing)
    ref32, ref64 = kind(100, **config), in_float64(kind(100, **config))
    step_kwargs = {} if sampler == "ddpm" else dict(eta=eta)
    if sampler != "ddpm":
        ref32.set_timesteps(20)
        ref64.set_timesteps(20)

    def ours(generator, x_T=None):
        if sampler == "ddpm":
            return ddpm_sample(toy_model, s, SHAPE, generator=generator, x_T=x_T, progress=False)
        return ddim_sample(toy_model, s, SHAPE, steps=20, eta=eta, spacing=spacing, generator=generator, x_T=x_T,
                           progress=False)

    # float64 all the way: same noise draws, so the same trajectory up to float32 coefficients
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    expected = diffusers_loop(ref64, toy_model, torch.Generator().manual_seed(0), torch.float64, **step_kwargs)
    torch.testing.assert_close(ours(g, x_T), expected, **TIGHT)
    # float32 from the generator alone: x_T and every step's noise drawn in the same order as diffusers
    expected = diffusers_loop(ref32, toy_model, torch.Generator().manual_seed(0), torch.float32, **step_kwargs)
    torch.testing.assert_close(ours(torch.Generator().manual_seed(0)), expected, **FLOAT32_DIFFUSERS)


# ----------------------------------------------------------------------------- Min-SNR-γ loss weights


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_snr_and_min_snr_weights_match_diffusers_training_utils(ours, theirs, prediction):
    from diffusers.training_utils import compute_snr

    s, ref = NoiseSchedule(1000, ours), in_float64(DDPMScheduler(1000, beta_schedule=theirs))
    # t up to 994: at 999 diffusers' cosine β is capped at 0.999 in float32, so its 1 - β differs by ~1e-5
    t = torch.arange(0, 999, 7)
    snr = compute_snr(ref, t).double()  # compute_snr returns float32
    torch.testing.assert_close(s.snr(t), snr.to(s.snr(t).dtype), rtol=1e-5, atol=0)
    # diffusers' examples/text_to_image/train_text_to_image.py, --snr_gamma: min(SNR, γ) / SNR for ε and
    # min(SNR, γ) / (SNR + 1) for v
    capped = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    expected = capped / snr if prediction == "epsilon" else capped / (snr + 1)
    torch.testing.assert_close(min_snr_weight(snr, 5.0, prediction), expected, rtol=1e-12, atol=0)
