"""The Diffusion Transformer of Peebles & Xie, "Scalable Diffusion Models with Transformers" (chapter 07).

A DiT is the ViT of chapter 03 turned into a denoiser: patchify the (latent) image, add fixed 2-D sin-cos
positions, run transformer blocks conditioned on the timestep t and the class label y, and unpatchify the
tokens back into an image-shaped output (the noise and, with learn_sigma, the variance interpolation).

Conditioning (the paper's ablation, `conditioning=`):
- "adaln-zero" (the DiT): every block's LayerNorm has no weights of its own; shift γ/β and a residual gate α
  for attention and MLP are regressed from c = t_emb + y_emb, and that regression starts at zero, so each
  block starts as the identity.
- "adaln": the same blocks with the modulation regression left at its random (xavier) initialisation.
  (The paper's adaLN variant has no gate α at all; here the gates are kept so the two differ only in the
  zero initialisation, which is the effect chapter 07 measures.)
- "cross-attention": plain pre-norm blocks with a cross-attention layer reading the two tokens [t_emb, y_emb].
- "in-context": t_emb and y_emb appended to the image tokens as two extra tokens of plain ViT blocks,
  dropped before the final layer.

Shapes: B batch, C in_channels, H = W = input_size, P patch size, N = (H/P)² tokens, D hidden_size.
Names follow facebookresearch/DiT (x_embedder, t_embedder, y_embedder, blocks, final_layer,
adaLN_modulation), so a reader can move between the two and `interop.dit_from_official` is a rename.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Attention, Mlp, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, unpatchify

CONDITIONINGS = ("adaln-zero", "adaln", "cross-attention", "in-context")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer norm's affine step: x (B, N, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class LabelEmbedder(nn.Module):
    """Class label y (B,) -> (B, D), with label dropout for classifier-free guidance.

    With dropout_prob > 0 the table has one extra row, the null class with index num_classes: in training
    each label is replaced by it with probability dropout_prob, so the same model also learns the
    unconditional prediction that guidance needs (pass y = num_classes to ask for it).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random with probability dropout_prob, or where force_drop_ids is 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (B,)
        else:
            drop_ids = force_drop_ids.to(labels.device) == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """labels (B,) -> (B, D); labels are dropped only in training mode (or where force_drop_ids says)."""
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            if self.dropout_prob == 0:
                raise ValueError("force_drop_ids needs a null class: build the model with class_dropout_prob > 0")
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


def _layer_norm(hidden_size: int, affine: bool, eps: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=eps)


def _mlp(hidden_size: int, mlp_ratio: float) -> Mlp:
    return Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate_gelu=True)  # GELU(tanh), as the reference


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero: x (B, N, D), c (B, D) -> (B, N, D).

    x = x + α₁ · Attn(LN(x) · (1 + γ₁) + β₁);  x = x + α₂ · MLP(LN(x) · (1 + γ₂) + β₂),
    where (β₁, γ₁, α₁, β₂, γ₂, α₂) = Linear(SiLU(c)). With that Linear at zero, the block is the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = _layer_norm(hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = _layer_norm(hidden_size, affine=False, eps=mlp_norm_eps)
        self.mlp = _mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class CrossAttentionBlock(nn.Module):
    """The ablation's cross-attention block: self-attention, cross-attention to the condition tokens, MLP.

    x (B, N, D), context (B, 2, D) = [t_emb, y_emb] -> (B, N, D); pre-norm with ordinary (affine) LayerNorms.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = _layer_norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm_cross = _layer_norm(hidden_size, affine=True)
        self.cross_attn = Attention(hidden_size, num_heads, qkv_bias=True, context_dim=hidden_size)
        self.norm2 = _layer_norm(hidden_size, affine=True, eps=mlp_norm_eps)
        self.mlp = _mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), context=context)
        return x + self.mlp(self.norm2(x))


class InContextBlock(nn.Module):
    """The ablation's in-context block: a plain pre-norm ViT block over image + condition tokens (B, N+2, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = _layer_norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = _layer_norm(hidden_size, affine=True, eps=mlp_norm_eps)
        self.mlp = _mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Tokens (B, N, D) -> patches (B, N, P·P·C_out): LayerNorm (adaptive from c, or plain) and a linear layer."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size, affine=not adaptive)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)) \
            if adaptive else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm_final(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """Diffusion Transformer: model(x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W), C_out = 2C with learn_sigma.

    t is on the 0–1000 scale of the reference (float allowed); y holds labels in 0..num_classes-1, or
    num_classes for the null class when class_dropout_prob > 0. With learn_sigma the output's first C
    channels are the prediction and the last C the variance interpolation v in [-1, 1] that the DDPM sampler
    reads. `mlp_norm_eps` and `timestep_freq_shift` exist for diffusers' DiT, which uses 1e-5 and 1 there.
    Inputs are checked by `validate`, which is skipped inside torch.compile and when validate_inputs is False.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, conditioning: str = "adaln-zero",
                 mlp_norm_eps: float = 1e-6, timestep_freq_shift: float = 0.0):
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                            ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos positions, got {hidden_size}")
        if not 0 <= class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {class_dropout_prob!r}")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                           conditioning=conditioning, mlp_norm_eps=mlp_norm_eps,
                           timestep_freq_shift=timestep_freq_shift)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.learn_sigma, self.conditioning = num_classes, learn_sigma, conditioning
        self.validate_inputs = True  # False skips `validate` (its label check costs a host sync on a GPU)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, downscale_freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, grid)[None], persistent=False)

        block = {"cross-attention": CrossAttentionBlock, "in-context": InContextBlock}.get(conditioning, DiTBlock)
        self.blocks = nn.ModuleList([block(hidden_size, num_heads, mlp_ratio, mlp_norm_eps) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels,
                                      adaptive=conditioning in ("adaln-zero", "adaln"))
        self.initialize_weights()

    @property
    def num_labels(self) -> int:
        """Rows of the label table: num_classes, plus the null class when class_dropout_prob > 0."""
        return self.y_embedder.embedding_table.num_embeddings

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The reference initialisation: xavier linears, zero adaLN-Zero regressions and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight  # a linear layer over flattened patches: xavier as for one
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.conditioning == "adaln-zero":  # zero: gates α = 0, so each block starts as the identity
            for modulation in [block.adaLN_modulation for block in self.blocks] + [self.final_layer.adaLN_modulation]:
                nn.init.zeros_(modulation[-1].weight)
                nn.init.zeros_(modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)  # the untrained model predicts 0
        nn.init.zeros_(self.final_layer.linear.bias)

    def validate(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a clear ValueError for inputs this model cannot take (the label range check reads the data)."""
        size = self.input_size
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, size, size):
            raise ValueError(f"x must have shape (B, {self.in_channels}, {size}, {size}) (in_channels, input_size), "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
            raise ValueError(f"t must be a scalar or have shape (B,)=({b},), got shape {tuple(t.shape)}")
        if not isinstance(y, torch.Tensor) or y.shape != (b,) or y.dtype not in (torch.int32, torch.int64):
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be integer labels of shape ({b},), got {got}")
        top = self.num_labels - 1
        if y.numel() and bool(((y < 0) | (y > top)).any()):  # one host sync
            null = (f" ({self.num_classes} is the null class)" if top == self.num_classes
                    else " (no null class: class_dropout_prob=0)")
            raise ValueError(f"y must lie in 0..{top}{null}, got values in {int(y.min())}..{int(y.max())}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) or scalar on the 0–1000 scale, y (B,) labels -> (B, C_out, H, W)."""
        t = torch.as_tensor(t, device=x.device)
        if self.validate_inputs and not torch.compiler.is_compiling():  # data-dependent checks stay out of graphs
            self.validate(x, t, y)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        t_emb = self.t_embedder(t)  # (B, D)
        y_emb = self.y_embedder(y)  # (B, D)
        if self.conditioning == "cross-attention":
            context = torch.stack([t_emb, y_emb], dim=1)  # (B, 2, D)
            for block in self.blocks:
                x = block(x, context)
            x = self.final_layer(x)
        elif self.conditioning == "in-context":
            x = torch.cat([x, t_emb[:, None], y_emb[:, None]], dim=1)  # (B, N + 2, D)
            for block in self.blocks:
                x = block(x)
            x = self.final_layer(x[:, :-2])  # drop the two condition tokens
        else:
            c = t_emb + y_emb  # (B, D), the conditioning vector
            for block in self.blocks:
                x = block(x, c)
            x = self.final_layer(x, c)  # (B, N, P·P·C_out)
        return unpatchify(x, self.patch_size, self.out_channels)  # (B, C_out, H, W)
