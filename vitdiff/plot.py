"""Figures used across the book: image grids, patch grids, attention maps, training curves."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F


def to_image(x: torch.Tensor, signed: bool | None = None) -> np.ndarray:
    """(C, H, W) tensor -> (H, W) or (H, W, 3) array for imshow, clipped to [0, 1].

    signed=True reads x as [-1, 1] (diffusion chapters), False as [0, 1]; None guesses from x's minimum.
    """
    x = x.detach().float().cpu()
    if x.ndim != 3:
        raise ValueError(f"to_image expects (C, H, W), got shape {tuple(x.shape)}")
    if signed if signed is not None else bool(x.min() < 0):
        x = (x + 1) / 2
    x = x.clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def image_grid(images: torch.Tensor, ncols: int = 8, titles: Sequence[str] | None = None,
               suptitle: str | None = None, scale: float = 1.2) -> plt.Figure:
    """A grid of images (N, C, H, W) with optional per-image titles; returns the figure."""
    n = len(images)
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols <= 0:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    if titles is not None and len(titles) < n:
        raise ValueError(f"titles must have one entry per image ({n}), got {len(titles)}")
    ncols = min(ncols, n)
    signed = bool(images.min() < -0.05)  # one decision for the whole grid: [-1, 1] data, or [0, 1]
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_image(images[i], signed), cmap="gray", vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def patch_grid(image: torch.Tensor, patch_size: int, title: str | None = None) -> plt.Figure:
    """An image (C, H, W) cut into its patches, drawn as separated tiles numbered in token order."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if image.ndim != 3:
        raise ValueError(f"image must be one image (C, H, W), got shape {tuple(image.shape)}")
    c, h, w = image.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not divisible by patch_size={patch_size}")
    gh, gw = h // patch_size, w // patch_size
    fig, axes = plt.subplots(gh, gw, figsize=(min(8, 0.6 * gw + 1), min(8, 0.6 * gh + 1)), squeeze=False)
    for r in range(gh):
        for col in range(gw):
            ax = axes[r, col]
            tile = image[:, r * patch_size:(r + 1) * patch_size, col * patch_size:(col + 1) * patch_size]
            ax.imshow(to_image(tile), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if gh * gw <= 64:
                ax.set_title(str(r * gw + col), fontsize=6, pad=1)
    fig.suptitle(title or f"{gh * gw} patches of {patch_size}x{patch_size} (token order: row by row)")
    fig.tight_layout()
    return fig


def attention_overlay(images: torch.Tensor, maps: torch.Tensor, titles: Sequence[str] | None = None,
                      suptitle: str = "Where the CLS token looks (attention rollout)") -> plt.Figure:
    """Images (N, C, H, W) beside their patch-attention maps (N, gh, gw) upsampled and overlaid."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        img = to_image(images[i])
        heat = F.interpolate(maps[i][None, None].float(), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[0, 0]
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
        axes[0, i].imshow(img, cmap="gray")
        axes[1, i].imshow(img, cmap="gray")
        axes[1, i].imshow(heat.numpy(), cmap="inferno", alpha=0.6)
        for ax in axes[:, i]:
            ax.axis("off")
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=7)
    axes[0, 0].text(-0.15, 0.5, "input", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.15, 0.5, "attention", transform=axes[1, 0].transAxes, rotation=90, va="center",
                    ha="right")
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def training_curves(histories: dict[str, object], metric: str | None = None, smooth: int = 20,
                    title: str = "Training") -> plt.Figure:
    """Loss curves (smoothed) of one or more `train.History`s, and an eval metric over steps if named."""
    ncols = 2 if metric else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.6), squeeze=False)
    ax = axes[0, 0]
    for name, h in histories.items():
        loss = np.asarray(h.loss, dtype=float)
        k = max(1, min(smooth, len(loss) // 5 or 1))
        smoothed = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.asarray(h.step[k - 1:]) + 1, smoothed, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_yscale("log")
    ax.set_title(f"{title}: loss")
    ax.legend()
    if metric:
        ax = axes[0, 1]
        for name, h in histories.items():
            points = [(e["step"], e[metric]) for e in h.evals if metric in e]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}")
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_plot(matrix: torch.Tensor, class_names: Sequence[str], title: str = "Confusion matrix") -> plt.Figure:
    """A confusion matrix (rows true, columns predicted) as a labelled heat-map with counts."""
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(0.5 * k + 2.5, 0.5 * k + 2))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return fig
