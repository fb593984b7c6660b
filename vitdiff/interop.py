"""Weights from widely used libraries into vitdiff models, so each can be checked number-for-number.

- `vit_from_timm(model)`: a timm `VisionTransformer` -> `vitdiff.vit.ViT` with the same weights (chapter 03).
- `dit_from_official(state_dict, num_heads)`: a facebookresearch/DiT state_dict (e.g. the published
  DiT-XL-2-256x256.pt) -> `vitdiff.dit.DiT` (chapter 07).
- `dit_from_diffusers(model)`: a diffusers `DiTTransformer2DModel` -> `vitdiff.dit.DiT` (chapter 07).
- `mmdit_from_diffusers(model)`: a diffusers `SD3Transformer2DModel` -> `vitdiff.mmdit.MMDiT` (chapter 09).

Each function copies weights only; dropout and stochastic depth are training-time choices that are
not carried over, so compare the two models in `eval()` mode.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from .dit import DiT
from .layers import get_2d_sincos_pos_embed
from .mmdit import MMDiT
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


# ----------------------------------------------------------------------------- DiT (chapter 07)


def _split_qkv(state: dict[str, torch.Tensor], prefix: str, q: torch.Tensor, kv: torch.Tensor,
               kind: str) -> None:
    """Set vitdiff's `{prefix}.q.{kind}` (D, ...) and `{prefix}.kv.{kind}` (2D, ...) = [k; v]."""
    state[f"{prefix}.q.{kind}"], state[f"{prefix}.kv.{kind}"] = q, kv


def _dit_state_dict(model: DiT, source: Mapping[str, torch.Tensor], rename: dict[str, str],
                    what: str) -> dict[str, torch.Tensor]:
    """vitdiff DiT tensors from `source`: each vitdiff name not in `rename` has the same name in the source."""
    state, missing = {}, []
    for name in model.state_dict():
        if name in rename or name.split(".attn.")[-1] not in ("q.weight", "q.bias", "kv.weight", "kv.bias"):
            key = rename.get(name, name)
            if key not in source:
                missing.append(key)
            else:
                state[name] = source[key]
    if missing:
        raise ValueError(f"{what}: the state_dict lacks {missing[:6]}" + (" ..." if len(missing) > 6 else ""))
    return state


def _learn_sigma(out_channels: int, in_channels: int, what: str) -> bool:
    """True when the output has 2C channels (noise and variance), False for C; anything else is an error."""
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{what}: {out_channels} output channels for {in_channels} input channels; "
                         f"vitdiff's DiT has C (learn_sigma=False) or 2C (learn_sigma=True)")
    return out_channels == 2 * in_channels


def _load_dit(model: DiT, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with a ValueError naming the tensors that do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{what}: the weights do not fit a DiT with config {model.config}: {error}") from None


def dit_from_official(state_dict: Mapping[str, torch.Tensor], num_heads: int = 16,
                      num_classes: int | None = None, class_dropout_prob: float = 0.1) -> DiT:
    """A vitdiff DiT with the weights of a facebookresearch/DiT state_dict, in eval mode.

    Every hyper-parameter except num_heads (DiT-S/B/L/XL: 6, 12, 16, 16) is read from tensor shapes:
    patch size and channels from x_embedder, input_size from pos_embed, depth from the blocks, mlp_ratio
    from mlp.fc1, learn_sigma from final_layer.linear. The label table has num_classes rows, plus one for
    the null class when the model was trained with label dropout; every published DiT was, so with
    num_classes=None the last row is taken as the null class. class_dropout_prob only matters for training.
    """
    if not isinstance(state_dict, Mapping) or "x_embedder.proj.weight" not in state_dict:
        keys = list(state_dict)[:5] if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError("dit_from_official expects a facebookresearch/DiT state_dict with keys like "
                         f"'x_embedder.proj.weight' (for a training checkpoint pass checkpoint['ema']), got {keys}")
    what = "dit_from_official"
    source = dict(state_dict)
    proj = source["x_embedder.proj.weight"]  # (D, C, P, P)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    tokens = source["pos_embed"].shape[-2] if "pos_embed" in source else None
    if tokens is None or math.isqrt(tokens) ** 2 != tokens:
        raise ValueError(f"{what}: need pos_embed (1, N, D) with a square number of tokens N, got N={tokens}")
    depth = len({m.group(1) for k in source if (m := re.match(r"blocks\.(\d+)\.", k))})
    out_channels, rem = divmod(source["final_layer.linear.weight"].shape[0], patch * patch)
    if rem:
        raise ValueError(f"{what}: final_layer.linear has {out_channels * patch * patch + rem} outputs, "
                         f"not a multiple of patch_size²={patch * patch}")
    rows = source["y_embedder.embedding_table.weight"].shape[0]
    if num_classes is None:
        num_classes = rows - 1
    elif rows == num_classes:
        class_dropout_prob = 0.0  # trained without label dropout: no null class
    elif rows != num_classes + 1:
        raise ValueError(f"{what}: the label table has {rows} rows, which fits neither num_classes={num_classes} "
                         f"nor num_classes + 1 (with the null class)")
    if rows == num_classes + 1 and not class_dropout_prob > 0:
        raise ValueError(f"{what}: the label table has a null class, so class_dropout_prob must be > 0, "
                         f"got {class_dropout_prob!r}")
    frequencies = source["t_embedder.mlp.0.weight"].shape[1]
    if frequencies != 256:
        raise ValueError(f"{what}: t_embedder.mlp.0 reads {frequencies} sinusoidal features; DiT uses 256")
    mlp_hidden = source["blocks.0.mlp.fc1.weight"].shape[0]
    model = DiT(input_size=math.isqrt(tokens) * patch, patch_size=patch, in_channels=in_channels,
                hidden_size=hidden, depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden,
                class_dropout_prob=class_dropout_prob, num_classes=num_classes,
                learn_sigma=_learn_sigma(out_channels, in_channels, what))
    if model.blocks[0].mlp.fc1.out_features != mlp_hidden:
        raise ValueError(f"{what}: MLP width {mlp_hidden} is not int(hidden_size * mlp_ratio)")

    state = _dit_state_dict(model, source, {}, what)
    for i in range(depth):  # the reference's fused qkv (3D, D) stacks the rows [q; k; v]
        for kind in ("weight", "bias"):
            qkv = source[f"blocks.{i}.attn.qkv.{kind}"]
            _split_qkv(state, f"blocks.{i}.attn", qkv[:hidden], qkv[hidden:], kind)
    expected = {k for k in state if ".attn.q." not in k and ".attn.kv." not in k} | {"pos_embed"} | {
        f"blocks.{i}.attn.qkv.{kind}" for i in range(depth) for kind in ("weight", "bias")}
    unexpected = sorted(set(source) - expected)
    if unexpected:
        raise ValueError(f"{what}: tensors with no place in vitdiff's DiT: {unexpected[:6]}")
    pos_embed = get_2d_sincos_pos_embed(hidden, math.isqrt(tokens))
    if not torch.allclose(source["pos_embed"].reshape(tokens, hidden).float().cpu(), pos_embed, atol=1e-4):
        raise ValueError(f"{what}: pos_embed is not the fixed 2-D sin-cos embedding that DiT uses")
    _load_dit(model, state, what)
    return model.to(device=proj.device, dtype=proj.dtype).eval()


def dit_from_diffusers(model: nn.Module) -> DiT:
    """A vitdiff DiT computing the same function as a diffusers DiTTransformer2DModel (same weights, copied).

    diffusers gives every block its own copy of the timestep and label embedders (the final layer reads
    block 0's); they must be equal, as in converted checkpoints, because vitdiff's DiT shares one. Its
    timestep features use downscale_freq_shift=1 and its MLP norm eps=norm_eps (1e-5 by default); the
    returned DiT records both in its config (timestep_freq_shift, mlp_norm_eps).
    """
    from diffusers import DiTTransformer2DModel

    if not isinstance(model, DiTTransformer2DModel):
        raise TypeError(f"dit_from_diffusers expects a diffusers DiTTransformer2DModel, got {type(model).__name__}")
    what, cfg = "dit_from_diffusers", model.config
    for name, value, expected in (("activation_fn", cfg.activation_fn, "gelu-approximate"),
                                  ("attention_bias", cfg.attention_bias, True),
                                  ("norm_elementwise_affine", cfg.norm_elementwise_affine, False)):
        if value != expected:
            raise ValueError(f"{what}: unsupported {name}={value!r} (vitdiff's DiT has {expected!r})")
    blocks = model.transformer_blocks
    if len(blocks) == 0:
        raise ValueError(f"{what}: the model has no transformer blocks (num_layers=0)")
    emb = blocks[0].norm1.emb  # CombinedTimestepLabelEmbeddings
    proj = emb.time_proj
    if not proj.flip_sin_to_cos or proj.num_channels != 256 or proj.scale != 1:
        raise ValueError(f"{what}: timestep features must be [cos, sin] of 256 channels with scale 1, got "
                         f"flip_sin_to_cos={proj.flip_sin_to_cos}, num_channels={proj.num_channels}, "
                         f"scale={proj.scale}")
    reference = emb.state_dict()
    for i, block in enumerate(blocks):
        if any(not torch.equal(v, reference[k]) for k, v in block.norm1.emb.state_dict().items()):
            raise ValueError(f"{what}: transformer_blocks[{i}] has its own timestep/label embedder weights; "
                             "vitdiff's DiT shares one (as the original DiT and converted checkpoints do)")
    hidden, in_channels = model.inner_dim, cfg.in_channels
    ours = DiT(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=in_channels,
               hidden_size=hidden, depth=len(blocks), num_heads=cfg.num_attention_heads,
               mlp_ratio=blocks[0].ff.net[0].proj.out_features / hidden,
               class_dropout_prob=emb.class_embedder.dropout_prob, num_classes=cfg.num_embeds_ada_norm,
               learn_sigma=_learn_sigma(model.out_channels, in_channels, what),
               mlp_norm_eps=cfg.norm_eps, timestep_freq_shift=float(proj.downscale_freq_shift))

    rename = {"x_embedder.proj.weight": "pos_embed.proj.weight", "x_embedder.proj.bias": "pos_embed.proj.bias",
              "y_embedder.embedding_table.weight":
                  "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
              "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
              "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
              "final_layer.linear.weight": "proj_out_2.weight", "final_layer.linear.bias": "proj_out_2.bias"}
    for ours_name, theirs in (("mlp.0", "linear_1"), ("mlp.2", "linear_2")):
        for kind in ("weight", "bias"):
            rename[f"t_embedder.{ours_name}.{kind}"] = \
                f"transformer_blocks.0.norm1.emb.timestep_embedder.{theirs}.{kind}"
    for i in range(len(blocks)):
        for ours_name, theirs in (("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn1.to_out.0"),
                                  ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")):
            for kind in ("weight", "bias"):
                rename[f"blocks.{i}.{ours_name}.{kind}"] = f"transformer_blocks.{i}.{theirs}.{kind}"
    source = model.state_dict()
    state = _dit_state_dict(ours, source, rename, what)
    for i in range(len(blocks)):  # diffusers keeps to_q, to_k, to_v; vitdiff q and kv = [k; v]
        for kind in ("weight", "bias"):
            prefix = f"transformer_blocks.{i}.attn1"
            kv = torch.cat([source[f"{prefix}.to_k.{kind}"], source[f"{prefix}.to_v.{kind}"]])
            _split_qkv(state, f"blocks.{i}.attn", source[f"{prefix}.to_q.{kind}"], kv, kind)
    _load_dit(ours, state, what)
    weight = model.pos_embed.proj.weight
    return ours.to(device=weight.device, dtype=weight.dtype).train(model.training)


# ----------------------------------------------------------------------------- MMDiT (chapter 09)


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous regresses (scale, shift); vitdiff (as SD3's reference) (shift, scale)."""
    scale, shift = tensor.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def mmdit_from_diffusers(model: nn.Module) -> MMDiT:
    """A vitdiff MMDiT computing the same function as a diffusers SD3Transformer2DModel (same weights, copied).

    Supported: SD3(-medium) layouts, with or without qk_norm="rms_norm", with a fixed position table or a
    cropped one (pos_embed_max_size, copied as stored). Not supported (ValueError): SD3.5's dual-attention
    layers, other qk_norm kinds, caption_projection_dim != the model width. diffusers concatenates
    [image; context] where vitdiff concatenates [context; image]: the same attention. diffusers has no
    text mask, so compare with context_mask=None.
    """
    from diffusers import SD3Transformer2DModel

    if not isinstance(model, SD3Transformer2DModel):
        raise TypeError(f"mmdit_from_diffusers expects a diffusers SD3Transformer2DModel, got {type(model).__name__}")
    what, cfg = "mmdit_from_diffusers", model.config
    hidden, blocks = model.inner_dim, model.transformer_blocks
    if len(blocks) == 0:
        raise ValueError(f"{what}: the model has no transformer blocks (num_layers=0)")
    if tuple(cfg.dual_attention_layers):
        raise ValueError(f"{what}: unsupported dual_attention_layers={tuple(cfg.dual_attention_layers)} (SD3.5's "
                         "second image self-attention); vitdiff's MMDiT has the SD3 joint block only")
    if cfg.qk_norm not in (None, "rms_norm"):
        raise ValueError(f"{what}: unsupported qk_norm={cfg.qk_norm!r}; vitdiff's MMDiT has None or 'rms_norm'")
    if cfg.caption_projection_dim != hidden:
        raise ValueError(f"{what}: caption_projection_dim={cfg.caption_projection_dim} differs from the model width "
                         f"num_attention_heads * attention_head_dim = {hidden}")
    patch = model.pos_embed.proj
    if getattr(model.pos_embed, "layer_norm", False) or model.pos_embed.pos_embed is None:
        raise ValueError(f"{what}: the patch embedding has a layer norm or no position table")
    mlp_hidden = blocks[0].ff.net[0].proj.out_features
    ours = MMDiT(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                 hidden_size=hidden, depth=len(blocks), num_heads=cfg.num_attention_heads,
                 mlp_ratio=mlp_hidden / hidden, context_dim=cfg.joint_attention_dim,
                 pooled_dim=cfg.pooled_projection_dim, qk_norm=cfg.qk_norm,
                 pos_embed_max_size=cfg.pos_embed_max_size, out_channels=model.out_channels)

    source = model.state_dict()
    rename = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
              "y_embedder.0": "time_text_embed.text_embedder.linear_1",
              "y_embedder.2": "time_text_embed.text_embedder.linear_2", "context_embedder": "context_embedder",
              "final_layer.linear": "proj_out"}
    for i, block in enumerate(blocks):
        ours_block, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        rename |= {f"{ours_block}.x_block.attn.proj": f"{theirs}.attn.to_out.0",
                   f"{ours_block}.x_block.adaLN_modulation.1": f"{theirs}.norm1.linear",
                   f"{ours_block}.x_block.mlp.fc1": f"{theirs}.ff.net.0.proj",
                   f"{ours_block}.x_block.mlp.fc2": f"{theirs}.ff.net.2"}
        if not block.context_pre_only:
            rename |= {f"{ours_block}.context_block.attn.proj": f"{theirs}.attn.to_add_out",
                       f"{ours_block}.context_block.adaLN_modulation.1": f"{theirs}.norm1_context.linear",
                       f"{ours_block}.context_block.mlp.fc1": f"{theirs}.ff_context.net.0.proj",
                       f"{ours_block}.context_block.mlp.fc2": f"{theirs}.ff_context.net.2"}
    state, used = {}, set()
    for ours_name, theirs in rename.items():
        for kind in ("weight", "bias"):
            state[f"{ours_name}.{kind}"] = source[f"{theirs}.{kind}"]
            used.add(f"{theirs}.{kind}")
    for i, block in enumerate(blocks):  # fused qkv (3D, D) = [q; k; v] per stream, and the per-head QK-norms
        prefix = f"transformer_blocks.{i}"
        for stream, projections, norms in (("x_block", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")),
                                           ("context_block", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                            ("norm_added_q", "norm_added_k"))):
            for kind in ("weight", "bias"):
                names = [f"{prefix}.attn.{p}.{kind}" for p in projections]
                state[f"joint_blocks.{i}.{stream}.attn.qkv.{kind}"] = torch.cat([source[n] for n in names])
                used.update(names)
            if cfg.qk_norm is not None:
                for ours_norm, theirs in zip(("ln_q", "ln_k"), norms):
                    name = f"{prefix}.attn.{theirs}.weight"
                    state[f"joint_blocks.{i}.{stream}.attn.{ours_norm}.weight"] = source[name]
                    used.add(name)
        if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift) -> (shift, scale)
            for kind in ("weight", "bias"):
                state[f"joint_blocks.{i}.context_block.adaLN_modulation.1.{kind}"] = \
                    _swap_halves(source[f"{prefix}.norm1_context.linear.{kind}"])
                used.add(f"{prefix}.norm1_context.linear.{kind}")
    for kind in ("weight", "bias"):
        state[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(source[f"norm_out.linear.{kind}"])
        used.add(f"norm_out.linear.{kind}")
    table = model.pos_embed.pos_embed  # (1, S² or N, D)
    if cfg.pos_embed_max_size is not None:
        state["pos_embed"] = table
        used.add("pos_embed.pos_embed")
    elif not torch.allclose(table.float().cpu(), ours.pos_embed, atol=1e-4):
        raise ValueError(f"{what}: pos_embed.pos_embed is not the fixed 2-D sin-cos table of the sample_size grid")
    unused = sorted(set(source) - used)
    if unused:
        raise ValueError(f"{what}: tensors with no place in vitdiff's MMDiT: {unused[:6]}")
    try:
        ours.load_state_dict(state)  # strict: every vitdiff weight is set
    except RuntimeError as error:
        raise ValueError(f"{what}: the weights do not fit an MMDiT with config {ours.config}: {error}") from None
    return ours.to(device=patch.weight.device, dtype=patch.weight.dtype).train(model.training)
