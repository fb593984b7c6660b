"""The U-Net denoiser of DDPM and Stable Diffusion (chapter 05): ResBlocks, skips and cross-attention.

Shapes: B batch, C channels, H/W feature-map height/width, E time-embedding width, M context
tokens, D_ctx context width. Resolution *levels* count the halvings: level 0 is the input size,
level i is H / 2**i. The down path halves the size between levels, the up path doubles it back,
and every down-path activation is handed across to the up path as a skip connection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import TimestepEmbedder, TransformerBlock, _check_positive_int


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    groups = max(1, min(groups, channels))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it (the layer starts as "add nothing")."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block: (GroupNorm -> SiLU -> conv) twice, optionally conditioned on an embedding.

    With emb_dim set, the embedding (B, E) scales and shifts the second normalisation (FiLM):
    h = norm(h) * (1 + scale) + shift. With emb_dim=None it is a plain residual block (the VAE's).
    The last conv starts at zero, so a new block is its skip path: identity, or a 1×1 conv when
    the channel count changes.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, emb_dim: int | None = None, dropout: float = 0.0,
                 groups: int = 32):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch) if emb_dim is not None else None
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_ch, H, W), emb (B, E) or None -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = self.norm2(h)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with emb_dim: pass emb=(B, emb_dim)")
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, out_ch, 1, 1) each
            h = h * (1 + scale) + shift
        elif emb is not None:
            raise ValueError("emb was given but this ResBlock was built with emb_dim=None")
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the height and width with a stride-2 3×3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the height and width (nearest neighbour), then a 3×3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialTransformer(nn.Module):
    """A transformer block over the pixels of a feature map, as in Stable Diffusion's U-Net.

    GroupNorm -> 1×1 conv -> tokens (B, HW, C) -> self-attention [+ cross-attention to `context`]
    + MLP -> back to (B, C, H, W) -> zero-initialised 1×1 conv, added to the input. With
    `keep_attention = True` the cross-attention weights of the last call are kept in `attention`.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int | None = None, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, num_heads, context_dim=context_dim)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))
        self.keep_attention = False
        self.attention: torch.Tensor | None = None  # (B, heads, HW, M) after a call with keep_attention

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), context (B, M, D_ctx), context_mask (B, M) bool -> (B, C, H, W)."""
        _, _, height, width = x.shape
        tokens = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # (B, HW, C)
        if self.keep_attention:
            tokens, maps = self.block(tokens, context=context, context_mask=context_mask, return_attn=True)
            self.attention = maps["cross"]  # (B, heads, HW, M), or None without cross-attention
        else:
            tokens = self.block(tokens, context=context, context_mask=context_mask)
        h = rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class ConditionedSequential(nn.Sequential):
    """Layers run in order; ResBlocks also get the embedding, SpatialTransformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), emb (B, E), context (B, M, D_ctx) -> (B, C', H', W')."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """DDPM / Stable Diffusion U-Net: model(x, t, y=None, context=None, context_mask=None) -> (B, C_out, H, W).

    channel_mult[i] * base_channels is the width at level i; each level has num_res_blocks
    ResBlocks on the way down and num_res_blocks + 1 on the way up (one per skip).
    attention_resolutions lists the *levels* (0 = full size, i = size / 2**i) whose blocks are
    followed by a SpatialTransformer; the middle block always has one. Conditioning: the timestep
    embedding, plus a class embedding when num_classes is set (label num_classes is the "null"
    label for classifier-free guidance), plus cross-attention to text tokens when context_dim is set.
    The output conv starts at zero, so an untrained model predicts 0. Timesteps t are on the 0–1000
    scale of DDPM and diffusers (integers, or fractions such as flow matching's 1000·σ); others are refused.
    """

    MAX_TIMESTEP = 1000

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (2,), num_heads: int = 4, num_classes: int | None = None,
                 context_dim: int | None = None, dropout: float = 0.0, groups: int = 32,
                 pooled_dim: int | None = None, coord_channels: bool = False):
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        if not channel_mult or any(not isinstance(m, int) or m <= 0 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {channel_mult}")
        levels = len(channel_mult)
        if any(level not in range(levels) for level in attention_resolutions):
            raise ValueError(f"attention_resolutions={attention_resolutions} must hold levels in 0..{levels - 1} "
                             f"(level i is the input size / 2**i; there are len(channel_mult)={levels} levels)")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels),
                            ("num_res_blocks", num_res_blocks), ("num_heads", num_heads), ("groups", groups)):
            _check_positive_int(name, value)
        for name, value in (("out_channels", out_channels), ("context_dim", context_dim), ("pooled_dim", pooled_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_classes, self.context_dim, self.pooled_dim = num_classes, context_dim, pooled_dim
        self.size_divisor = 2 ** (levels - 1)  # H and W must be multiples of this
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions), num_heads=num_heads,
                           num_classes=num_classes, context_dim=context_dim, dropout=dropout, groups=groups)
        if pooled_dim is not None:  # only recorded when used, so older configs and checkpoints stay valid
            self.config["pooled_dim"] = pooled_dim
        if coord_channels:
            self.config["coord_channels"] = True
        self.coord_channels = bool(coord_channels)

        emb_dim = 4 * base_channels
        self.time_embed = TimestepEmbedder(emb_dim)
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        # A global text vector (e.g. the mean of the caption's tokens) added to the timestep embedding, as
        # SDXL and Imagen add a pooled text embedding: every ResBlock then sees the whole caption at once.
        self.pooled_embed = nn.Linear(pooled_dim, emb_dim) if pooled_dim is not None else None

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, ch_out, emb_dim, dropout, groups)

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, num_heads, context_dim, groups)

        # Down path: every block's output is kept as a skip for the up path.
        # coord_channels: two fixed input channels holding x and y in [-1, 1] (CoordConv, Liu et al. 2018).
        # Convolutions are translation-equivariant and a pooled caption is one global vector, so without them
        # a U-Net has no way to put "at the top left" where it belongs.
        self.conv_in = nn.Conv2d(in_channels + 2 * self.coord_channels, base_channels, 3, padding=1)
        ch, skip_channels = base_channels, [base_channels]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * base_channels)]
                ch = mult * base_channels
                if level in attention_resolutions:
                    layers.append(transformer(ch))
                self.down.append(ConditionedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.down.append(ConditionedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle = ConditionedSequential(res_block(ch, ch), transformer(ch), res_block(ch, ch))

        # Up path: each block first concatenates one skip (last in, first out).
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * base_channels)]
                ch = mult * base_channels
                if level in attention_resolutions:
                    layers.append(transformer(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(ConditionedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                      context: torch.Tensor | None, context_mask: torch.Tensor | None,
                      pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Raise a clear error for inputs this model cannot take; return t as a (B,) tensor.

        Checks of tensor values (timestep range, label range, empty masks) are skipped while torch.compile
        traces the model: they need the values on the host and would break the graph.
        """
        values = not torch.compiler.is_compiling()
        if x.ndim != 4:
            raise ValueError(f"x must be images (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"x has {c} channels, but this UNet was built with in_channels={self.in_channels}")
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f"x is {h}x{w}, but with len(channel_mult)={len(self.config['channel_mult'])} levels "
                             f"H and W must be multiples of {self.size_divisor}; pad or resize the images, "
                             "or use fewer levels")
        t = torch.as_tensor(t, device=x.device)
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"t must hold numeric timesteps, got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape (B,)=({b},), got shape {tuple(t.shape)}")
        if values and not ((t >= 0) & (t <= self.MAX_TIMESTEP)).all():  # one cheap reduction; NaN fails it too
            raise ValueError(f"t must hold timesteps in [0, {self.MAX_TIMESTEP}] (the DDPM/diffusers scale), "
                             f"got values in [{t.min().item():g}, {t.max().item():g}]")
        if self.num_classes is None and y is not None:
            raise ValueError("y was given but this UNet is not class-conditional (num_classes=None)")
        if self.num_classes is not None:
            if y is None:
                raise ValueError(f"this UNet is class-conditional: pass y=(B,) labels in 0..{self.num_classes} "
                                 f"({self.num_classes} is the null label for unconditional predictions)")
            if y.shape != (b,) or y.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"y must be integer labels of shape ({b},), got {y.dtype} {tuple(y.shape)}")
            if values and (y.min() < 0 or y.max() > self.num_classes):
                raise ValueError(f"y must lie in 0..{self.num_classes} (num_classes={self.num_classes} is the "
                                 f"null label), got values in {int(y.min())}..{int(y.max())}")
        if self.context_dim is None and (context is not None or context_mask is not None):
            raise ValueError("context was given but this UNet has no cross-attention (context_dim=None)")
        if self.context_dim is not None:
            if context is None:
                raise ValueError(f"this UNet is text-conditional: pass context=(B, M, {self.context_dim}) "
                                 "(the encoded empty caption for unconditional predictions)")
            if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
                raise ValueError(f"context must have shape (B, M, context_dim)=({b}, M, {self.context_dim}), "
                                 f"got {tuple(context.shape)}")
            if context_mask is not None:
                if context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]:
                    raise ValueError(f"context_mask must be bool of shape {tuple(context.shape[:2])} "
                                     f"(True = real token), got {context_mask.dtype} {tuple(context_mask.shape)}")
                if values and not context_mask.any(dim=1).all():
                    raise ValueError("every row of context_mask needs at least one True (real) token")
        if self.pooled_dim is None and pooled is not None:
            raise ValueError("pooled was given but this UNet has no pooled conditioning (pooled_dim=None)")
        if self.pooled_dim is not None and (pooled is None or pooled.shape != (b, self.pooled_dim)):
            got = "None" if pooled is None else tuple(pooled.shape)
            raise ValueError(f"this UNet adds a pooled text vector to its timestep embedding: pass "
                             f"pooled=(B, pooled_dim)=({b}, {self.pooled_dim}), got {got}")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,), y (B,), context (B, M, D_ctx), context_mask (B, M), pooled (B, D_pool)
        -> (B, C_out, H, W)."""
        t = self._check_inputs(x, t, y, context, context_mask, pooled)
        emb = self.time_embed(t)  # (B, E)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        if self.pooled_embed is not None:
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))

        if self.coord_channels:
            ys = torch.linspace(-1, 1, x.shape[2], device=x.device, dtype=x.dtype)
            xs = torch.linspace(-1, 1, x.shape[3], device=x.device, dtype=x.dtype)
            grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, H, W): y, x
            x = torch.cat([x, grid.expand(x.shape[0], -1, -1, -1)], dim=1)  # (B, C + 2, H, W)
        h = self.conv_in(x)  # (B, base_channels, H, W)
        skips = [h]
        for block in self.down:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle(h, emb, context, context_mask)  # (B, C_deepest, H / 2**(levels-1), ...)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # (B, C_out, H, W)

    @torch.no_grad()
    def cross_attention_maps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                             context_mask: torch.Tensor | None = None, **cond) -> list[torch.Tensor]:
        """Cross-attention weights of every SpatialTransformer, in the order they run (down, middle, up).

        Each is (B, heads, HW, M) for that block's feature map of H×W pixels: how much each pixel
        reads from each context token. Rows sum to one; padded tokens get zero weight.
        """
        if self.context_dim is None:
            raise ValueError("cross_attention_maps needs a text-conditional UNet (context_dim set)")
        transformers = [m for m in self.modules() if isinstance(m, SpatialTransformer)]
        for m in transformers:
            m.keep_attention = True
        try:
            self(x, t, context=context, context_mask=context_mask, **cond)
            return [m.attention for m in transformers]
        finally:
            for m in transformers:
                m.keep_attention, m.attention = False, None


class TextUNet(nn.Module):
    """A U-Net and the text encoder it reads through cross-attention, trained together (chapter 05).

    model(x, t, ids=(B, L) token ids, ids_mask=(B, L) bool) -> (B, C, H, W): the encoder turns the
    token ids into context tokens (B, L, D) that every SpatialTransformer attends to; padded tokens
    are masked out. The empty caption (just <eos>) is the null condition of classifier-free guidance.
    """

    def __init__(self, unet: dict, encoder: dict):
        super().__init__()
        from .text import TextEncoder  # text.py does not need the U-Net; keep the import one-way

        if unet.get("pooled_dim") not in (None, encoder.get("dim")):
            raise ValueError(f"unet pooled_dim={unet.get('pooled_dim')!r} must be None or the encoder dim="
                             f"{encoder.get('dim')!r}")
        if unet.get("context_dim") != encoder.get("dim"):
            raise ValueError(f"unet context_dim={unet.get('context_dim')!r} must equal the encoder dim="
                             f"{encoder.get('dim')!r}")
        self.unet, self.encoder = UNet(**unet), TextEncoder(**encoder)
        self.config = {"unet": self.unet.config, "encoder": self.encoder.config}

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,), ids (B, L), ids_mask (B, L) -> prediction (B, C, H, W)."""
        context, context_mask, pooled = self.encoder(ids, ids_mask)  # (B, L, D), (B, L), (B, D)
        pooled = pooled if self.unet.pooled_dim is not None else None
        return self.unet(x, t, context=context, context_mask=context_mask, pooled=pooled)

    @torch.no_grad()
    def cross_attention_maps(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor,
                             ids_mask: torch.Tensor) -> list[torch.Tensor]:
        """Cross-attention weights (B, heads, HW, L) of every SpatialTransformer, as UNet.cross_attention_maps."""
        context, context_mask, pooled = self.encoder(ids, ids_mask)
        pooled = pooled if self.unet.pooled_dim is not None else None
        return self.unet.cross_attention_maps(x, t, context, context_mask, pooled=pooled)
