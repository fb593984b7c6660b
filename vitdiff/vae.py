"""The variational autoencoder of latent diffusion (chapter 06): a diagonal Gaussian latent and the ELBO.

Shapes: B batch, C image channels, H/W image size, Z latent channels, f the downsampling factor,
h = H / f and w = W / f the latent size. Images are in [-1, 1], like the diffusion chapters
(`images * 2 - 1` for the [0, 1] tensors of vitdiff.data). The decoder's last layer is a plain
conv, as in Stable Diffusion (no tanh): reconstructions may overshoot [-1, 1] slightly, so clamp
them for display.

    vae = VAE(in_channels=1, latent_channels=4, channel_mult=(1, 2, 2))   # f = 4: 28×28 -> 4×7×7
    posterior = vae.encode(x)                     # DiagonalGaussian over (B, Z, h, w)
    x_hat = vae.decode(posterior.sample())        # (B, C, H, W)
    vae.estimate_scaling_factor(images)           # latent diffusion then works on encode_latents(x)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import _check_positive_int
from .unet import Downsample, ResBlock, SpatialTransformer, Upsample, group_norm


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from `parameters` = [mean, logvar] concatenated on dim 1.

    `parameters` is (B, 2Z, h, w) for the convolutional VAE or (B, 2Z) for SmallVAE. logvar is
    clamped to [-30, 20] as in Stable Diffusion, so exp never overflows or underflows.
    """

    def __init__(self, parameters: torch.Tensor):
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(f"parameters must be (B, 2Z, ...) = [mean, logvar] on dim 1, "
                             f"got shape {tuple(parameters.shape)}")
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, Z, ...) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw mean + std·ε, ε ~ N(0, I): differentiable in mean and logvar."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(mean, var) || N(0, I)) summed over the latent dims -> (B,)."""
        kl = 0.5 * (self.mean**2 + self.var - 1.0 - self.logvar)
        return kl.flatten(1).sum(dim=1)

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """−log N(z; mean, var) summed over the latent dims -> (B,)."""
        nll = 0.5 * (math.log(2 * math.pi) + self.logvar + (z - self.mean) ** 2 / self.var)
        return nll.flatten(1).sum(dim=1)


def _check_channel_mult(channel_mult: tuple[int, ...]) -> tuple[int, ...]:
    channel_mult = tuple(channel_mult)
    if not channel_mult or any(not isinstance(m, int) or m <= 0 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {channel_mult}")
    return channel_mult


class Encoder(nn.Module):
    """Image (B, C, H, W) -> Gaussian parameters (B, 2Z, H/f, W/f), f = 2**(len(channel_mult) − 1).

    Level i has num_res_blocks ResBlocks of width channel_mult[i] * base_channels, then a
    stride-2 Downsample (except the last level); a middle block (ResBlock, [self-attention],
    ResBlock) and GroupNorm -> SiLU -> conv give [mean, logvar] for each latent pixel.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 64, channel_mult: tuple[int, ...] = (1, 2, 2),
                 num_res_blocks: int = 1, latent_channels: int = 4, groups: int = 32, mid_attention: bool = False):
        super().__init__()
        channel_mult = _check_channel_mult(channel_mult)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        ch, layers = base_channels, []
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, mult * base_channels, groups=groups))
                ch = mult * base_channels
            if level != len(channel_mult) - 1:
                layers.append(Downsample(ch))
        self.down = nn.Sequential(*layers)
        attention = SpatialTransformer(ch, num_heads=1, groups=groups) if mid_attention else nn.Identity()
        self.middle = nn.Sequential(ResBlock(ch, groups=groups), attention, ResBlock(ch, groups=groups))
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, 2Z, H/f, W/f)."""
        h = self.down(self.conv_in(x))  # (B, ch, H/f, W/f)
        return self.out(self.middle(h))


class Decoder(nn.Module):
    """Latent (B, Z, h, w) -> image (B, C, h·f, w·f): the Encoder's mirror image.

    A conv to the deepest width, the middle block, then for each level from the deepest up
    num_res_blocks + 1 ResBlocks and an Upsample (except at the top level), then
    GroupNorm -> SiLU -> conv to the image channels (no output activation).
    """

    def __init__(self, out_channels: int = 1, base_channels: int = 64, channel_mult: tuple[int, ...] = (1, 2, 2),
                 num_res_blocks: int = 1, latent_channels: int = 4, groups: int = 32, mid_attention: bool = False):
        super().__init__()
        channel_mult = _check_channel_mult(channel_mult)
        ch = channel_mult[-1] * base_channels
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        attention = SpatialTransformer(ch, num_heads=1, groups=groups) if mid_attention else nn.Identity()
        self.middle = nn.Sequential(ResBlock(ch, groups=groups), attention, ResBlock(ch, groups=groups))
        layers = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(ch, mult * base_channels, groups=groups))
                ch = mult * base_channels
            if level != 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Z, h, w) -> (B, C, h·f, w·f)."""
        h = self.middle(self.conv_in(z))  # (B, ch_deepest, h, w)
        return self.out(self.up(h))


class VAE(nn.Module):
    """Convolutional VAE in the style of Stable Diffusion's AutoencoderKL: (B, C, H, W) <-> (B, Z, H/f, W/f).

    The downsampling factor is f = 2**(len(channel_mult) − 1): channel_mult=(1,) gives f = 1,
    (1, 2) f = 2, (1, 2, 2) f = 4, (1, 2, 2, 4) f = 8; H and W must be multiples of f.
    `scaling_factor` (a buffer, saved with the weights) multiplies the latents that latent
    diffusion sees, so that they have unit variance; `estimate_scaling_factor` sets it from data
    (Stable Diffusion's 0.18215 plays this role). mid_attention adds one self-attention block in the
    middle of encoder and decoder, as Stable Diffusion's VAE has.
    """

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, base_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1, groups: int = 32,
                 scaling_factor: float = 1.0, mid_attention: bool = False):
        super().__init__()
        channel_mult = _check_channel_mult(channel_mult)
        for name, value in (("in_channels", in_channels), ("latent_channels", latent_channels),
                            ("base_channels", base_channels), ("num_res_blocks", num_res_blocks)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < scaling_factor < math.inf:
            raise ValueError(f"scaling_factor must be a finite positive number, got {scaling_factor!r}")
        _check_positive_int("groups", groups)
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, base_channels=base_channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks, groups=groups,
                           scaling_factor=float(scaling_factor), mid_attention=mid_attention)
        blocks = dict(base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                      latent_channels=latent_channels, groups=groups, mid_attention=mid_attention)
        self.encoder = Encoder(in_channels, **blocks)
        self.decoder = Decoder(in_channels, **blocks)
        self.register_buffer("scaling_factor", torch.tensor(float(scaling_factor)))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images x (B, C, H, W) in [-1, 1] -> the posterior q(z | x) over (B, Z, H/f, W/f), unscaled."""
        if x.ndim != 4:
            raise ValueError(f"x must be images (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"x has {c} channels, but this VAE was built with in_channels={self.in_channels}")
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"x is {h}x{w}, but channel_mult={tuple(self.config['channel_mult'])} gives the "
                             f"downsampling factor f={f}: H and W must be multiples of {f}; pad the images "
                             f"(e.g. 28 -> 32 with F.pad(x, (2, 2, 2, 2), value=-1)) or use fewer levels")
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z (B, Z, h, w) -> images (B, C, h·f, w·f)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"z must be latents (B, latent_channels={self.latent_channels}, h, w), "
                             f"got shape {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """x (B, C, H, W) -> (reconstruction (B, C, H, W), posterior); sample=False decodes the mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> scaled latents z · scaling_factor (B, Z, h, w), what latent diffusion models.

        Call it under torch.no_grad() (or on a frozen VAE) when the VAE is not being trained.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scaling_factor

    def decode_latents(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, Z, h, w) (e.g. a latent diffusion sample) -> images (B, C, H, W)."""
        return self.decode(z_scaled / self.scaling_factor)

    @torch.no_grad()
    def estimate_scaling_factor(self, images: torch.Tensor, batch_size: int = 256, sample: bool = False) -> float:
        """Set and return scaling_factor = 1 / std of the unscaled latents of `images` (B, C, H, W) in [-1, 1].

        `sample` should match how the latents will be made (encode_latents' `sample`). The images
        are encoded in batches on the VAE's device; the std is taken over every latent value.
        """
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"images must be a batch (B >= 2, C, H, W), got shape {tuple(images.shape)}")
        device = self.scaling_factor.device
        latents = []
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc="latent std", leave=False, disable=len(starts) < 10):
            posterior = self.encode(images[start:start + batch_size].to(device))
            latents.append((posterior.sample() if sample else posterior.mode()).float())
        std = torch.cat(latents).std().item()
        if not std > 0:
            raise ValueError(f"the latents have std {std}; cannot scale them to unit variance")
        self.scaling_factor.fill_(1.0 / std)
        self.config["scaling_factor"] = 1.0 / std
        return 1.0 / std


class SmallVAE(nn.Module):
    """A fully-connected VAE with a tiny latent (latent_dim=2 draws the chapter's map of MNIST).

    Encoder: flatten -> Linear -> SiLU -> Linear -> SiLU -> Linear to [mean, logvar] (B, 2·latent_dim).
    Decoder: the mirror image back to (B, C, img_size, img_size), no output activation.
    """

    def __init__(self, latent_dim: int = 2, img_size: int = 28, in_channels: int = 1, hidden: int = 512):
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("img_size", img_size), ("in_channels", in_channels),
                            ("hidden", hidden)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.image_shape = (in_channels, img_size, img_size)
        self.latent_dim = latent_dim
        self.config = dict(latent_dim=latent_dim, img_size=img_size, in_channels=in_channels, hidden=hidden)
        pixels = in_channels * img_size * img_size
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, pixels), nn.Unflatten(1, self.image_shape))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images x (B, C, H, W) in [-1, 1] -> the posterior q(z | x) over (B, latent_dim)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must be images (B, {', '.join(map(str, self.image_shape))}), "
                             f"got shape {tuple(x.shape)}")
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z (B, latent_dim) -> images (B, C, H, W)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be (B, latent_dim={self.latent_dim}), got shape {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """x (B, C, H, W) -> (reconstruction (B, C, H, W), posterior); sample=False decodes the mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior


def vae_loss(model: nn.Module, batch: torch.Tensor | tuple[torch.Tensor, ...], beta: float = 1.0,
             recon: str = "mse") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The negative β-ELBO, averaged over the batch: mean_b [ recon(x_b, x̂_b) + β · KL(q(z | x_b) || N(0, I)) ].

    `batch` is the images (B, C, H, W) in [-1, 1], or a tuple whose first element they are (labels
    are ignored), so it plugs into vitdiff.train as it is:

        train(vae, functools.partial(vae_loss, beta=1e-3), (images * 2 - 1,), TrainConfig(steps=2000))

    Both terms are *summed* over each image's pixels and latent dims (as Stable Diffusion's VAE loss
    does), so β keeps its ELBO meaning whatever the image size. recon="mse": Σ (x − x̂)², the
    Gaussian log-likelihood with variance 1/2 up to a constant, so β = 1 is the exact ELBO of that
    decoder; recon="l1": Σ |x − x̂| (sharper, what SD uses). Autoencoders for latent diffusion use
    β ≪ 1 (SD: 1e-6) to keep detail in the latents; β = 1 gives a smooth, sampleable latent space.
    The dict also holds "mse", the per-pixel mean squared error, comparable across image sizes.
    """
    if recon not in ("mse", "l1"):
        raise ValueError(f"recon must be 'mse' or 'l1', got {recon!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 0 (the weight of the KL term), got {beta!r}")
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"batch must hold a non-empty batch of images (B >= 1, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    x_hat, posterior = model(x)
    error = x_hat.float() - x.float()  # (B, C, H, W)
    per_pixel = error**2 if recon == "mse" else error.abs()
    recon_loss = per_pixel.flatten(1).sum(dim=1).mean()
    kl = posterior.kl().float().mean()
    loss = recon_loss + beta * kl
    return loss, {"recon": recon_loss.detach(), "kl": kl.detach(), "mse": (error**2).mean().detach()}
