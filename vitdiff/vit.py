"""The Vision Transformer for classification (chapter 03), laid out like timm's VisionTransformer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PatchEmbed, TransformerBlock, _check_positive_int, get_2d_sincos_pos_embed


class ConvStem(nn.Module):
    """A convolutional stem in place of the patch embedding (Xiao et al., 2021, "Early Convolutions Help
    Transformers See Better"): k = log2(P) stride-2 3×3 convolutions with GELU, channels doubling up to D,
    then a 1×1 projection: (B, C, H, W) -> (B, N, D) on the same (H/P) × (W/P) grid as PatchEmbed.
    Each token then sees a 3×3-overlapping neighbourhood instead of a hard P×P cut, which small ViTs
    trained on little data learn from much faster."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"stem='conv' needs patch_size a power of two >= 2, got {patch_size!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        k = patch_size.bit_length() - 1  # stride-2 convolutions
        widths = [max(embed_dim >> (k - 1 - i), 8) for i in range(k)]  # ..., D/2, D
        layers, c = [], in_chans
        for width in widths:
            layers += [nn.Conv2d(c, width, kernel_size=3, stride=2, padding=1), nn.GELU()]
            c = width
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D), tokens in row-major order."""
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ConvStem expects images (B, {self.in_chans}, {self.img_size}, {self.img_size}), "
                             f"got shape {tuple(x.shape)}")
        return self.proj(self.convs(x)).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)


class ViT(nn.Module):
    """ViT (Dosovitskiy et al., 2021): patches -> [CLS] + tokens + positions -> pre-norm blocks -> head.

    global_pool="token" classifies from the CLS token, "avg" from the mean of the patch tokens.
    pos_embed="learn" trains the position embedding; "sincos" fixes it to the 2-D sin-cos table.
    stem="patch" is the paper's patch embedding; "conv" a convolutional stem on the same token grid (ConvStem).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, global_pool: str = "token", pos_embed: str = "learn",
                 class_token: bool = True, stem: str = "patch"):
        super().__init__()
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if pos_embed not in ("learn", "sincos"):
            raise ValueError(f"pos_embed must be 'learn' or 'sincos', got {pos_embed!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        _check_positive_int("depth", depth)
        _check_positive_int("embed_dim", embed_dim)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int (0: no head, features only), "
                             f"got {num_classes!r}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.embed_dim, self.global_pool = embed_dim, global_pool
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           qkv_bias=qkv_bias, global_pool=global_pool, pos_embed=pos_embed,
                           class_token=class_token)

        if stem == "conv":  # older configs have no stem key: they are patch embeddings
            self.config["stem"] = stem
        self.patch_embed = (ConvStem(img_size, patch_size, in_chans, embed_dim) if stem == "conv"
                            else PatchEmbed(img_size, patch_size, in_chans, embed_dim))
        self.num_prefix_tokens = 1 if class_token else 0
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, embed_dim) * 0.02)
        else:
            table = get_2d_sincos_pos_embed(embed_dim, self.patch_embed.grid_size, cls_token=class_token)
            self.register_buffer("pos_embed", table[None], persistent=False)  # (1, T, D), not trained
        self.blocks = nn.ModuleList(
            [TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, D): patch tokens, the CLS token in front, positions added."""
        x = self.patch_embed(x)  # (B, N, D); checks channels and size
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        return x + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, D): every token after the blocks and the final norm."""
        x = self._tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, T, D) -> pooled (B, D) if pre_logits, else logits (B, num_classes)."""
        if self.global_pool == "avg":
            pooled = features[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            pooled = features[:, 0]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): the pooled representation the head classifies (for retrieval)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every block: a list of depth tensors (B, heads, T, T)."""
        x = self._tokens(x)
        maps = []
        for block in self.blocks:
            x, weights = block(x, return_attn=True)
            maps.append(weights["self"])
        return maps


def attention_rollout(maps: list[torch.Tensor], residual: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): (depth × (B, h, T, T)) -> (B, T, T).

    Average the heads, add the identity for the residual path, renormalise rows, and multiply
    through the layers: entry [i, j] says how much output token i draws on input token j.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one attention map")
    first = maps[0]
    for i, weights in enumerate(maps):
        if (weights.ndim != 4 or first.ndim != 4 or weights.shape[-1] != weights.shape[-2]
                or (weights.shape[0], weights.shape[-1]) != (first.shape[0], first.shape[-1])):
            raise ValueError(f"maps must all be (B, heads, T, T) with the same B and T, as ViT.attention_maps "
                             f"returns; maps[0] is {tuple(first.shape)}, maps[{i}] is {tuple(weights.shape)}")
    rollout = None
    for weights in maps:
        a = weights.mean(dim=1)  # (B, T, T)
        if residual:
            a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
            a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, weight: float = 0.5, hard: bool = False) -> torch.Tensor:
    """Soft knowledge distillation (Hinton et al. 2015; DeiT's "soft distillation", Touvron et al. 2021):

        (1 − w) · CE(s, y) + w · T² · KL(softmax(t / T) ‖ softmax(s / T)),

    for student logits s (B, K), teacher logits t (B, K) and labels y (B,). The student learns the labels and,
    from the teacher's softened probabilities, which wrong classes are nearly right. T² keeps the gradient
    of the second term the same size for every temperature. w = 0 is plain cross-entropy.

    hard=True is DeiT's "hard distillation": (1 − w) · CE(s, y) + w · CE(s, argmax t); the teacher's decision
    replaces its probabilities and the temperature plays no part. (DeiT also adds a distillation token whose
    head learns the teacher's term; here one head learns both.)"""
    if student_logits.ndim != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student and teacher logits must both be (B, K), got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if not temperature > 0 or not 0 <= weight <= 1:
        raise ValueError(f"need temperature > 0 and 0 <= weight <= 1, got {temperature!r} and {weight!r}")
    if hard:
        return ((1 - weight) * F.cross_entropy(student_logits, labels)
                + weight * F.cross_entropy(student_logits, teacher_logits.argmax(dim=1)))
    label_loss = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits.detach() / temperature, dim=1), reduction="batchmean", log_target=True)
    return (1 - weight) * label_loss + weight * temperature**2 * soft


def _init_weights(module: nn.Module) -> None:
    """timm-style initialisation: truncated-normal linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
