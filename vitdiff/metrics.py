"""Evaluation: classification accuracy, confusion matrices and batched prediction."""

from __future__ import annotations

import torch
from torch import nn


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label: logits (N, K), labels (N,)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"accuracy expects logits (N, K) and labels (N,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels).float().mean().item()


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes or predictions.min() < 0
                        or predictions.max() >= num_classes):
        raise ValueError(f"labels and predictions must lie in [0, num_classes={num_classes})")
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index.cpu(), minlength=num_classes**2).reshape(num_classes, num_classes)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Run `model` over `images` in batches (eval mode, no grad) and return the stacked outputs on the CPU."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs)


def evaluate_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> dict[str, float]:
    """{"accuracy", "loss"} of a classifier on a labelled set."""
    logits = predict(model, images, batch_size)
    return {"accuracy": accuracy(logits, labels.cpu()),
            "loss": nn.functional.cross_entropy(logits, labels.cpu()).item()}
