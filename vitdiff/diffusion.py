"""Gaussian diffusion (chapter 04): noise schedules, the forward process, the denoising loss, DDPM and DDIM
samplers with inpainting and image-to-image, and classifier-free guidance.

Notation (Ho et al. 2020, Song et al. 2021): β_t is the variance of the noise added at step t, α_t = 1 - β_t,
ᾱ_t = α_0 α_1 … α_t. Timesteps are 0-indexed, t = 0 … T-1 as in diffusers, and ᾱ_{-1} = 1 means "clean".
Shapes: x (B, ...) a batch of any tensors (images (B, C, H, W), latents, ...), t (B,) integer timesteps.

A denoiser is any callable `model(x, t, **cond) -> tensor shaped like x`; `prediction` says what it predicts:
"epsilon" the noise ε, "x0" the clean sample, "v" the velocity v = sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x0.
The samplers work on the device of the schedule: call `schedule.to(device)` once, like the model.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Denoiser = Callable[..., torch.Tensor]

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "x0", "v")
VARIANCES = ("small", "large")
SPACINGS = ("leading", "trailing", "linspace")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_eta(eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")


def _check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) noise drawn with `generator` on the generator's device, then moved to `device` (as diffusers)."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


# ----------------------------------------------------------------------------- noise schedules


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_t evenly spaced from beta_start to beta_end (Ho et al. 2020), float64 (T,)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule ᾱ(u) ∝ cos²((u + s)/(1 + s) · π/2) (Nichol & Dhariwal 2021), float64 (T,)."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    # β_t = 1 - ᾱ((t+1)/T) / ᾱ(t/T), clipped so the last steps do not destroy everything at once
    betas = [min(1 - alpha_bar((t + 1) / num_timesteps) / alpha_bar(t / num_timesteps), max_beta)
             for t in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


class NoiseSchedule(nn.Module):
    """The forward process q(x_t | x0) = N(sqrt(ᾱ_t) x0, (1-ᾱ_t) I), its posterior and the ε/x0/v conversions.

    All tables are computed in float64 and stored as float32 buffers (T,), so `.to(device)` moves them.
    schedule="linear" equals diffusers' "linear", "cosine" its "squaredcos_cap_v2" (beta_start/end unused).

    shift=s > 1 moves every timestep towards noise by dividing its signal-to-noise ratio by s²:
    SNR'(t) = SNR(t) / s², i.e. ᾱ'_t = ᾱ_t / (ᾱ_t + s² (1 - ᾱ_t)). A schedule tuned for one resolution
    leaves too little noise at a higher one, since averaging over more pixels recovers the layout early;
    "simple diffusion" (Hoogeboom et al. 2023) shifts by s = resolution / base resolution, and SD3's
    timestep shift for flow matching is the same map (σ' = sσ / (1 + (s - 1)σ)). shift=(s0, s1)
    interpolates the shift in log space from s0 at t = 0 to s1 at t = T - 1, in the spirit of simple
    diffusion's interpolated schedules: (1, 4) leaves the low-noise end as it was and shifts the noisy end.
    """

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, shift: float | tuple[float, float] = 1.0):
        super().__init__()
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        _check_choice("schedule", schedule, SCHEDULES)
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
        shifts = tuple(shift) if isinstance(shift, (tuple, list)) else (shift, shift)  # (at t = 0, at t = T - 1)
        if len(shifts) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")
                                   for v in shifts):
            raise ValueError(f"shift must be a positive finite number or a pair of them, got {shift!r}")
        self.num_timesteps = num_timesteps
        self.config = dict(num_timesteps=num_timesteps, schedule=schedule, beta_start=beta_start,
                           beta_end=beta_end)
        if shifts != (1, 1):
            self.config["shift"] = float(shifts[0]) if shifts[0] == shifts[1] else tuple(map(float, shifts))

        betas = linear_betas(num_timesteps, beta_start, beta_end) if schedule == "linear" \
            else cosine_betas(num_timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # ᾱ_t
        if shifts != (1, 1):  # SNR / s_t²: ᾱ/(1-ᾱ) -> ᾱ/(s_t² (1-ᾱ)), then β_t = 1 - ᾱ_t / ᾱ_{t-1} again
            u = torch.linspace(0, 1, num_timesteps, dtype=torch.float64)
            s_t = torch.exp((1 - u) * math.log(shifts[0]) + u * math.log(shifts[1]))  # (T,), log-linear in t
            alphas_cumprod = alphas_cumprod / (alphas_cumprod + s_t**2 * (1 - alphas_cumprod))
            betas = 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
            if not (betas > 0).all():
                raise ValueError(f"shift={shift!r} makes the noise level fall somewhere as t grows")
        alphas = 1 - betas
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])  # ᾱ_{t-1}
        # posterior q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, β̃_t)   (Ho et al. eq. 6-7)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # β̃_t, 0 at t = 0
        tables = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            posterior_variance=posterior_variance,
            # log β̃_t with β̃_0 = 0 replaced by β̃_1, so the log stays finite
            posterior_log_variance_clipped=torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        )
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)
        # ᾱ in float64 for the scalar coefficients of a DDIM jump: 1 - ᾱ and 1 - ᾱ_t/ᾱ_prev cancel in float32
        self.alphas_cumprod_float64 = alphas_cumprod.tolist()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    def check_timesteps(self, t: int | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Validate timesteps (an int, or an integer tensor () or (B,)) and return them as an int64 tensor."""
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise TypeError(f"t must be an int or an integer tensor of timesteps, got {type(t).__name__}")
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
        if t.ndim > 1 or (t.ndim == 1 and batch_size is not None and t.shape[0] not in (1, batch_size)):
            raise ValueError(f"t must have shape () or ({batch_size},), got {tuple(t.shape)}")
        if t.numel() > 0 and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(f"t must lie in [0, {self.num_timesteps - 1}], "
                             f"got values in [{int(t.min())}, {int(t.max())}]")
        return t.long()

    def _at(self, table: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to (B, 1, ..., 1) in x's dtype and device, to broadcast against x (B, ...)."""
        t = self.check_timesteps(t, x.shape[0])
        values = table[t.to(table.device)].to(device=x.device, dtype=x.dtype)
        return values.reshape(-1, *([1] * (x.ndim - 1)))

    def _scales(self, t: int | torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1-ᾱ_t)), each (B, 1, ..., 1): the signal and noise scales of x_t."""
        return self._at(self.sqrt_alphas_cumprod, t, x), self._at(self.sqrt_one_minus_alphas_cumprod, t, x)

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise clean data to step t in one jump: x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε, ε ~ N(0, I)."""
        if noise is None:
            noise = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
        _check_same_shape("noise", noise, "x0", x0)
        a, s = self._scales(t, x0)
        return a * x0 + s * noise

    def snr(self, t: int | torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t), shaped like t."""
        t = self.check_timesteps(t).to(self.betas.device)
        return (self.sqrt_alphas_cumprod[t] / self.sqrt_one_minus_alphas_cumprod[t]) ** 2

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x0): (mean (B, ...), variance β̃_t (B, 1, ...), clipped log-variance (B, 1, ...))."""
        _check_same_shape("x0", x0, "x_t", x_t)
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return (mean, self._at(self.posterior_variance, t, x_t),
                self._at(self.posterior_log_variance_clipped, t, x_t))

    def predict_x0(self, x_t: torch.Tensor, t: int | torch.Tensor, model_output: torch.Tensor,
                   prediction: str = "epsilon") -> torch.Tensor:
        """The clean sample x0 implied by a model output (ε, x0 or v) at x_t."""
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_same_shape("model_output", model_output, "x_t", x_t)
        a, s = self._scales(t, x_t)
        if prediction == "epsilon":
            return (x_t - s * model_output) / a  # x0 = (x_t - sqrt(1-ᾱ) ε) / sqrt(ᾱ)
        if prediction == "v":
            return a * x_t - s * model_output  # x0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v
        return model_output

    def predict_eps(self, x_t: torch.Tensor, t: int | torch.Tensor, model_output: torch.Tensor,
                    prediction: str = "epsilon") -> torch.Tensor:
        """The noise ε implied by a model output (ε, x0 or v) at x_t."""
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_same_shape("model_output", model_output, "x_t", x_t)
        a, s = self._scales(t, x_t)
        if prediction == "x0":
            return (x_t - a * model_output) / s  # ε = (x_t - sqrt(ᾱ) x0) / sqrt(1-ᾱ)
        if prediction == "v":
            return a * model_output + s * x_t  # ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t
        return model_output

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor,
               prediction: str = "epsilon") -> torch.Tensor:
        """What a denoiser should output for x_t = q_sample(x0, t, noise): ε, x0 or v."""
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_same_shape("noise", noise, "x0", x0)
        if prediction == "epsilon":
            return noise
        if prediction == "x0":
            return x0
        a, s = self._scales(t, x0)
        return a * noise - s * x0  # v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0


# ----------------------------------------------------------------------------- training objective


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str = "epsilon") -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), shaped like snr: whatever the prediction, weight x its MSE
    = min(SNR, γ) ||x0 - x̂0||², since ||ε - ε̂||² = SNR ||x0 - x̂0||² and ||v - v̂||² = (1 + SNR) ||x0 - x̂0||².
    So each t is weighted as the x0 error times SNR, capped at γ: the nearly clean steps stop dominating."""
    _check_choice("prediction", prediction, PREDICTIONS)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf:
        raise ValueError(f"gamma must be a finite positive number (Hang et al. use 5), got {gamma!r}")
    if prediction == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # min(SNR, γ) / SNR, = 1 where SNR = 0
    capped = snr.clamp(max=gamma)  # min(SNR, γ)
    return capped / (snr + 1) if prediction == "v" else capped


def diffusion_loss(model: Denoiser, schedule: NoiseSchedule, x0: torch.Tensor, prediction: str = "epsilon",
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   snr_gamma: float | None = None, input_perturbation: float | None = None,
                   **cond) -> torch.Tensor:
    """Denoising loss: E_{t, ε} ||model(x_t, t) - target||², t ~ U{0..T-1} and ε ~ N(0, I) unless given.
    With snr_gamma, each sample's squared error is weighted by `min_snr_weight` (Min-SNR-γ).
    With input_perturbation γ, the model sees x_t built from ε + γ ξ (ξ ~ N(0, I) fresh) while the target keeps ε
    (DDPM-IP, Ning et al. 2023): training inputs then look a little like the sampler's own imperfect x_t, which
    reduces the exposure bias that builds up over many sampling steps."""
    _check_choice("prediction", prediction, PREDICTIONS)
    if input_perturbation is not None and (isinstance(input_perturbation, bool)
                                           or not isinstance(input_perturbation, (int, float))
                                           or not 0 <= input_perturbation < math.inf):
        raise ValueError(f"input_perturbation must be a finite number >= 0 (DDPM-IP uses 0.1), or None, "
                         f"got {input_perturbation!r}")
    if snr_gamma is not None:
        min_snr_weight(schedule.snr(0), snr_gamma, prediction)  # checks gamma before any work
    if not isinstance(x0, torch.Tensor) or x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch (B >= 1, ...), got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    b = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (b,), device=x0.device)
    t = schedule.check_timesteps(t, b).to(x0.device).expand(b)  # (B,)
    if noise is None:
        noise = torch.randn_like(x0)
    model_noise = noise if not input_perturbation else noise + input_perturbation * torch.randn_like(x0)
    x_t = schedule.q_sample(x0, t, model_noise)
    output = model(x_t, t, **cond)
    _check_same_shape("model output", output, "x0", x0)
    if snr_gamma is None:
        return F.mse_loss(output, schedule.target(x0, noise, t, prediction))
    error = (output - schedule.target(x0, noise, t, prediction)).pow(2).reshape(b, -1).mean(1)  # (B,) per sample
    return (min_snr_weight(schedule.snr(t), snr_gamma, prediction) * error).mean()


# ----------------------------------------------------------------------------- single reverse steps


def _check_step(schedule: NoiseSchedule, t: int, name: str = "t", low: int = 0) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or not low <= t < schedule.num_timesteps:
        raise ValueError(f"{name} must be an int in [{low}, {schedule.num_timesteps - 1}], got {t!r}")


def split_learned_variance(model_output: torch.Tensor, x: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, v) from a model output shaped like x (v = None) or with 2C channels (B, 2C, ...) = [pred; v].

    v is the learned variance interpolation of Nichol & Dhariwal (2021) that DiT outputs with learn_sigma:
    log σ_t² = frac · log β_t + (1 - frac) · log β̃_t with frac = (v + 1) / 2, so v = 1 gives β_t, v = -1 β̃_t.
    """
    if x.ndim >= 2 and model_output.ndim == x.ndim and model_output.shape[0] == x.shape[0] \
            and model_output.shape[1] == 2 * x.shape[1] and model_output.shape[2:] == x.shape[2:]:
        prediction, v = model_output.chunk(2, dim=1)  # (B, C, ...) each
        return prediction, v
    if model_output.shape != x.shape:
        raise ValueError(f"model output must have the shape of x {tuple(x.shape)}, or twice its channels "
                         f"(prediction and learned variance), got {tuple(model_output.shape)}")
    return model_output, None


def ddpm_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, x_t: torch.Tensor,
              noise: torch.Tensor | None, variance: str = "small", clip_x0: bool = True,
              prediction: str = "epsilon") -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} ~ N(μ̃(x̂0, x_t), σ_t²) (Ho et al. Algorithm 2, written via x̂0).

    variance "small" uses σ_t² = β̃_t (posterior variance), "large" σ_t² = β_t. clip_x0 clamps x̂0 to [-1, 1].
    A model output with 2C channels carries its own variance (`split_learned_variance`), which then
    replaces `variance`. noise ~ N(0, I) shaped like x_t is needed for t > 0; at t = 0 the step returns the mean.
    """
    _check_step(schedule, t)
    _check_choice("variance", variance, VARIANCES)
    model_output, v = split_learned_variance(model_output, x_t)
    x0 = schedule.predict_x0(x_t, t, model_output, prediction)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean, posterior_variance, posterior_log_variance = schedule.q_posterior(x0, x_t, t)  # μ̃, β̃_t, log β̃_t
    if t == 0:
        return mean
    if noise is None:
        raise ValueError(f"noise is required for a DDPM step at t={t} > 0, got None")
    _check_same_shape("noise", noise, "x_t", x_t)
    if v is not None:  # learned range: interpolate log β̃_t (v = -1) and log β_t (v = 1)
        frac = (v + 1) / 2
        log_var = frac * schedule._at(schedule.betas, t, x_t).log() + (1 - frac) * posterior_log_variance
        return mean + (0.5 * log_var).exp() * noise
    var = posterior_variance if variance == "small" else schedule._at(schedule.betas, t, x_t)
    return mean + var.sqrt() * noise


def ddim_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
              eta: float = 0.0, noise: torch.Tensor | None = None, clip_x0: bool = True,
              prediction: str = "epsilon", eps_from_clipped_x0: bool = False) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021 eq. 12); t_prev = -1 means ᾱ_prev = 1 (the end).

    x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z, σ = eta · sqrt((1-ᾱ_prev)/(1-ᾱ_t) (1 - ᾱ_t/ᾱ_prev)).
    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is the DDPM step (with clip_x0, only when
    eps_from_clipped_x0=True). By default ε̂ comes from the unclipped x̂0, as in diffusers
    (use_clipped_model_output=False; kept as the default for parity), so a clipped x̂0 and that ε̂ no longer add
    up to x_t and every clipped step leaves the trajectory, by sqrt(ᾱ_t) (clip(x̂0) - x̂0) however short the step.
    eps_from_clipped_x0=True recomputes ε̂ = (x_t - sqrt(ᾱ_t) x̂0) / sqrt(1 - ᾱ_t) from the clipped x̂0 (diffusers'
    use_clipped_model_output=True), the pair that the DDPM posterior mean uses; chapter 04 measures the
    difference. Of a 2C-channel output only the prediction half is used.
    """
    _check_step(schedule, t)
    _check_step(schedule, t_prev, "t_prev", low=-1)
    model_output, _ = split_learned_variance(model_output, x_t)
    if t_prev >= t:
        raise ValueError(f"t_prev must be smaller than t={t}, got {t_prev}")
    _check_eta(eta)
    x0 = schedule.predict_x0(x_t, t, model_output, prediction)
    eps = schedule.predict_eps(x_t, t, model_output, prediction)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        if eps_from_clipped_x0:  # the ε that the clipped x̂0 implies at x_t
            eps = schedule.predict_eps(x_t, t, x0, "x0")
    a_t = schedule.alphas_cumprod_float64[t]
    a_prev = schedule.alphas_cumprod_float64[t_prev] if t_prev >= 0 else 1.0
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps  # max: eta > 1
    if eta > 0:
        if noise is None:
            raise ValueError(f"noise is required for a DDIM step with eta={eta} > 0, got None")
        _check_same_shape("noise", noise, "x_t", x_t)
        x_prev = x_prev + sigma * noise
    return x_prev


def timesteps_for(num_timesteps: int, steps: int, spacing: str = "leading") -> torch.Tensor:
    """A descending sub-sequence of `steps` timesteps of 0..T-1, as diffusers' `timestep_spacing` (int64 (steps,)).

    "leading": 0, k, 2k, … with k = T // steps (ends at 0); "trailing": round(T - i·T/steps) - 1 (starts at
    T-1); "linspace": round(linspace(0, T-1, steps)) (both ends). Computed with NumPy's float arange/linspace
    like diffusers, so that ties at .5 round the same way.
    """
    _check_choice("spacing", spacing, SPACINGS)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an int in [1, num_timesteps={num_timesteps}], got {steps!r}")
    if spacing == "leading":
        ts = (np.arange(steps) * (num_timesteps // steps))[::-1]
    elif spacing == "trailing":  # the float arange can overshoot by one element: keep the first `steps`
        ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps))[:steps] - 1
    else:
        ts = np.linspace(0, num_timesteps - 1, steps).round()[::-1]
    return torch.from_numpy(ts.astype(np.int64))


# ----------------------------------------------------------------------------- samplers


def _initial_noise(schedule: NoiseSchedule, shape: tuple[int, ...], x_T: torch.Tensor | None,
                   start_t: int | None, generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """The starting point of the reverse process: (x at step start_t, start_t); pure noise at T-1 by default."""
    device = schedule.betas.device
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"shape must be a tuple of positive ints (B, ...), got {shape!r}")
    if x_T is None:
        if start_t is not None:
            raise ValueError(f"start_t={start_t} needs x_T, the image already noised to step start_t")
        return _randn(tuple(shape), generator, device), schedule.num_timesteps - 1
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T must have the sample shape {tuple(shape)}, got {tuple(x_T.shape)}")
    if x_T.device != device:
        raise ValueError(f"x_T is on {x_T.device} but the schedule is on {device}; the samplers run on the "
                         f"schedule's device: call schedule.to({str(x_T.device)!r}) (and the model), "
                         "or move x_T")
    if start_t is None:
        return x_T.to(device), schedule.num_timesteps - 1
    _check_step(schedule, start_t, "start_t")
    return x_T.to(device), start_t


def _check_model_device(model: Denoiser, device: torch.device) -> None:
    """A model (nn.Module with parameters) must live on the schedule's device, where the samplers run."""
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if param is not None and param.device != device:
        raise ValueError(f"the model is on {param.device} but the schedule is on {device}; the samplers run on "
                         f"the schedule's device: move both with .to(device)")


def _prepare_known(known: torch.Tensor | None, known_mask: torch.Tensor | None, x: torch.Tensor
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Inpainting inputs broadcast to x's shape: (known image in x0 space, bool mask with True = known)."""
    if (known is None) != (known_mask is None):
        raise ValueError("known and known_mask go together: pass both to inpaint, or neither")
    if known is None:
        return None, None
    try:
        known = known.to(device=x.device, dtype=x.dtype).expand(x.shape)
        mask = known_mask.to(x.device).expand(x.shape)
    except RuntimeError:
        raise ValueError(f"known {tuple(known.shape)} and known_mask {tuple(known_mask.shape)} must broadcast "
                         f"to the sample shape {tuple(x.shape)}") from None
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("known_mask must be boolean or hold only 0 and 1 (1 = known pixel)")
        mask = mask.bool()
    return known, mask


def _paste_known(schedule: NoiseSchedule, x: torch.Tensor, known: torch.Tensor | None, mask: torch.Tensor | None,
                 t_prev: int, generator: torch.Generator | None) -> torch.Tensor:
    """Inpainting: replace the known region of x_{t_prev} by q_sample(known, t_prev) (by `known` at the end)."""
    if known is None:
        return x
    known_t = known if t_prev < 0 else schedule.q_sample(known, t_prev, generator=generator)
    return torch.where(mask, known_t, x)


def _denoise(model: Denoiser, x: torch.Tensor, t: int, cond: dict) -> torch.Tensor:
    """Call the denoiser at the integer step t, broadcast to an int64 (B,) tensor, and check its output."""
    output = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), **cond)
    split_learned_variance(output, x)  # shaped like x, or [prediction; learned variance]
    return output


@torch.no_grad()
def ddpm_sample(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], *,
                generator: torch.Generator | None = None, variance: str = "small", clip_x0: bool = True,
                prediction: str = "epsilon", x_T: torch.Tensor | None = None, progress: bool = True,
                known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                start_t: int | None = None, **cond) -> torch.Tensor:
    """Ancestral DDPM sampling: x_{T-1} ~ N(0, I), then T `ddpm_step`s down to x0 (all noise from `generator`).

    known/known_mask inpaint (the result equals `known` where the mask is 1); x_T with start_t starts from an
    image already noised to step start_t (image-to-image, see `img2img_start`). cond goes to the model.
    """
    _check_choice("variance", variance, VARIANCES)
    _check_choice("prediction", prediction, PREDICTIONS)
    x, start = _initial_noise(schedule, shape, x_T, start_t, generator)
    _check_model_device(model, x.device)
    known, mask = _prepare_known(known, known_mask, x)
    for t in tqdm(range(start, -1, -1), desc="DDPM", disable=not progress, leave=False):
        output = _denoise(model, x, t, cond)
        noise = _randn(tuple(x.shape), generator, x.device, x.dtype) if t > 0 else None
        x = ddpm_step(schedule, output, t, x, noise, variance, clip_x0, prediction)
        x = _paste_known(schedule, x, known, mask, t - 1, generator)
    return x


@torch.no_grad()
def ddim_sample(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], *, steps: int = 50,
                eta: float = 0.0, spacing: str = "leading", generator: torch.Generator | None = None,
                clip_x0: bool = True, prediction: str = "epsilon", x_T: torch.Tensor | None = None,
                progress: bool = True, known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                start_t: int | None = None, eps_from_clipped_x0: bool = False, **cond) -> torch.Tensor:
    """DDIM sampling on `steps` timesteps (`timesteps_for(T, steps, spacing)`); eta = 0 is deterministic.

    eps_from_clipped_x0 re-derives ε̂ from the clipped x̂0 at every step (see `ddim_step`; it matters only with
    clip_x0, and is off by default for parity with diffusers).

    Each step goes from a timestep to the next one of the sub-sequence (the last one to ᾱ = 1). diffusers'
    DDIMScheduler instead always steps to t - T // steps; the two agree whenever T is divisible by `steps`
    with "leading"/"trailing" spacing, and for "linspace" or a non-divisible T this sampler is the
    consistent one (it never skips or repeats a timestep). With start_t
    the sequence is start_t followed by the sub-sequence's timesteps below it. Extras as in `ddpm_sample`.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    _check_eta(eta)
    x, start = _initial_noise(schedule, shape, x_T, start_t, generator)
    _check_model_device(model, x.device)
    known, mask = _prepare_known(known, known_mask, x)
    ts = timesteps_for(schedule.num_timesteps, steps, spacing).tolist()
    if start_t is not None:
        ts = [start] + [t for t in ts if t < start]
    for t, t_prev in tqdm(list(zip(ts, ts[1:] + [-1])), desc="DDIM", disable=not progress, leave=False):
        output = _denoise(model, x, t, cond)
        noise = _randn(tuple(x.shape), generator, x.device, x.dtype) if eta > 0 else None
        x = ddim_step(schedule, output, t, t_prev, x, eta, noise, clip_x0, prediction, eps_from_clipped_x0)
        x = _paste_known(schedule, x, known, mask, t_prev, generator)
    return x


def img2img_start(schedule: NoiseSchedule, x0: torch.Tensor, strength: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Image-to-image (SDEdit): noise x0 to start_t = round(strength · (T-1)); returns (x_t, start_t).

    Pass them to a sampler as `x_T=x_t, start_t=start_t`; strength 1 starts from (almost) pure noise,
    small strengths keep more of x0.
    """
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must lie in [0, 1], got {strength!r}")
    start_t = round(strength * (schedule.num_timesteps - 1))
    return schedule.q_sample(x0, start_t, generator=generator), start_t


# ----------------------------------------------------------------------------- classifier-free guidance


def classifier_free_guidance(model: Denoiser, scale: float, uncond: dict[str, torch.Tensor]) -> Denoiser:
    """Wrap a conditional denoiser: out_u + scale · (out_c - out_u), both halves in one batched call.

    uncond holds the null condition for every conditioning keyword (e.g. {"y": null labels} or
    {"context": ..., "context_mask": ...}), batch 1 or B; a negative prompt is passed as uncond.
    scale 1 gives the conditional prediction, scale 0 the unconditional one. A keyword passed as None
    counts as not passed (as the models read it), on either side. For an output with a learned variance
    (2C channels, e.g. a DiT with learn_sigma) only the prediction is guided; the variance is the conditional one.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (1: conditional, 0: unconditional), got {scale!r}")
    if not isinstance(uncond, dict) or not any(u is not None for u in uncond.values()):
        raise ValueError(f"uncond must be a non-empty dict of null condition tensors, got {uncond!r}")
    uncond = {key: u for key, u in uncond.items() if u is not None}
    for key, u in uncond.items():
        if not isinstance(u, torch.Tensor) or u.ndim == 0:
            raise TypeError(f"uncond[{key!r}] must be a tensor with a batch dimension, got {u!r}")

    def guided(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        cond = {key: c for key, c in cond.items() if c is not None}
        if set(cond) != set(uncond):
            only_u, only_c = sorted(set(uncond) - set(cond)), sorted(set(cond) - set(uncond))
            raise ValueError(f"the condition keywords must match uncond's {sorted(uncond)}: "
                             + (f"{only_u} are in uncond but were not passed (or passed as None); " if only_u else "")
                             + (f"{only_c} were passed but are not in uncond; " if only_c else "")
                             + "give both halves the same keywords (e.g. an all-True context_mask)")
        for key, c in cond.items():
            if not isinstance(c, torch.Tensor) or c.ndim == 0:
                raise TypeError(f"the condition {key} must be a tensor with a batch dimension, got {c!r}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(b)  # (B,)
        both = {}
        for key, c in cond.items():
            u = uncond[key].to(c.device)
            if u.shape[0] == 1 and b > 1:
                u = u.expand(b, *u.shape[1:])
            if u.shape != c.shape:
                raise ValueError(f"uncond[{key!r}] must have the shape of the condition {tuple(c.shape)} "
                                 f"(or batch size 1), got {tuple(uncond[key].shape)}")
            both[key] = torch.cat([c, u])  # (2B, ...)
        out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        if out_c.shape != x.shape and split_learned_variance(out_c, x)[1] is not None:
            c = x.shape[1]  # learned variance (DiT): guide the prediction, keep the conditional variance
            return torch.cat([out_u[:, :c] + scale * (out_c[:, :c] - out_u[:, :c]), out_c[:, c:]], dim=1)
        return out_u + scale * (out_c - out_u)

    return guided


# ----------------------------------------------------------------------------- expert denoisers


def matching_timesteps(schedule: NoiseSchedule, reference: NoiseSchedule) -> torch.Tensor:
    """For each timestep of `reference`, the timestep of `schedule` with the nearest ᾱ (int64 (T_ref,)).

    Two denoisers trained on different schedules meet at equal ᾱ: x_t, and the ε, x0 and v targets, depend
    only on ᾱ_t, so a timestep of one schedule is translated to the other through this table."""
    for name, value in (("schedule", schedule), ("reference", reference)):
        if not isinstance(value, NoiseSchedule):
            raise TypeError(f"{name} must be a NoiseSchedule, got {type(value).__name__}")
    a = torch.tensor(schedule.alphas_cumprod_float64, dtype=torch.float64)  # (T,)
    a_ref = torch.tensor(reference.alphas_cumprod_float64, dtype=torch.float64)  # (T_ref,)
    return (a[None, :] - a_ref[:, None]).abs().argmin(dim=1)


class ExpertDenoisers(nn.Module):
    """Two denoisers split by noise level (eDiff-I's ensemble of expert denoisers, Balaji et al. 2022).

    Called like a denoiser on `schedule`'s timesteps t (B,): where ᾱ_t < switch_abar (the noisy part) it runs
    `high`, trained on `schedule`; elsewhere `low`, trained on `low_schedule`, at its timestep with the nearest ᾱ
    (`matching_timesteps`). Both must predict the same target (ε, x0 or v, which depend on ᾱ alone). Sample
    with `schedule`; a sampler calls one expert per step, a mixed batch of timesteps is split between them.
    """

    def __init__(self, high: nn.Module, low: nn.Module, schedule: NoiseSchedule, low_schedule: NoiseSchedule,
                 switch_abar: float = 0.5):
        super().__init__()
        if isinstance(switch_abar, bool) or not isinstance(switch_abar, (int, float)) or not 0 < switch_abar < 1:
            raise ValueError(f"switch_abar must lie in (0, 1) (0.5: SNR = 1), got {switch_abar!r}")
        self.high, self.low, self.switch_abar = high, low, float(switch_abar)
        device = schedule.alphas_cumprod.device
        self.register_buffer("abar", schedule.alphas_cumprod.detach().clone(), persistent=False)  # (T,)
        self.register_buffer("low_t", matching_timesteps(low_schedule, schedule).to(device), persistent=False)  # (T,)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).long().expand(b)  # (B,)
        low_t = self.low_t.to(x.device)[t]  # (B,) the low expert's own timesteps (buffers may lag the experts' device)
        use_low = self.abar.to(x.device)[t] >= self.switch_abar  # (B,)
        if not use_low.any():
            return self.high(x, t, **cond)
        if use_low.all():
            return self.low(x, low_t, **cond)
        out = torch.empty_like(x)
        for rows, expert, steps in ((~use_low, self.high, t), (use_low, self.low, low_t)):
            part = {k: c[rows] if isinstance(c, torch.Tensor) and c.ndim and c.shape[0] == b else c
                    for k, c in cond.items()}
            out[rows] = expert(x[rows], steps[rows], **part).to(out.dtype)
        return out
