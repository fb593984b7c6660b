"""Flow matching / rectified flow (chapter 08), with the conventions of Stable Diffusion 3.

The path from data to noise is a straight line: x_t = (1 - t) x0 + t ε, t ∈ [0, 1] (t = σ, the noise level),
so its velocity dx_t/dt = ε - x0 is what the model learns to predict. Sampling integrates the ODE
dx/dσ = v(x, σ) from σ = 1 (pure noise) down to σ = 0 (data) with Euler or Heun steps.

A denoiser is `model(x, t, **cond) -> velocity shaped like x`, called with t = 1000·σ (the 0–1000
timestep scale of DiT and diffusers, as SD3 does), so every backbone of the book trains under either
objective unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .diffusion import _randn

Denoiser = Callable[..., torch.Tensor]

SAMPLERS = ("uniform", "logit-normal", "mode")
METHODS = ("euler", "heun")
TIMESTEP_SCALE = 1000.0  # the model sees t = 1000·σ


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _per_sample(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """t as a scalar or (B,) -> broadcastable to x (B, 1, ..., 1)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape (B,)=({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *[1] * (x.ndim - 1))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The straight path x_t = (1 - t)·x0 + t·noise; t scalar or (B,) in [0, 1] (SD3's convention)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path, d x_t / dt = noise - x0 (the same for every t)."""
    return noise - x0


# ----------------------------------------------------------------------------- timestep samplers


def sample_timesteps(n: int, method: str = "uniform", loc: float = 0.0, scale: float = 1.0,
                     mode_scale: float = 1.29, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """n training times t ∈ [0, 1] (float32 (n,)) from the densities of SD3 (Esser et al. 2024, section 3.1).

    "uniform": t ~ U(0, 1). "logit-normal": t = sigmoid(u), u ~ N(loc, scale²), which puts more samples in
    the middle of the path (where the velocity is hardest to predict). "mode": t = 1 - u - s·(cos²(πu/2) - 1 + u),
    u ~ U(0, 1), with s = mode_scale in [-1, 2/(π-2)] (s = 0 is uniform; s > 0 favours the middle).
    """
    _check_positive_int("n", n)
    _check_choice("method", method, SAMPLERS)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    if method == "logit-normal":
        if not scale > 0:
            raise ValueError(f"scale must be > 0 for the logit-normal sampler, got {scale!r}")
        u = _randn((n,), generator, device)  # (n,)
        return torch.sigmoid(loc + scale * u)
    draw_device = generator.device if generator is not None else device
    u = torch.rand((n,), generator=generator, device=draw_device).to(device)
    if method == "uniform":
        return u
    if not -1 <= mode_scale <= 2 / (math.pi - 2):
        raise ValueError(f"mode_scale must lie in [-1, 2/(pi-2) = {2 / (math.pi - 2):.3f}] for a monotone map, "
                         f"got {mode_scale!r}")
    return 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def flow_loss(model: Denoiser, x0: torch.Tensor, timestep_sampler: str | Callable[..., torch.Tensor] = "logit-normal",
              generator: torch.Generator | None = None, **cond) -> torch.Tensor:
    """Rectified-flow loss E_{t, ε} ||model(x_t, 1000·t) - (ε - x0)||², x_t = (1 - t) x0 + t ε.

    timestep_sampler is a `sample_timesteps` method with its default parameters, or a callable
    (n, generator=...) -> t (n,) in [0, 1] (e.g. functools.partial(sample_timesteps, method="logit-normal",
    loc=0.5)). t and ε are drawn with `generator`; cond goes to the model.
    """
    if not isinstance(x0, torch.Tensor) or x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch (B >= 1, ...), got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    b = x0.shape[0]
    if callable(timestep_sampler):
        t = torch.as_tensor(timestep_sampler(b, generator=generator))
    else:
        _check_choice("timestep_sampler", timestep_sampler, SAMPLERS)
        t = sample_timesteps(b, timestep_sampler, generator=generator)
    if t.shape != (b,):
        raise ValueError(f"the timestep sampler must return shape ({b},), got {tuple(t.shape)}")
    t = t.to(device=x0.device, dtype=torch.float32)
    noise = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
    x_t = interpolate(x0, noise, t.to(x0.dtype))
    output = model(x_t, TIMESTEP_SCALE * t, **cond)
    if output.shape != x0.shape:
        raise ValueError(f"model output must have the shape of x0 {tuple(x0.shape)} (a velocity; flow matching "
                         f"has no learned variance), got {tuple(output.shape)}")
    return F.mse_loss(output, velocity_target(x0, noise))


# ----------------------------------------------------------------------------- noise levels for sampling


def shift_sigmas(sigmas: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3's resolution-dependent shift σ -> shift·σ / (1 + (shift - 1)·σ); shift > 1 lingers at high noise."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
        raise ValueError(f"shift must be a finite number > 0 (1: no shift), got {shift!r}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 noise levels from 1 down to 0, evenly spaced before the shift (float32 (steps + 1,))."""
    return _sigmas64(steps, shift).float()


def _sigmas64(steps: int, shift: float) -> torch.Tensor:
    _check_positive_int("steps", steps)
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A 1-D sequence of at least two noise levels in [0, 1], strictly decreasing, ending at 0."""
    sigmas = torch.as_tensor(sigmas)
    if not sigmas.dtype.is_floating_point:
        sigmas = sigmas.double()
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not (torch.all(sigmas[1:] < sigmas[:-1]) and sigmas[-1] == 0 and sigmas[0] <= 1):
        raise ValueError("sigmas must decrease strictly from at most 1 to exactly 0 (e.g. flow.sigmas(steps)), "
                         f"got {sigmas.tolist()[:4]}...{sigmas.tolist()[-2:]}")
    return sigmas


# ----------------------------------------------------------------------------- samplers


def _velocity(model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """The model's velocity at noise level sigma (a 0-d tensor); it is called with t = 1000·σ, (B,)."""
    t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # 1000·σ loses digits in bf16
    t = (TIMESTEP_SCALE * sigma).to(device=x.device, dtype=t_dtype).expand(x.shape[0])  # (B,)
    v = model(x, t, **cond)
    if v.shape != x.shape:
        raise ValueError(f"model output must have the shape of x {tuple(x.shape)} (a velocity), got {tuple(v.shape)}")
    return v


@torch.no_grad()
def sample(model: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor | None = None, steps: int = 50,
           shift: float = 1.0, method: str = "euler", progress: bool = True, **cond) -> torch.Tensor:
    """Integrate dx/dσ = model(x, 1000·σ) from x = noise at σ_0 to σ = 0 and return x (shaped like noise).

    The noise levels are `sigmas` when given (any strictly decreasing sequence ending at 0, e.g. a diffusers
    FlowMatchEulerDiscreteScheduler's `.sigmas`; steps and shift are then unused), else
    `flow.sigmas(steps, shift)`. "euler": x += (σ_{i+1} - σ_i)·v, one model call per step. "heun": the
    trapezoidal correction with a second call at σ_{i+1}, except on a last step to σ = 0, which is Euler
    (as in EDM and diffusers' Heun). cond goes to the model (e.g. y=, or CFG's wrapper around it).
    """
    _check_choice("method", method, METHODS)
    if sigmas is None:
        sigmas = _sigmas64(steps, shift)
    sigmas = _check_sigmas(sigmas)
    # steps in float32 (as diffusers), float64 for float64 samples
    sigmas = sigmas.to(device=noise.device, dtype=torch.float64 if noise.dtype == torch.float64 else torch.float32)
    x = noise
    for i in tqdm(range(len(sigmas) - 1), desc=f"flow ({method})", disable=not progress, leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = sigma_next - sigma  # < 0: towards the data
        v = _velocity(model, x, sigma, cond)
        if method == "euler" or sigma_next == 0:
            x = x + dt * v
        else:
            x_euler = x + dt * v
            v_next = _velocity(model, x_euler, sigma_next, cond)
            x = x + dt * (v + v_next) / 2
    return x
