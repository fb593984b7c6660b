"""vitdiff.flow: the straight path, timestep samplers, sigma schedules, the velocity loss, Euler and Heun."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from vitdiff import flow


def point_mass_velocity(target: torch.Tensor):
    """The exact velocity field when all data is the single point `target`: v(x, σ) = (x - target) / σ."""
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t / 1000).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return (x - target) / sigma
    return model


# ----------------------------------------------------------------------------- the path


def test_interpolate_endpoints_and_velocity():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(flow.interpolate(x0, noise, 0.0), x0)
    torch.testing.assert_close(flow.interpolate(x0, noise, 1.0), noise)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = flow.interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[2], noise[2])
    h = 1e-3  # d x_t / dt is the velocity target, the same at every t
    slope = (flow.interpolate(x0, noise, 0.4 + h) - flow.interpolate(x0, noise, 0.4)) / h
    torch.testing.assert_close(slope, flow.velocity_target(x0, noise), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="shape of x0"):
        flow.interpolate(x0, noise[:2], 0.5)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(B,\)=\(3,\)"):
        flow.interpolate(x0, noise, torch.zeros(2))


# ----------------------------------------------------------------------------- timestep samplers


def test_logit_normal_moments():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_timesteps(200_000, "logit-normal", loc=0.5, scale=0.8, generator=g)
    assert t.shape == (200_000,) and t.dtype == torch.float32 and ((t > 0) & (t < 1)).all()
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - 0.5) < 4 * 0.8 / math.sqrt(200_000)
    assert abs(logit.std().item() - 0.8) < 0.01


def test_uniform_and_mode_samplers():
    t = flow.sample_timesteps(200_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert abs(t.mean().item() - 0.5) < 0.003 and abs(t.var().item() - 1 / 12) < 0.002
    u = flow.sample_timesteps(1000, "uniform", generator=torch.Generator().manual_seed(1))
    mode0 = flow.sample_timesteps(1000, "mode", mode_scale=0.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mode0, 1 - u)  # s = 0: the uniform density (read from t = 1 down)
    m = flow.sample_timesteps(200_000, "mode", mode_scale=1.29, generator=torch.Generator().manual_seed(2))
    assert ((m >= 0) & (m <= 1)).all()
    middle = ((m > 0.25) & (m < 0.75)).float().mean().item()
    assert middle > 0.6  # s > 0 moves samples to the middle of the path (uniform: 0.5)
    # SD3's formula at a few points: t = 1 - u - s (cos²(πu/2) - 1 + u)
    u = torch.tensor([0.0, 0.3, 1.0])
    expected = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    assert torch.allclose(expected, torch.tensor([1.0, 0.7 - 1.29 * (math.cos(0.15 * math.pi) ** 2 - 0.7), 0.0]))


def test_sampler_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        flow.sample_timesteps(4, "cosine")
    with pytest.raises(ValueError, match="n must be a positive int"):
        flow.sample_timesteps(0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        flow.sample_timesteps(4, "logit-normal", scale=0.0)
    with pytest.raises(ValueError, match="mode_scale must lie in"):
        flow.sample_timesteps(4, "mode", mode_scale=2.0)


# ----------------------------------------------------------------------------- sigmas


def test_sigmas_endpoints_monotone_and_shift():
    s = flow.sigmas(10)
    assert s.shape == (11,) and s.dtype == torch.float32 and s[0] == 1 and s[-1] == 0
    torch.testing.assert_close(s, torch.linspace(1, 0, 11))
    shifted = flow.sigmas(10, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:] < shifted[:-1]).all()
    assert (shifted[1:-1] > s[1:-1]).all()  # shift > 1 keeps the noise level high for longer
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    assert flow.shift_sigmas(0.5, 3.0) == pytest.approx(0.75)
    assert flow.shift_sigmas(torch.tensor(0.25), 1.0) == 0.25
    with pytest.raises(ValueError, match="steps must be a positive int"):
        flow.sigmas(0)
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        flow.sigmas(4, shift=0.0)


# ----------------------------------------------------------------------------- the loss


def test_flow_loss_is_zero_for_the_exact_velocity():
    target = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    x0 = target.expand(6, -1, -1, -1)  # every data point is `target`, so the exact velocity is known
    for sampler in ("logit-normal", "uniform", "mode"):
        loss = flow.flow_loss(point_mass_velocity(target), x0, sampler, generator=torch.Generator().manual_seed(0))
        assert loss.item() < 1e-9
    wrong = flow.flow_loss(lambda x, t: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(0))
    assert wrong.item() > 0.1


def test_flow_loss_draws_and_passes_timesteps_on_the_1000_scale():
    seen = {}

    def model(x, t, y=None):
        seen["t"], seen["x"], seen["y"] = t, x, y
        return torch.zeros_like(x)

    x0 = torch.randn(5, 3)
    sampler = functools.partial(flow.sample_timesteps, method="logit-normal", loc=1.0)
    g = torch.Generator().manual_seed(7)
    loss = flow.flow_loss(model, x0, sampler, generator=g, y=torch.arange(5))
    g = torch.Generator().manual_seed(7)
    t = flow.sample_timesteps(5, "logit-normal", loc=1.0, generator=g)
    noise = torch.randn(5, 3, generator=g)
    torch.testing.assert_close(seen["t"], 1000 * t)
    torch.testing.assert_close(seen["x"], flow.interpolate(x0, noise, t))
    assert torch.equal(seen["y"], torch.arange(5))
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())
    with pytest.raises(ValueError, match="timestep_sampler must be one of"):
        flow.flow_loss(model, x0, "cosine")
    with pytest.raises(ValueError, match="must return shape"):
        flow.flow_loss(model, x0, lambda n, generator=None: torch.rand(n + 1))
    with pytest.raises(ValueError, match="no learned variance"):
        flow.flow_loss(lambda x, t: torch.cat([x, x], 1), x0)


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_straight_paths_are_integrated_exactly(method, steps):
    """For one data point the flow's paths are straight lines: any number of steps lands on it exactly."""
    target = torch.randn(2, 1, 4, 4)
    noise = torch.randn(2, 1, 4, 4)
    out = flow.sample(point_mass_velocity(target), noise, steps=steps, method=method, progress=False)
    torch.testing.assert_close(out, target.expand_as(out), atol=1e-5, rtol=0)
    shifted = flow.sample(point_mass_velocity(target), noise, steps=steps, shift=3.0, method=method, progress=False)
    torch.testing.assert_close(shifted, target.expand_as(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_constant_velocity_field(method):
    c, noise = torch.randn(3, 5), torch.randn(3, 5)
    out = flow.sample(lambda x, t: c.expand_as(x), noise, steps=7, method=method, progress=False)
    torch.testing.assert_close(out, noise - c)  # ∫_1^0 c dσ = -c


def convergence_slope(method: str) -> float:
    """Slope of log(error) against log(steps) for dx/dσ = x cos σ from σ = 1 to 0 (x(0) = x(1) e^{-sin 1})."""
    noise = torch.linspace(-2, 2, 5, dtype=torch.float64)
    exact = noise * math.exp(-math.sin(1.0))
    steps = [8, 16, 32, 64]
    errors = [(flow.sample(lambda x, t: x * torch.cos(t / 1000), noise, steps=n, method=method,
                           progress=False) - exact).abs().max().item() for n in steps]
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def test_euler_is_first_order_and_heun_second_order():
    assert convergence_slope("euler") == pytest.approx(-1.0, abs=0.1)
    assert convergence_slope("heun") == pytest.approx(-2.0, abs=0.15)


def test_heun_calls_the_model_twice_per_step_except_the_last():
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    flow.sample(model, torch.zeros(2, 3), steps=4, method="heun", progress=False)
    assert len(calls) == 2 * 4 - 1
    assert calls == pytest.approx([1000, 750, 750, 500, 500, 250, 250])


def test_sample_passes_cond_and_float64_timesteps():
    seen = []

    def model(x, t, y):
        seen.append((t.dtype, t.shape, y))
        return torch.zeros_like(x)

    y = torch.tensor([1, 2])
    flow.sample(model, torch.zeros(2, 3, dtype=torch.float64), steps=2, progress=False, y=y)
    assert all(dtype == torch.float64 and shape == (2,) and labels is y for dtype, shape, labels in seen)
    flow.sample(model, torch.zeros(2, 3), steps=2, progress=False, y=y)
    assert seen[-1][0] == torch.float32


def test_sample_errors():
    noise = torch.zeros(2, 3)
    zero = lambda x, t: torch.zeros_like(x)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        flow.sample(zero, noise, steps=0, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        flow.sample(zero, noise, method="rk4", progress=False)
    for bad in ([1.0, 0.5, 0.6, 0.0], [1.0, 0.5, 0.1], [1.5, 0.5, 0.0], [0.0], [[1.0, 0.0]]):
        with pytest.raises(ValueError, match="sigmas must"):
            flow.sample(zero, noise, sigmas=torch.tensor(bad), progress=False)
    with pytest.raises(ValueError, match="a velocity"):
        flow.sample(lambda x, t: x[:1], noise, steps=2, progress=False)


# ----------------------------------------------------------------------------- diffusers

diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_explicit_sigmas_reproduce_flow_match_euler_discrete_scheduler(shift):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(12)

    def toy(x, t):
        return torch.tanh(x) * (0.5 + t.reshape(-1, *[1] * (x.ndim - 1)) / 1000)

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, theirs = [], []

    def recording(log):
        def model(x, t):
            log.append((x.clone(), t.clone()))
            return toy(x, t)
        return model

    out = flow.sample(recording(ours), noise, sigmas=scheduler.sigmas, progress=False)
    x, model = noise.clone(), recording(theirs)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    assert len(ours) == len(theirs) == 12
    for (x_ours, t_ours), (x_theirs, t_theirs) in zip(ours, theirs):
        assert torch.equal(t_ours, t_theirs) and torch.equal(x_ours, x_theirs)  # the same float32 operations
    assert torch.equal(out, x)
