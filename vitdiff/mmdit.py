"""The Multimodal Diffusion Transformer (MMDiT) of Esser et al., "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis" (Stable Diffusion 3), chapter 09.

A DiT (chapter 07) reads its condition through adaLN only. The MMDiT also lets text and image tokens read
each other: every joint block keeps two sets of weights, one per modality ("stream"), and runs ONE
attention over the concatenated sequence [context; image]:

    per stream s ∈ {context, x}:  q_s, k_s, v_s = qkv_s(LN(s) · (1 + γ₁ˢ) + β₁ˢ)     (own weights, own adaLN)
    joint:                        o = softmax(q kᵀ / √d) v  over [q_c; q_x], [k_c; k_x], [v_c; v_x]
    per stream:                   s = s + α₁ˢ · proj_s(o_s);  s = s + α₂ˢ · MLP_s(LN(s) · (1 + γ₂ˢ) + β₂ˢ)

with (β, γ, α) = adaLN_modulation_s(c) and the conditioning vector c = t_emb + MLP(pooled text). Images are
patchified (+ 2-D sin-cos positions), text tokens projected to the model width by `context_embedder`.
The last block is `context_pre_only`: the text stream only supplies keys and values (shift/scale, no gates,
no projection, no MLP), since nothing reads it afterwards. A final adaLN layer and unpatchify give the output.

Text padding is masked: `context_mask` (B, M), True for real tokens, removes padded keys from the joint
attention, so a prompt padded to any length gives the same image.

Shapes: B batch, C in_channels, H×W latent, P patch, N = HW/P² image tokens, M text tokens, D hidden_size,
h heads, d = D/h. Names follow Stability AI's SD3 reference (x_embedder, t_embedder, y_embedder for the
pooled vector, context_embedder, joint_blocks.i.{context_block, x_block}, final_layer), so its checkpoint
keys map one-to-one; `interop.mmdit_from_diffusers` converts diffusers' SD3Transformer2DModel. The
concatenation order [context; image] is the reference's; diffusers uses [image; context], the same function
(attention does not care about the order of its keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .dit import FinalLayer, modulate
from .layers import Attention, Mlp, PatchEmbed, TimestepEmbedder, attention, get_2d_sincos_pos_embed

QK_NORMS = (None, "rms_norm")


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)  # adaLN supplies scale and shift


class StreamAttention(nn.Module):
    """One stream's attention weights: x (B, L, D) -> q, k, v (B, h, L, d), and the output projection."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None = None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // num_heads  # QK-norm: RMSNorm of each head's queries and keys (with a learned scale)
        self.ln_q = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm == "rms_norm" else nn.Identity()
        self.ln_k = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm == "rms_norm" else nn.Identity()
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k, v, each (B, h, L, d), q and k normalised per head when qk_norm is set."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        return self.ln_q(q), self.ln_k(k), v


class StreamBlock(nn.Module):
    """One modality's half of a joint block (SD3's "DismantledBlock"): its own adaLN-Zero, attention weights
    and MLP. pre_only (the text stream of the last block): only shift/scale and q, k, v."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = _layer_norm(hidden_size)
        self.attn = StreamAttention(hidden_size, num_heads, qk_norm, pre_only)
        if not pre_only:
            self.norm2 = _layer_norm(hidden_size)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate_gelu=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple | None]:
        """x (B, L, D), c (B, D) -> (q, k, v) (B, h, L, d) each, and the modulation the post-attention half needs."""
        if self.pre_only:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.pre_attention(modulate(self.norm1(x), shift, scale)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, mods: tuple) -> torch.Tensor:
        """Residual updates of x (B, L, D) from this stream's slice of the joint attention output (B, L, D)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa[:, None] * self.attn.proj(attn_out)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """An MMDiT block: context (B, M, D), x (B, N, D), c (B, D) -> (context or None, x).

    Both streams project their own q, k, v; one attention runs over [context; x] (a key padding mask (B, 1, 1,
    M + N) hides padded text); each stream takes its slice back through its own projection and MLP. With
    context_pre_only only x is updated (the text queries are left out of the attention); the context returned is None.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=context_pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None,
                return_attn: bool = False) -> tuple[torch.Tensor | None, ...]:
        """-> (context', x'), or (context', x', weights (B, h, M + N or N, M + N)) with return_attn."""
        (q_c, k_c, v_c), context_mods = self.context_block.pre_attention(context, c)
        (q_x, k_x, v_x), x_mods = self.x_block.pre_attention(x, c)
        q = q_x if self.context_pre_only else torch.cat([q_c, q_x], dim=2)  # (B, h, M + N, d)
        k, v = torch.cat([k_c, k_x], dim=2), torch.cat([v_c, v_x], dim=2)  # (B, h, M + N, d)
        if return_attn:
            out, weights = attention(q, k, v, mask=mask, return_attn=True)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        out = rearrange(out, "b h l d -> b l (h d)")  # (B, M + N, D), or (B, N, D) when context_pre_only
        m = context.shape[1]
        x = self.x_block.post_attention(x, out[:, -x.shape[1]:], x_mods)
        context = None if self.context_pre_only else self.context_block.post_attention(context, out[:, :m],
                                                                                       context_mods)
        return (context, x, weights) if return_attn else (context, x)


class MMDiT(nn.Module):
    """model(x (B, C, H, W), t (B,) on 0–1000, context (B, M, context_dim), pooled (B, pooled_dim),
    context_mask (B, M) bool or None) -> (B, C_out, H, W).

    pos_embed_max_size=None: a fixed sin-cos table for the input_size grid, and only input_size × input_size
    inputs. pos_embed_max_size=S (SD3): an S×S table stretched over the training grid (input_size / P), stored
    with the weights, from which the centre crop of each input's grid is taken, so any H, W divisible by P with
    H/P, W/P ≤ S work. Inputs are checked by `validate`, skipped inside torch.compile and when
    validate_inputs is False.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, context_dim: int = 4096,
                 pooled_dim: int = 2048, qk_norm: str | None = None, pos_embed_max_size: int | None = None,
                 out_channels: int | None = None):
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                            ("context_dim", context_dim), ("pooled_dim", pooled_dim),
                            ("pos_embed_max_size", pos_embed_max_size), ("out_channels", out_channels)):
            if value is None and name in ("pos_embed_max_size", "out_channels"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos positions, got {hidden_size}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        grid = input_size // patch_size
        if pos_embed_max_size is not None and pos_embed_max_size < grid:
            raise ValueError(f"pos_embed_max_size={pos_embed_max_size} is smaller than the training grid "
                             f"input_size / patch_size = {grid}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           context_dim=context_dim, pooled_dim=pooled_dim, qk_norm=qk_norm,
                           pos_embed_max_size=pos_embed_max_size, out_channels=out_channels)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = out_channels or in_channels
        self.context_dim, self.pooled_dim, self.pos_embed_max_size = context_dim, pooled_dim, pos_embed_max_size
        self.validate_inputs = True  # False skips `validate` (its mask check costs a host sync on a GPU)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size,
                                     dynamic_img_size=pos_embed_max_size is not None)
        if pos_embed_max_size is None:  # fixed, rebuilt from the config: not part of the weights
            self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, grid)[None], persistent=False)
        else:  # (1, S², D), saved with the weights as in SD3's checkpoints
            self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, pos_embed_max_size,
                                                                      base_size=grid)[None])
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Sequential(nn.Linear(pooled_dim, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))  # pooled text (B, P) -> (B, D)
        self.context_embedder = nn.Linear(context_dim, hidden_size)  # text tokens (B, M, context_dim) -> (B, M, D)
        self.joint_blocks = nn.ModuleList([self.make_block(hidden_size, num_heads, mlp_ratio, qk_norm,
                                                           last=i == depth - 1) for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def make_block(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: str | None,
                   last: bool) -> nn.Module:
        """One block: a JointBlock, whose text stream is pre-only in the last block."""
        return JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, context_pre_only=last)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, zero adaLN regressions (every block the identity), zero output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for mlp in (self.t_embedder.mlp, self.y_embedder):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for module in self.joint_blocks.modules():  # every stream's (or CrossDiT block's) modulation
            if hasattr(module, "adaLN_modulation"):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def cropped_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positions for a grid_h × grid_w patch grid (1, grid_h·grid_w, D): the table, or its centre crop."""
        if self.pos_embed_max_size is None:
            return self.pos_embed
        s = self.pos_embed_max_size
        top, left = (s - grid_h) // 2, (s - grid_w) // 2
        table = rearrange(self.pos_embed, "1 (gh gw) d -> gh gw d", gh=s)[top:top + grid_h, left:left + grid_w]
        return rearrange(table, "gh gw d -> 1 (gh gw) d")

    def validate(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 context_mask: torch.Tensor | None) -> None:
        """Raise a clear ValueError for inputs this model cannot take (the mask row check reads the data)."""
        c, p = self.in_channels, self.patch_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {c}, H, W) (in_channels={c}), got {got}")
        b, _, h, w = x.shape
        if b == 0:
            raise ValueError("x is an empty batch (B=0); pass at least one image")
        if self.pos_embed_max_size is None:
            if (h, w) != (self.input_size, self.input_size):
                raise ValueError(f"x must be {self.input_size}x{self.input_size} (input_size; build with "
                                 f"pos_embed_max_size for other sizes), got {h}x{w}")
        else:
            if h % p or w % p:
                raise ValueError(f"x height and width must be divisible by patch_size={p}, got {h}x{w}")
            if max(h, w) // p > self.pos_embed_max_size:
                raise ValueError(f"x is {h}x{w}, a {h // p}x{w // p} patch grid; the position table covers at "
                                 f"most {self.pos_embed_max_size}x{self.pos_embed_max_size} (pos_embed_max_size)")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
            raise ValueError(f"t must be a scalar or have shape (B,)=({b},), got shape {tuple(t.shape)}")
        if not isinstance(context, torch.Tensor) or context.ndim != 3:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context must be text tokens (B, M, {self.context_dim}), got {got}")
        if context.shape[0] == 0:
            raise ValueError("context is an empty prompt batch (B=0); pass one prompt per image")
        if context.shape[0] != b:
            raise ValueError(f"context holds {context.shape[0]} prompts for a batch of B={b} images")
        if context.shape[1] == 0:
            raise ValueError("context has no tokens (M=0); pass at least one text token per prompt")
        if context.shape[2] != self.context_dim:
            raise ValueError(f"context has width {context.shape[2]}, expected context_dim={self.context_dim}")
        if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or pooled.shape[0] != b:
            got = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise ValueError(f"pooled must have shape (B, pooled_dim)=({b}, {self.pooled_dim}), got {got}")
        if pooled.shape[1] != self.pooled_dim:
            raise ValueError(f"pooled has width {pooled.shape[1]}, expected pooled_dim={self.pooled_dim}")
        if context_mask is not None:
            m = context.shape[1]
            if not isinstance(context_mask, torch.Tensor) or context_mask.dtype != torch.bool:
                got = context_mask.dtype if isinstance(context_mask, torch.Tensor) else type(context_mask).__name__
                raise ValueError(f"context_mask must be a bool tensor (True = real token), got {got}")
            if context_mask.shape != (b, m):
                raise ValueError(f"context_mask must have shape (B, M)=({b}, {m}), got {tuple(context_mask.shape)}")
            empty = ~context_mask.any(dim=1)
            if bool(empty.any()):  # one host sync
                rows = empty.nonzero().flatten().tolist()
                raise ValueError(f"context_mask rows {rows} have no real token (all False); every prompt needs at "
                                 "least one (an empty prompt is its tokenizer's padding/BOS tokens, unmasked)")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                context_mask: torch.Tensor | None = None, return_attn: bool = False):
        """x (B, C, H, W), t (B,) or scalar, context (B, M, context_dim), pooled (B, pooled_dim),
        context_mask (B, M) bool -> (B, C_out, H, W); with return_attn also each block's attention weights
        (B, h, M + N, M + N), the last (B, h, N, M + N), over [context; image]."""
        t = torch.as_tensor(t, device=x.device)
        if self.validate_inputs and not torch.compiler.is_compiling():  # data-dependent checks stay out of graphs
            self.validate(x, t, context, pooled, context_mask)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.x_embedder(x) + self.cropped_pos_embed(grid_h, grid_w)  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(pooled)  # (B, D), the conditioning vector
        context = self.context_embedder(context)  # (B, M, D)
        mask = None
        if context_mask is not None:  # key padding over [context; image]: image keys are always real
            image_keys = context_mask.new_ones(x.shape[0], x.shape[1])
            mask = torch.cat([context_mask, image_keys], dim=1)[:, None, None, :]  # (B, 1, 1, M + N)
        maps = []
        for block in self.joint_blocks:
            if return_attn:
                context, x, weights = block(context, x, c, mask, return_attn=True)
                maps.append(weights)
            else:
                context, x = block(context, x, c, mask)
        x = self.final_layer(x, c)  # (B, N, P·P·C_out)
        out = rearrange(x, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=grid_h, p=self.patch_size,
                        q=self.patch_size)  # unpatchify (layers.unpatchify for an h × w grid)
        return (out, maps) if return_attn else out


class CrossDiTBlock(nn.Module):
    """The baseline SD3 compares the MMDiT with ("CrossDiT"), as in PixArt-α: a DiT block with adaLN-Zero from
    c = t_emb + pooled text, and between its self-attention and its MLP a cross-attention from the image tokens
    to the text tokens, whose output projection starts at zero (PixArt-α), so the block starts as the identity.

    Same interface as JointBlock: (context (B, M, D), x (B, N, D), c (B, D), mask (B, 1, 1, M + N)) ->
    (context, x'). The text tokens are only read, never updated: they come back unchanged.
    x = x + α₁ · SelfAttn(LN(x)(1 + γ₁) + β₁);  x = x + CrossAttn(LN'(x), context);
    x = x + α₂ · MLP(LN(x)(1 + γ₂) + β₂)
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None):
        super().__init__()
        self.norm1 = _layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm is not None)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)  # its own affine LayerNorm: no adaLN here
        self.cross_attn = Attention(hidden_size, num_heads, qk_norm=qk_norm is not None)
        self.norm2 = _layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate_gelu=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None,
                return_attn: bool = False) -> tuple[torch.Tensor | None, ...]:
        """-> (context, x'), or (context, x', cross-attention weights (B, h, N, M)) with return_attn."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        text_mask = None if mask is None else mask[:, 0, 0, :context.shape[1]]  # (B, M): the text keys
        out = self.cross_attn(self.norm_cross(x), context=context, mask=text_mask, return_attn=return_attn)
        out, weights = out if return_attn else (out, None)
        x = x + out  # image queries, text keys and values (chapter 05's cross-attention)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return (context, x, weights) if return_attn else (context, x)


class CrossDiT(MMDiT):
    """The cross-attention DiT baseline of the SD3 paper (PixArt-α style), with the MMDiT's interface.

    Everything but the blocks is the MMDiT's: patch embedding, positions, c = t_emb + MLP(pooled), the text
    projection `context_embedder`, final adaLN layer. Each block is a CrossDiTBlock: the text tokens are only
    keys and values of a cross-attention, never updated, and carry no weights per block but those of that
    cross-attention. (`joint_blocks` holds the CrossDiT blocks, so the two models share one forward.)
    With return_attn the maps are each block's cross-attention weights (B, h, N, M), image queries over text.
    """

    def make_block(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: str | None,
                   last: bool) -> nn.Module:
        return CrossDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The MMDiT's initialisation, and every cross-attention output projection at zero (PixArt-α)."""
        super().initialize_weights()
        for block in self.joint_blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)


BACKBONES = {"mmdit": MMDiT, "crossdit": CrossDiT}


class TextMMDiT(nn.Module):
    """An MMDiT and the small text encoder it reads, trained together (chapters 09 and 10), as TextUNet.

    model(x, t, ids=(B, L) token ids, ids_mask=(B, L) bool) -> (B, C, H, W): the encoder's tokens are the
    text stream (padding masked out of the joint attention) and their mean is the pooled vector added to
    the timestep embedding, the roles CLIP/T5 tokens and CLIP's pooled output play in SD3. The empty caption
    (just <eos>) is the null condition of classifier-free guidance. backbone="crossdit" puts a CrossDiT (the
    same config) in the MMDiT's place: chapter 09's cross-attention baseline with the same text encoder.
    """

    def __init__(self, mmdit: dict, encoder: dict, backbone: str = "mmdit"):
        super().__init__()
        from .text import TextEncoder  # text.py does not need the MMDiT; keep the import one-way

        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        for key in ("context_dim", "pooled_dim"):
            if mmdit.get(key) != encoder.get("dim"):
                raise ValueError(f"mmdit {key}={mmdit.get(key)!r} must equal the encoder dim={encoder.get('dim')!r}")
        self.mmdit, self.encoder = BACKBONES[backbone](**mmdit), TextEncoder(**encoder)
        self.config = {"mmdit": self.mmdit.config, "encoder": self.encoder.config}
        if backbone != "mmdit":  # older sidecars have no backbone key: they are MMDiTs
            self.config["backbone"] = backbone

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, ids_mask: torch.Tensor,
                return_attn: bool = False):
        """x (B, C, H, W), t (B,), ids (B, L), ids_mask (B, L) -> prediction (B, C, H, W) (and the attention
        maps of every joint block over [text; image] with return_attn)."""
        context, context_mask, pooled = self.encoder(ids, ids_mask)  # (B, L, D), (B, L), (B, D)
        return self.mmdit(x, t, context, pooled, context_mask=context_mask, return_attn=return_attn)
