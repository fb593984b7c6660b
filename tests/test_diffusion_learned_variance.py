"""Samplers with a learned variance (Nichol & Dhariwal 2021, as DiT's learn_sigma): an output with 2C channels."""

from __future__ import annotations

import pytest
import torch

from vitdiff.diffusion import (
    NoiseSchedule,
    classifier_free_guidance,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    split_learned_variance,
)

SHAPE = (2, 3, 4, 4)


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t, a prediction and noise, each N(0, I) shaped (B, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(SHAPE, generator=g) for _ in range(3))


def test_split_learned_variance():
    x = torch.randn(SHAPE)
    out = torch.randn(2, 6, 4, 4)
    pred, v = split_learned_variance(out, x)
    assert torch.equal(pred, out[:, :3]) and torch.equal(v, out[:, 3:])
    same, none = split_learned_variance(x, x)
    assert same is x and none is None
    with pytest.raises(ValueError, match="twice its channels"):
        split_learned_variance(torch.randn(2, 5, 4, 4), x)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_plus_one_is_beta_and_minus_one_the_posterior_variance(schedule):
    s = NoiseSchedule(1000, schedule)
    for t in (999, 500, 10, 1):
        x_t, eps, noise = inputs(t)
        ones = torch.ones_like(eps)
        large = ddpm_step(s, eps, t, x_t, noise, variance="large")
        small = ddpm_step(s, eps, t, x_t, noise, variance="small")
        torch.testing.assert_close(ddpm_step(s, torch.cat([eps, ones], 1), t, x_t, noise), large)
        torch.testing.assert_close(ddpm_step(s, torch.cat([eps, -ones], 1), t, x_t, noise), small)
        # v = 0: the geometric mean of the two variances
        mean = ddpm_step(s, eps, t, x_t, torch.zeros_like(noise))
        sigma = (s.betas[t] * s.posterior_variance[t]) ** 0.25  # variance sqrt(β_t β̃_t)
        torch.testing.assert_close(ddpm_step(s, torch.cat([eps, 0 * ones], 1), t, x_t, noise), mean + sigma * noise)
        # `variance` is ignored when the model gives its own
        torch.testing.assert_close(ddpm_step(s, torch.cat([eps, ones], 1), t, x_t, noise, variance="small"), large)
    x_t, eps, _ = inputs(0)
    torch.testing.assert_close(ddpm_step(s, torch.cat([eps, eps], 1), 0, x_t, None), ddpm_step(s, eps, 0, x_t, None))


def test_ddim_uses_only_the_prediction_half():
    s = NoiseSchedule(1000)
    x_t, eps, noise = inputs(3)
    v = torch.randn_like(eps)
    for eta in (0.0, 1.0):
        torch.testing.assert_close(ddim_step(s, torch.cat([eps, v], 1), 600, 400, x_t, eta, noise),
                                   ddim_step(s, eps, 600, 400, x_t, eta, noise))


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * (0.3 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 2000)


def test_samplers_accept_a_learned_variance_output():
    s = NoiseSchedule(50)

    def learned(value: float):
        return lambda x, t: torch.cat([toy(x, t), torch.full_like(x, value)], 1)

    def run(model, sampler, **kwargs):
        return sampler(model, s, SHAPE, generator=torch.Generator().manual_seed(0), progress=False, **kwargs)

    torch.testing.assert_close(run(learned(1.0), ddpm_sample), run(toy, ddpm_sample, variance="large"))
    torch.testing.assert_close(run(learned(-1.0), ddpm_sample), run(toy, ddpm_sample, variance="small"))
    torch.testing.assert_close(run(learned(0.3), ddim_sample, steps=10), run(toy, ddim_sample, steps=10))
    with pytest.raises(ValueError, match="twice its channels"):
        run(lambda x, t: x[:, :2], ddpm_sample)


def test_guidance_mixes_the_prediction_and_keeps_the_conditional_variance():
    def model(x, t, y):
        scale = y.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([x * scale, torch.tanh(x) - scale], 1)  # (B, 2C, H, W)

    x = torch.randn(SHAPE)
    y, null = torch.tensor([2, 3]), torch.tensor([0])
    out = classifier_free_guidance(model, 4.0, {"y": null})(x, torch.tensor(5), y=y)
    cond, uncond = model(x, None, y), model(x, None, null.expand(2))
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])


diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency")


@pytest.mark.parametrize("schedule,beta_schedule", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_ddpm_step_matches_diffusers_learned_range(schedule, beta_schedule):
    s = NoiseSchedule(1000, schedule)
    ref = diffusers.DDPMScheduler(1000, beta_schedule=beta_schedule, variance_type="learned_range")
    ref64 = diffusers.DDPMScheduler(1000, beta_schedule=beta_schedule, variance_type="learned_range")
    ref64.alphas_cumprod = torch.cumprod(1 - ref64.betas.double(), 0)  # diffusers' own step, in float64
    ref64.one = torch.tensor(1.0, dtype=torch.float64)
    for t in (999, 700, 300, 20, 2, 1, 0):
        x_t, eps, _ = inputs(t)
        v = torch.rand(SHAPE, generator=torch.Generator().manual_seed(100 + t)) * 2 - 1  # v in [-1, 1]
        out = torch.cat([eps, v], 1)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))  # what diffusers draws at t > 0
        expected = ref.step(out, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        expected64 = ref64.step(out.double(), t, x_t.double(),
                                generator=torch.Generator().manual_seed(t)).prev_sample
        noise64 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        torch.testing.assert_close(ddpm_step(s, out, t, x_t, noise64.float()), expected64.float(), atol=1e-5, rtol=1e-5)
        # diffusers as shipped: its float32 ᾱ table loses digits near t = 0
        torch.testing.assert_close(ddpm_step(s, out, t, x_t, noise), expected, atol=1e-3, rtol=1e-3)
