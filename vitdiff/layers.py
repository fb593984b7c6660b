"""Transformer building blocks (chapters 01–02): patches, position embeddings, attention, MLP, blocks.

Shapes: B batch, C channels, H/W image height/width, P patch size, N tokens, D embedding width,
h heads, d = D / h head width, M context (key/value) tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ----------------------------------------------------------------------------- patches (chapter 01)


def _check_positive_int(name: str, value: object) -> None:
    """Raise a ValueError naming `name` unless `value` is a positive int (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(f"{name}={value} is not divisible by {divisor_name}={divisor}")


class PatchEmbed(nn.Module):
    """Cut an image into P×P patches and project each to D numbers: (B, C, H, W) -> (B, N, D).

    A strided convolution with kernel = stride = P is exactly "flatten each patch, then a shared
    linear layer"; chapter 01 shows the two are equal. With dynamic_img_size=True (timm's name) any
    H, W divisible by P is accepted (the MMDiT with a cropped position table); img_size is then nominal.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True, dynamic_img_size: bool = False):
        super().__init__()
        if not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"img_size must be a positive int (square images), got {img_size!r}")
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        _check_positive_int("in_chans", in_chans)
        _check_positive_int("embed_dim", embed_dim)
        _check_divisible("img_size", img_size, "patch_size", patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D), patches in row-major order."""
        if x.ndim != 4:
            raise ValueError(f"PatchEmbed expects images (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"PatchEmbed expects in_chans={self.in_chans} channels, got {c}")
        if self.dynamic_img_size:
            if h % self.patch_size or w % self.patch_size:
                raise ValueError(f"PatchEmbed expects image sides divisible by patch_size={self.patch_size}, "
                                 f"got {h}x{w}")
        elif (h, w) != (self.img_size, self.img_size):
            raise ValueError(f"PatchEmbed expects {self.img_size}x{self.img_size} images, got {h}x{w}")
        x = self.proj(x)  # (B, D, H/P, W/P)
        # contiguous: elementwise ops keep the layout of their first input, so a transposed view here would make
        # the whole residual stream transposed, and every LayerNorm and Linear after it would copy it first
        return rearrange(x, "b d gh gw -> b (gh gw) d").contiguous()


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C): flatten each patch (pixel-major, channel-last inside a patch)."""
    _check_positive_int("patch_size", patch_size)
    if x.ndim != 4:
        raise ValueError(f"patchify expects images x of shape (B, C, H, W), got shape {tuple(x.shape)}")
    _check_divisible("image height", x.shape[-2], "patch_size", patch_size)
    _check_divisible("image width", x.shape[-1], "patch_size", patch_size)
    return rearrange(x, "b c (gh p) (gw q) -> b (gh gw) (p q c)", p=patch_size, q=patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W), the inverse of `patchify` for a square grid of N patches."""
    _check_positive_int("patch_size", patch_size)
    _check_positive_int("channels", channels)
    if x.ndim != 3:
        raise ValueError(f"unpatchify expects patch tokens x of shape (B, N, P*P*C), got shape {tuple(x.shape)}")
    b, n, k = x.shape
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"unpatchify needs a square number of patches, got N={n}")
    if k != patch_size * patch_size * channels:
        raise ValueError(f"unpatchify expects last dim P*P*C={patch_size * patch_size * channels}, got {k}")
    return rearrange(x, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=grid, p=patch_size, q=patch_size)


# ----------------------------------------------------------------------------- position embeddings


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos embedding of positions (M,) -> (M, embed_dim): [sin(p·ω_k), cos(p·ω_k)]."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for sin-cos embeddings, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False,
                            base_size: int | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding for a grid_size × grid_size patch grid -> (N, D).

    Half the channels encode the row, half the column (as in MAE and DiT). With cls_token=True a
    zero row is prepended for the class token -> (1 + N, D). With base_size the coordinates are
    i · base_size / grid_size (SD3/PixArt: a larger table stretched over the training grid's range).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos embeddings, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    if base_size is not None:
        coords = coords * (base_size / grid_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    # Same layout as MAE/DiT: first half from the column (w) coordinate, second half from the row (h).
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)],
                    dim=1)  # (N, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim), emb], dim=0)
    return emb


# ----------------------------------------------------------------------------- attention (chapter 02)


def _expand_mask(mask: torch.Tensor | None, batch: int, heads: int, n_q: int, n_k: int) -> torch.Tensor | None:
    """Bring a boolean "may attend" mask (True = attend) to a shape that broadcasts to (B, h, Nq, Nk).

    Accepted: (B, Nk) key padding; (B or 1, Nq, Nk); (B or 1, h or 1, Nq, Nk). A 2-D mask is always
    read as key padding, so a mask shared by the whole batch (e.g. causal) must be 3-D: mask[None].
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    shape = tuple(mask.shape)
    if mask.ndim == 2 and shape == (batch, n_k):
        return mask[:, None, None, :]  # key padding -> (B, 1, 1, Nk)
    if mask.ndim == 3 and shape[0] in (1, batch) and shape[1:] == (n_q, n_k):
        return mask[:, None]  # (B, 1, Nq, Nk)
    if mask.ndim == 4 and shape[0] in (1, batch) and shape[1] in (1, heads) and shape[2:] == (n_q, n_k):
        return mask
    raise ValueError(
        f"mask has shape {shape}, which does not fit batch={batch}, heads={heads}, queries={n_q}, keys={n_k}; "
        "expected (B, Nk) key padding, (B or 1, Nq, Nk) or (B or 1, h or 1, Nq, Nk)"
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Explicit scaled dot-product attention softmax(q kᵀ / √d) v.

    q (..., Nq, d), k and v (..., Nk, d); `mask` is bool and broadcastable to (..., Nq, Nk),
    True where attending is allowed. Returns (..., Nq, d), and the weights (..., Nq, Nk) if asked.
    This is the form chapter 02 derives; `Attention` uses the fused kernel unless weights are needed.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # each row sums to 1
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)  # a query with every key masked attends to nothing (not NaN)
    out = weights @ v  # (..., Nq, d)
    return (out, weights) if return_attn else out


class Attention(nn.Module):
    """Multi-head attention: self-attention by default, cross-attention when `context` is given.

    Queries come from x (B, N, dim); keys and values from `context` (B, M, context_dim) if given,
    else from x. Cross-attention is how Stable Diffusion's U-Net reads the text tokens.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, context_dim: int | None = None,
                 qk_norm: bool = False, fused: bool = True):
        super().__init__()
        _check_positive_int("dim", dim)
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused  # use F.scaled_dot_product_attention when attention weights are not needed
        self.context_dim = context_dim or dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(self.context_dim, 2 * dim, bias=qkv_bias)
        # QK-norm (used by SD3/MMDiT): RMS-normalise queries and keys per head before the dot product.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, dim), context (B, M, context_dim) or None, bool mask (True = attend) -> (B, N, dim)."""
        if x.ndim != 3:
            raise ValueError(f"Attention expects tokens x of shape (B, N, dim), got {tuple(x.shape)}")
        source = x if context is None else context
        if source.shape[-1] != self.context_dim:
            what = "context" if context is not None else "x"
            raise ValueError(f"{what} has {source.shape[-1]} features, expected {self.context_dim}")
        b, n, _ = x.shape
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, h, N, d)
        k, v = rearrange(self.kv(source), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)  # (B, h, M, d)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = _expand_mask(mask, b, self.num_heads, n, k.shape[-2])
        if return_attn or not self.fused:
            out, weights = attention(q, k, v, mask=mask, return_attn=True)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, dim)
        return (out, weights) if return_attn else out


class Mlp(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear, (B, N, D) -> (B, N, D)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 approximate_gelu: bool = False):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh" if approximate_gelu else "none")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + SelfAttn(LN x), [x + CrossAttn(LN x, context)], x + MLP(LN x).

    The cross-attention sub-layer exists only when `context_dim` is given (U-Net spatial
    transformer, chapter 05); without it this is the ViT block of chapter 03.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 context_dim: int | None = None, fused: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, fused=fused)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, context_dim=context_dim, fused=fused)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None,
                return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """x (B, N, D) -> (B, N, D); with return_attn also {"self": (B, h, N, N), "cross": (B, h, N, M) or None}."""
        maps: dict[str, torch.Tensor | None] = {"self": None, "cross": None}
        if return_attn:
            h, maps["self"] = self.attn(self.norm1(x), mask=mask, return_attn=True)
        else:
            h = self.attn(self.norm1(x), mask=mask)
        x = x + h
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this TransformerBlock has cross-attention: pass context=(B, M, context_dim)")
            if return_attn:
                h, maps["cross"] = self.cross_attn(self.norm_cross(x), context=context, mask=context_mask,
                                                   return_attn=True)
            else:
                h = self.cross_attn(self.norm_cross(x), context=context, mask=context_mask)
            x = x + h
        elif context is not None:
            raise ValueError("context was given but this TransformerBlock was built without context_dim")
        x = x + self.mlp(self.norm2(x))
        return (x, maps) if return_attn else x


# ----------------------------------------------------------------------------- timesteps (chapters 04–09)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       downscale_freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), laid out [cos, sin], float32.

    The same frequencies as the transformer's position code: ω_k = max_period^(-k / (dim/2 - shift)).
    shift = 0 is DiT's and the U-Net's; diffusers' DiT uses downscale_freq_shift=1 (its `Timesteps`).
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor (B,), got shape {tuple(t.shape)}")
    _check_positive_int("dim", dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - downscale_freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # odd widths get one zero column
    return emb  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Timestep t (B,) -> sinusoidal features -> MLP -> (B, hidden_size), as in DiT and the U-Net."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, downscale_freq_shift: float = 0.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.downscale_freq_shift = downscale_freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) -> (B, hidden_size), in the dtype of the MLP's weights (so bf16 models take float timesteps)."""
        freq = timestep_embedding(t, self.frequency_embedding_size, downscale_freq_shift=self.downscale_freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # features in float32, then the weights' dtype
