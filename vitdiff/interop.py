"""Weights from widely used libraries into vitdiff models, so each can be checked number-for-number.

- `vit_from_timm(model)`: a timm `VisionTransformer` -> `vitdiff.vit.ViT` with the same weights (chapter 03).

Planned with later chapters (not in the package yet):
- `dit_from_diffusers(model)`: a diffusers `DiTTransformer2DModel` -> `vitdiff.dit.DiT`; comes with chapter 07.
- `mmdit_from_diffusers(model)`: a diffusers `SD3Transformer2DModel` -> `vitdiff.mmdit.MMDiT`; comes with
  chapter 09.

Each function copies weights only; dropout and stochastic depth are training-time choices that are
not carried over, so compare the two models in `eval()` mode.
"""

from __future__ import annotations

from torch import nn

from .vit import ViT


def _require(condition: bool, what: str) -> None:
    """Raise the ValueError that explains which part of a timm model has no vitdiff counterpart."""
    if not condition:
        raise ValueError(f"vit_from_timm: unsupported timm VisionTransformer: {what}")


def _square(value, name: str) -> int:
    """An int from a timm size that may be an int or an (h, w) pair; rejects non-square pairs."""
    if isinstance(value, int):
        return value
    _require(len(value) == 2 and value[0] == value[1], f"{name}={tuple(value)} is not square")
    return int(value[0])


def _is_plain_layer_norm(norm: nn.Module) -> bool:
    """True for a LayerNorm with eps=1e-6, a weight and a bias, which is what vitdiff's blocks use."""
    return (isinstance(norm, nn.LayerNorm) and norm.eps == 1e-6 and norm.weight is not None
            and norm.bias is not None)


def _check_timm_vit(model: nn.Module) -> None:
    """Raise a ValueError naming the first feature of `model` that vitdiff's ViT does not have."""
    from timm.layers import Attention as TimmAttention
    from timm.layers import Mlp as TimmMlp
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"vit_from_timm expects a timm VisionTransformer, got {type(model).__name__}")
    _require(model.cls_token is not None, "no class token (class_token=False)")
    _require(model.reg_token is None, f"{model.num_reg_tokens} register tokens (reg_tokens>0)")
    _require(model.pos_embed is not None, "no position embedding (pos_embed='none')")
    _require(not model.no_embed_class, "position embedding without the class token (no_embed_class=True)")
    _require(not model.dynamic_img_size, "dynamic image size (dynamic_img_size=True)")
    _require(model.global_pool in ("token", "avg"),
             f"global_pool={model.global_pool!r} (vitdiff supports 'token' and 'avg')")
    _require(isinstance(model.fc_norm, nn.Identity), "norm after pooling (fc_norm=True)")
    _require(not model.pool_include_prefix, "pooling that includes the class token (pool_include_prefix=True)")
    _require(isinstance(model.norm_pre, nn.Identity), "norm before the blocks (pre_norm=True)")
    _require(_is_plain_layer_norm(model.norm), "final norm is not LayerNorm(eps=1e-6) (final_norm/norm_layer)")
    _require(isinstance(model.head, (nn.Linear, nn.Identity)), f"head is {type(model.head).__name__}")
    _require(isinstance(model.head, nn.Identity) or model.head.bias is not None, "head without bias")

    pe = model.patch_embed
    _require(type(pe) is TimmPatchEmbed, f"patch embedding {type(pe).__name__}")
    _require(isinstance(pe.norm, nn.Identity), "norm inside the patch embedding (embed_norm_layer)")
    _require(pe.flatten and not pe.dynamic_img_pad, "patch embedding without flatten or with padding")
    _require(pe.proj.bias is not None, "patch embedding without bias")
    patch = _square(pe.patch_size, "patch_size")
    _require(tuple(pe.proj.kernel_size) == (patch, patch) and tuple(pe.proj.stride) == (patch, patch)
             and tuple(pe.proj.padding) == (0, 0), "patch projection is not a stride-P convolution")
    _square(pe.img_size, "img_size")

    _require(len(model.blocks) > 0, "no blocks (depth=0)")
    dim = model.embed_dim
    for i, block in enumerate(model.blocks):
        where = f"blocks[{i}]"
        _require(type(block) is Block, f"{where} is {type(block).__name__}, not a pre-norm Block")
        _require(_is_plain_layer_norm(block.norm1) and _is_plain_layer_norm(block.norm2),
                 f"{where} norms are not LayerNorm(eps=1e-6) (norm_layer)")
        _require(isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity),
                 f"{where} has layer scale (init_values)")
        attn = block.attn
        _require(type(attn) is TimmAttention, f"{where}.attn is {type(attn).__name__}")
        _require(isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity),
                 f"{where}.attn has qk_norm")
        _require(isinstance(attn.norm, nn.Identity), f"{where}.attn normalises its output (scale_attn_norm)")
        _require(getattr(attn, "gate", None) is None, f"{where}.attn is gated")
        _require(attn.num_heads * attn.head_dim == dim, f"{where}.attn head width is not dim / num_heads")
        _require(attn.proj.bias is not None, f"{where}.attn.proj has no bias (proj_bias=False)")
        mlp = block.mlp
        _require(type(mlp) is TimmMlp, f"{where}.mlp is {type(mlp).__name__} (mlp_layer)")
        _require(type(mlp.act) is nn.GELU and mlp.act.approximate == "none",
                 f"{where}.mlp activation is {mlp.act!r}, expected exact nn.GELU (act_layer)")
        _require(isinstance(mlp.norm, nn.Identity), f"{where}.mlp has a hidden norm (scale_mlp_norm)")
        _require(isinstance(mlp.fc1, nn.Linear) and mlp.fc1.bias is not None and mlp.fc2.bias is not None,
                 f"{where}.mlp layers are not Linear with bias")


def vit_from_timm(model: nn.Module) -> ViT:
    """A vitdiff ViT computing the same function as a timm VisionTransformer (same weights, copied).

    Supported: class token, learned position embedding covering it, pre-norm blocks with
    LayerNorm(eps=1e-6) and exact GELU, qkv with or without bias, global_pool "token" or "avg"
    (without fc_norm). Anything else raises a ValueError that names it.
    """
    _check_timm_vit(model)
    dim, first = model.embed_dim, model.blocks[0]
    hidden = first.mlp.fc1.out_features
    qkv_bias = first.attn.qkv.bias is not None
    vit = ViT(img_size=_square(model.patch_embed.img_size, "img_size"),
              patch_size=_square(model.patch_embed.patch_size, "patch_size"),
              in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes, embed_dim=dim,
              depth=len(model.blocks), num_heads=first.attn.num_heads, mlp_ratio=hidden / dim,
              qkv_bias=qkv_bias, global_pool=model.global_pool, pos_embed="learn", class_token=True)
    _require(vit.blocks[0].mlp.fc1.out_features == hidden, f"MLP width {hidden} is not int(dim * mlp_ratio)")

    source = model.state_dict()
    names = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight",
             "norm.bias"]
    if isinstance(model.head, nn.Linear):
        names += ["head.weight", "head.bias"]
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.{name}" for name in (
            "norm1.weight", "norm1.bias", "attn.proj.weight", "attn.proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    state = {name: source[name] for name in names}  # these names are the same in both models
    for i in range(len(model.blocks)):
        # timm's fused qkv (3D, D) stacks the rows [q; k; v]; vitdiff keeps q (D, D) and kv (2D, D) = [k; v]
        for kind in ("weight", "bias") if qkv_bias else ("weight",):
            qkv = source[f"blocks.{i}.attn.qkv.{kind}"]
            state[f"blocks.{i}.attn.q.{kind}"], state[f"blocks.{i}.attn.kv.{kind}"] = qkv[:dim], qkv[dim:]
    vit.load_state_dict(state)  # strict: every vitdiff weight is set
    reference = model.patch_embed.proj.weight
    return vit.to(device=reference.device, dtype=reference.dtype).train(model.training)
