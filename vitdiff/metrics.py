"""Evaluation: classification accuracy, confusion matrices, batched prediction, and the sample-quality
metrics of the diffusion chapters.

Sample quality is measured without downloading anything. A small CNN "evaluator" per data set
(MNIST, Fashion-MNIST, Shapes) is trained once with a fixed recipe and cached under the data root:

    evaluator = get_evaluator("mnist")                      # trains (~20 s on a CPU) or loads
    fd_score(evaluator, real_images, samples)               # Fréchet distance of its features
    class_accuracy(evaluator, samples, intended_labels)     # does a class-conditional sample look like its class?
    prompt_adherence(get_evaluator("shapes"), samples, labels)  # shape, colour and position match the prompt?

Every evaluator takes images in [0, 1], shaped (N, C, H, W). Diffusion samples live in [-1, 1]:
convert them with `(x + 1) / 2` (and clamp) first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .budget import get_device
from .checkpoint import CheckpointError
from .data import ATTRIBUTES, Shapes, data_root, dataset_tensors
from .train import TrainConfig, train

# ----------------------------------------------------------------------------- classification metrics


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label: logits (N, K), labels (N,)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"accuracy expects logits (N, K) and labels (N,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels).float().mean().item()


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes or predictions.min() < 0
                        or predictions.max() >= num_classes):
        raise ValueError(f"labels and predictions must lie in [0, num_classes={num_classes})")
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index.cpu(), minlength=num_classes**2).reshape(num_classes, num_classes)


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images: torch.Tensor, batch_size: int,
             device: str | torch.device | None) -> torch.Tensor:
    """Apply `fn` to `images` in batches with `model` in eval mode; outputs stacked on the CPU as float32."""
    if len(images) == 0:
        raise ValueError("images is empty: need at least one image (N >= 1)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:  # where the model lives; a model without parameters or buffers runs where the images are
        tensor = next(model.parameters(), None)
        tensor = tensor if tensor is not None else next(model.buffers(), None)
        device = tensor.device if tensor is not None else images.device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outputs = [fn(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Run `model` over `images` in batches (eval mode, no grad) and return the stacked outputs on the CPU."""
    return _batched(model, model, images, batch_size, device)


def evaluate_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> dict[str, float]:
    """{"accuracy", "loss"} of a classifier on a labelled set."""
    logits = predict(model, images, batch_size)
    return {"accuracy": accuracy(logits, labels.cpu()),
            "loss": nn.functional.cross_entropy(logits, labels.cpu()).item()}


# ----------------------------------------------------------------------------- the evaluator network


class Evaluator(nn.Module):
    """A compact CNN classifier whose penultimate activations are the features of the Fréchet distance.

    Input: images in [0, 1], (N, in_chans, img_size, img_size). Three conv blocks (conv 3×3, BatchNorm,
    ReLU, max-pool 2×2) are average-pooled to a 2×2 grid (so the quadrant of an object stays visible),
    projected to `feature_dim` features, and read out by one linear head per attribute: `num_classes`
    is e.g. [10] for MNIST or [3, 4, 4] for the shape, colour and position of a Shapes image.
    `forward` returns the heads' logits concatenated, (N, sum(num_classes)).
    """

    def __init__(self, in_chans: int = 1, img_size: int = 28, num_classes: list[int] | tuple[int, ...] = (10,),
                 widths: list[int] | tuple[int, ...] = (16, 32, 64), feature_dim: int = 128):
        super().__init__()
        if not num_classes or any(not isinstance(k, int) or k < 2 for k in num_classes):
            raise ValueError(f"num_classes must be a non-empty list of ints >= 2, got {num_classes!r}")
        if len(widths) != 3:
            raise ValueError(f"widths must list 3 channel counts, got {widths!r}")
        if img_size < 8:
            raise ValueError(f"img_size must be at least 8 (three 2x poolings), got {img_size!r}")
        self.config = {"in_chans": in_chans, "img_size": img_size, "num_classes": list(num_classes),
                       "widths": list(widths), "feature_dim": feature_dim}
        self.in_chans, self.img_size, self.num_classes = in_chans, img_size, list(num_classes)
        channels = [in_chans, *widths]
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                          nn.MaxPool2d(2))
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.project = nn.Linear(4 * widths[-1], feature_dim)
        self.head = nn.Linear(feature_dim, sum(num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of images in [0, 1], (N, C, H, W)."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"images must be (N, {self.in_chans}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
        if images.numel() and images.min() < -0.5:
            raise ValueError(f"images must lie in [0, 1], got values down to {images.min().item():.2f}; "
                             "convert diffusion samples from [-1, 1] with ((x + 1) / 2).clamp(0, 1)")
        x = self.blocks(images)  # (N, C3, H/8, W/8)
        x = self.pool(x).flatten(1)  # (N, 4 * C3)
        return F.relu(self.project(x))  # (N, F)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, sum(num_classes)) of images in [0, 1]; one block of columns per head."""
        return self.head(self.features(images))

    def split_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """The per-head logits [(N, K_1), (N, K_2), ...] of concatenated logits (N, sum K)."""
        return list(logits.split(self.num_classes, dim=1))

    def predict_attributes(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Arg-max class of every head: (N, num_heads) int64 on the CPU; for Shapes (shape, colour, position)."""
        logits = predict(self, images, batch_size)  # (N, sum K)
        return torch.stack([part.argmax(dim=1) for part in self.split_logits(logits)], dim=1)


def extract_features(evaluator: Evaluator, images: torch.Tensor, batch_size: int = 512,
                     device: str | torch.device | None = None) -> torch.Tensor:
    """Evaluator features (N, F) of images in [0, 1], computed in batches without grad, returned on the CPU."""
    return _batched(evaluator.features, evaluator, images, batch_size, device)


# ----------------------------------------------------------------------------- training and caching

# One fixed recipe per data set, independent of the budget and the device, so every reader gets the
# same evaluator and the numbers quoted in the text stay comparable. Shapes: single-object images,
# training and test sets drawn with seeds no chapter uses for its own data.
_MODEL = {"widths": [16, 32, 64], "feature_dim": 128}
_TRAINING = {"batch_size": 64, "lr": 5e-3, "seed": 0}
EVALUATOR_RECIPES: dict[str, dict[str, Any]] = {
    "mnist": {"model": {"in_chans": 1, "img_size": 28, "num_classes": [10], **_MODEL},
              "train_size": 60_000, "test_size": 10_000, "steps": 1200, **_TRAINING},
    "fashion_mnist": {"model": {"in_chans": 1, "img_size": 28, "num_classes": [10], **_MODEL},
                      "train_size": 60_000, "test_size": 10_000, "steps": 1200, **_TRAINING},
    "shapes": {"model": {"in_chans": 3, "img_size": 32, "num_classes": [3, 4, 4], **_MODEL},
               "train_size": 4000, "test_size": 2000, "steps": 400, **_TRAINING},
    # chapter 10's DreamBooth lesson: the Shapes evaluator with a fourth shape, the ring (data.EXTRA_SHAPE_NAMES)
    "shapes_ring": {"model": {"in_chans": 3, "img_size": 32, "num_classes": [4, 4, 4], **_MODEL},
                    "train_size": 5000, "test_size": 2000, "steps": 500, **_TRAINING},
}
SHAPES_TRAIN_SEED, SHAPES_TEST_SEED = 7001, 7002
EVALUATOR_FORMAT = "vitdiff-evaluator-v1"
_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist"}


def _evaluator_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in EVALUATOR_RECIPES:
        raise ValueError(f"no evaluator for {name!r}; expected one of {sorted(EVALUATOR_RECIPES)}")
    return key


def evaluator_data(name: str, train: bool, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluator's images (N, C, H, W) in [0, 1] and labels: (N,) for MNIST-like sets, (N, 3) for Shapes."""
    name = _evaluator_name(name)
    if name in ("shapes", "shapes_ring"):
        size = EVALUATOR_RECIPES[name]["train_size" if train else "test_size"]
        shapes = Shapes(size=limit or size, seed=SHAPES_TRAIN_SEED if train else SHAPES_TEST_SEED, max_objects=1,
                        extra_shapes=name == "shapes_ring")
        images, _, labels = shapes.tensors()
        return images, labels[:, 0]  # (N, 3, 32, 32), (N, 3)
    return dataset_tensors(name, train=train, limit=limit)


def _head_accuracies(evaluator: Evaluator, name: str, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predictions = evaluator.predict_attributes(images)  # (N, heads)
    labels = labels.reshape(len(labels), -1)
    if name in ("shapes", "shapes_ring"):
        return {attribute: (predictions[:, k] == labels[:, k]).float().mean().item()
                for k, attribute in enumerate(ATTRIBUTES)}
    return {"accuracy": (predictions[:, 0] == labels[:, 0]).float().mean().item()}


def train_evaluator(name: str, steps: int | None = None, train_size: int | None = None,
                    test_size: int | None = None, progress: bool = True) -> tuple[Evaluator, dict[str, Any]]:
    """Train the evaluator of `name` on the CPU with its fixed recipe; return it and a report.

    The report holds the recipe, the measured test accuracy (per attribute for Shapes) and the
    training time. `steps`, `train_size` and `test_size` override the recipe (for tests only:
    a cached evaluator should always come from the full recipe).
    """
    name = _evaluator_name(name)
    recipe = dict(EVALUATOR_RECIPES[name])
    recipe.update({k: v for k, v in (("steps", steps), ("train_size", train_size), ("test_size", test_size))
                   if v is not None})
    # the caller's random stream stays as it was, cached or not; training works even if called under no_grad
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        return _train_evaluator(name, recipe, progress)


def _train_evaluator(name: str, recipe: dict[str, Any], progress: bool) -> tuple[Evaluator, dict[str, Any]]:
    tic, cpu_tic = time.perf_counter(), time.process_time()
    images, labels = evaluator_data(name, train=True, limit=recipe["train_size"])
    torch.manual_seed(recipe["seed"])
    evaluator = Evaluator(**recipe["model"])

    def loss_fn(model: Evaluator, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        parts = model.split_logits(model(x))
        return sum(F.cross_entropy(part, y.reshape(len(y), -1)[:, k]) for k, part in enumerate(parts)) / len(parts)

    config = TrainConfig(steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                         warmup_steps=min(20, recipe["steps"] // 10), seed=recipe["seed"])
    result = train(evaluator, loss_fn, (images, labels), config, device="cpu", progress=progress)
    train_seconds, train_cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu_tic
    test_images, test_labels = evaluator_data(name, train=False, limit=recipe["test_size"])
    evaluator.eval().requires_grad_(False)
    report = {"name": name, "recipe": recipe,
              "test_accuracy": _head_accuracies(evaluator, name, test_images, test_labels),
              "test_examples": len(test_images), "train_seconds": round(train_seconds, 2),
              "train_cpu_seconds": round(train_cpu_seconds, 2), "final_loss": result.history.loss[-1],
              "threads": torch.get_num_threads(), "torch_version": torch.__version__}
    return evaluator, report


def evaluator_paths(name: str) -> tuple[Path, Path]:
    """(weights, metadata) files of the cached evaluator: <data root>/evaluators/<name>.safetensors and .json."""
    folder = data_root() / "evaluators"
    name = _evaluator_name(name)
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_evaluator(evaluator: Evaluator, report: dict[str, Any]) -> Path:
    """Cache a trained evaluator: weights, then a JSON with config, accuracy and checksum; return the weights path."""
    weights, meta = evaluator_paths(report["name"])
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in evaluator.state_dict().items()}
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)  # atomic: a reader never sees half a file
    info = {"format": EVALUATOR_FORMAT, **report, "model_config": evaluator.config, "sha256": _sha256(weights)}
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, meta)
    return weights


def load_evaluator(name: str, device: str | torch.device | None = None) -> Evaluator:
    """Load the cached evaluator of `name`; CheckpointError if it is missing, corrupt or from another recipe."""
    name = _evaluator_name(name)
    weights, meta_path = evaluator_paths(name)
    if not weights.is_file() or not meta_path.is_file():
        raise CheckpointError(f"no cached {name} evaluator at {weights} (+ {meta_path.name})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"evaluator metadata {meta_path} is corrupt: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != EVALUATOR_FORMAT:
        raise CheckpointError(f"{meta_path} is not a {EVALUATOR_FORMAT} file")
    if meta.get("recipe") != EVALUATOR_RECIPES[name]:
        raise CheckpointError(f"{meta_path} was trained with another recipe than the current one")
    if meta.get("sha256") != _sha256(weights):
        raise CheckpointError(f"evaluator weights {weights} do not match the checksum in {meta_path.name}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"evaluator weights {weights} are corrupt: {error}") from error
    evaluator = Evaluator(**meta["model_config"])
    try:
        evaluator.load_state_dict(state)
    except RuntimeError as error:  # missing/unexpected keys or shape mismatches
        raise CheckpointError(f"evaluator weights {weights} do not fit its config: {error}") from error
    return evaluator.to(get_device(device)).eval().requires_grad_(False)


def get_evaluator(name: str, device: str | torch.device | None = None, retrain: bool = False) -> Evaluator:
    """The evaluator of "mnist", "fashion_mnist", "shapes" or "shapes_ring" (chapter 10: four shapes, the ring
    too): loaded from the cache under the data root, else trained once (about 20 s on a CPU), cached, and its
    test accuracy printed.

    A corrupt or outdated cache is retrained, with a warning that says why.
    Training always runs on the CPU with a fixed recipe; `device` is where the returned model lives.
    The model is in eval mode with frozen parameters and expects images in [0, 1].
    """
    name = _evaluator_name(name)
    weights, meta = evaluator_paths(name)
    if not retrain and (weights.exists() or meta.exists()):
        try:
            return load_evaluator(name, device)
        except CheckpointError as error:
            warnings.warn(f"retraining the {name} evaluator: {error}", stacklevel=2)
    evaluator, report = train_evaluator(name)
    save_evaluator(evaluator, report)
    accuracies = ", ".join(f"{k} {100 * v:.2f}%" for k, v in report["test_accuracy"].items())
    print(f"Trained the {name} evaluator in {report['train_seconds']:.1f} s; test accuracy: {accuracies} "
          f"({report['test_examples']} images). Cached at {weights}.")
    return evaluator.to(get_device(device))


# ----------------------------------------------------------------------------- sample-quality metrics


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, F) and (N_b, F).

    FD = ||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½), in float64; the matrix square
    roots come from symmetric eigendecompositions (torch.linalg.eigh). This is the idea of the FID
    (Heusel et al., 2017) with a small domain-specific feature network instead of Inception-v3,
    whose weights cannot be downloaded here; values are comparable only with the same evaluator
    and the same number of samples (the estimate is biased upward for small sets, and needs N > F
    for a full-rank covariance).
    """
    a = _feature_matrix(features_a, "features_a")
    b = _feature_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)  # (F,)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (F, F), unbiased
    if a.shape[1] == 1:
        cov_a, cov_b = cov_a.reshape(1, 1), cov_b.reshape(1, 1)
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a  # symmetric PSD, same eigenvalues as Σ_a Σ_b
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # rounding can leave a tiny negative number for identical sets


def _feature_matrix(features: torch.Tensor | np.ndarray, argument: str) -> torch.Tensor:
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{argument} must be a tensor or array (N, F), got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"{argument} must be 2-D (N, F), got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"{argument} needs at least 2 samples to fit a covariance, got {features.shape[0]}")
    features = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(features).all():
        raise ValueError(f"{argument} contains NaN or infinite values")
    return features


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative rounding-error eigenvalues → 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def fd_score(evaluator: Evaluator, real_images: torch.Tensor, generated_images: torch.Tensor,
             batch_size: int = 512) -> float:
    """Fréchet distance between the evaluator features of real and generated images, both in [0, 1] (N, C, H, W)."""
    real = extract_features(evaluator, real_images, batch_size)
    generated = extract_features(evaluator, generated_images, batch_size)
    return frechet_distance(real, generated)


def class_accuracy(evaluator: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """How often the evaluator recognises the intended class `labels` (N,) of class-conditional samples in [0, 1]."""
    if isinstance(evaluator, Evaluator) and len(evaluator.num_classes) != 1:
        raise ValueError(f"class_accuracy needs a single-head evaluator, got heads {evaluator.num_classes}; "
                         "use prompt_adherence for Shapes")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be (N,) with N = {len(images)} images, got shape {tuple(labels.shape)}")
    return accuracy(predict(evaluator, images, batch_size), labels.cpu().long())


def prompt_adherence(shapes_evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy {"shape", "color", "position"} and "all" (every attribute right) of images made
    from single-object Shapes prompts; labels (N, 3) or (N, 1, 3) as in `Shapes`."""
    if labels.ndim == 3 and labels.shape[1:] == (1, 3):
        labels = labels[:, 0]
    if labels.ndim != 2 or labels.shape[1] != 3 or len(labels) != len(images):
        raise ValueError(f"labels must be (N, 3) or (N, 1, 3) single-object Shapes labels with N = {len(images)}, "
                         f"got shape {tuple(labels.shape)}")
    predictions = shapes_evaluator.predict_attributes(images)  # (N, 3)
    if predictions.shape != labels.shape:
        raise ValueError(f"the evaluator predicts {tuple(predictions.shape)}, expected {tuple(labels.shape)}; "
                         "pass the Shapes evaluator (get_evaluator('shapes'))")
    correct = predictions.cpu() == labels.cpu()  # (N, 3)
    scores = {attribute: correct[:, k].float().mean().item() for k, attribute in enumerate(ATTRIBUTES)}
    scores["all"] = correct.all(dim=1).float().mean().item()
    return scores
