"""Tests of vitdiff.metrics: classification metrics, the evaluator network and its cache, the Fréchet
distance (against closed forms), class accuracy and prompt adherence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vitdiff import metrics
from vitdiff.checkpoint import CheckpointError
from vitdiff.metrics import (
    Evaluator,
    accuracy,
    class_accuracy,
    confusion_matrix,
    evaluate_classifier,
    extract_features,
    fd_score,
    frechet_distance,
    predict,
    prompt_adherence,
)

# ----------------------------------------------------------------------------- accuracy / confusion matrix


def test_accuracy_counts_argmax_matches():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 6.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 2])  # argmax: 0, 1, 2, 2 -> three of four right
    assert accuracy(logits, labels) == pytest.approx(0.75)


@pytest.mark.parametrize("logits_shape, labels_shape", [((4,), (4,)), ((4, 3), (3,)), ((4, 3), (4, 1))])
def test_accuracy_rejects_bad_shapes(logits_shape, labels_shape):
    with pytest.raises(ValueError, match="accuracy expects"):
        accuracy(torch.zeros(logits_shape), torch.zeros(labels_shape, dtype=torch.long))


def test_confusion_matrix_rows_are_true_classes():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    matrix = confusion_matrix(predictions, labels, num_classes=3)
    assert matrix.dtype == torch.int64
    assert torch.equal(matrix, expected)
    assert torch.equal(confusion_matrix(labels[:0], labels[:0], 3), torch.zeros(3, 3, dtype=torch.long))


def test_confusion_matrix_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="num_classes=2"):
        confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="num_classes=2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 2)


def test_predict_batches_in_eval_mode_and_restores_mode():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    x = torch.randn(10, 4)
    out = predict(model, x, batch_size=3)  # 4 batches, the last one of size 1
    model.eval()
    assert torch.allclose(out, model(x).detach())  # dropout was off: eval mode
    model.train()
    predict(model, x)
    assert model.training


def test_evaluate_classifier_matches_cross_entropy():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # logits = inputs
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    y = torch.tensor([0, 0, 0])  # second row predicts class 1
    result = evaluate_classifier(model, x, y)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["loss"] == pytest.approx(F.cross_entropy(x, y).item())


# ----------------------------------------------------------------------------- the evaluator network


def test_evaluator_shapes_heads_and_config():
    model = Evaluator(in_chans=3, img_size=32, num_classes=[3, 4, 4], widths=[8, 8, 16], feature_dim=12)
    x = torch.rand(5, 3, 32, 32)
    assert model.features(x).shape == (5, 12)
    logits = model(x)
    assert logits.shape == (5, 11)
    parts = model.split_logits(logits)
    assert [p.shape[1] for p in parts] == [3, 4, 4]
    attributes = model.predict_attributes(x, batch_size=2)
    assert attributes.shape == (5, 3) and attributes.dtype == torch.int64
    model.eval()
    for k, part in enumerate(model.split_logits(model(x))):
        assert torch.equal(attributes[:, k], part.argmax(dim=1))
    rebuilt = Evaluator(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt.eval()(x), model(x))


def test_evaluator_features_do_not_depend_on_batching():
    model = Evaluator(in_chans=1, img_size=28, widths=[8, 8, 16], feature_dim=12)
    model.eval()
    x = torch.rand(7, 1, 28, 28)
    whole = extract_features(model, x)
    assert torch.allclose(extract_features(model, x, batch_size=2), whole, atol=1e-6)
    assert torch.allclose(whole, model.features(x), atol=1e-6)


def test_evaluator_input_errors():
    model = Evaluator(in_chans=1, img_size=28, widths=[8, 8, 16])
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(torch.rand(2, 1, 28, 28) * 2 - 1.5)
    with pytest.raises(ValueError, match="num_classes"):
        Evaluator(num_classes=[])
    with pytest.raises(ValueError, match="widths"):
        Evaluator(widths=[8, 8])


def test_unknown_evaluator_names():
    with pytest.raises(ValueError, match="cifar10"):
        metrics.get_evaluator("cifar10")
    with pytest.raises(TypeError, match="string"):
        metrics.get_evaluator(3)


# ----------------------------------------------------------------------------- training and the cache

TINY_SHAPES = {"model": {"in_chans": 3, "img_size": 32, "num_classes": [3, 4, 4], "widths": [8, 8, 16],
                         "feature_dim": 16},
               "train_size": 32, "test_size": 16, "steps": 4, "batch_size": 16, "lr": 5e-3, "seed": 0}


@pytest.fixture
def tiny_shapes(tmp_path, monkeypatch):
    """A tiny Shapes recipe and an empty data root, so caching tests train in a fraction of a second."""
    monkeypatch.setenv("VITDIFF_DATA", str(tmp_path))
    monkeypatch.setitem(metrics.EVALUATOR_RECIPES, "shapes", TINY_SHAPES)
    return tmp_path


def test_train_evaluator_learns_shapes(monkeypatch):
    recipe = {**TINY_SHAPES, "steps": 30, "train_size": 32, "batch_size": 32}
    monkeypatch.setitem(metrics.EVALUATOR_RECIPES, "shapes", recipe)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    evaluator, report = metrics.train_evaluator("shapes", progress=False)
    assert torch.equal(torch.rand(3), expected_next)  # training leaves the caller's random stream alone
    chance_loss = (math.log(3) + 2 * math.log(4)) / 3
    assert report["final_loss"] < 0.8 * chance_loss
    assert set(report["test_accuracy"]) == {"shape", "color", "position"}
    assert all(0 <= v <= 1 for v in report["test_accuracy"].values())
    assert report["test_examples"] == 16 and report["recipe"] == recipe
    assert not evaluator.training


def test_evaluator_data_shapes_uses_separate_seeds():
    train_images, train_labels = metrics.evaluator_data("shapes", train=True, limit=4)
    test_images, test_labels = metrics.evaluator_data("shapes", train=False, limit=4)
    assert train_images.shape == (4, 3, 32, 32) and train_labels.shape == (4, 3)
    assert not torch.equal(train_images, test_images)


def test_get_evaluator_trains_once_then_loads(tiny_shapes, monkeypatch, capsys):
    first = metrics.get_evaluator("shapes")
    weights, meta = metrics.evaluator_paths("shapes")
    assert weights == tiny_shapes / "evaluators" / "shapes.safetensors" and weights.is_file() and meta.is_file()
    assert "Trained the shapes evaluator" in capsys.readouterr().out
    info = json.loads(meta.read_text())
    assert info["model_config"] == first.config and set(info["test_accuracy"]) == {"shape", "color", "position"}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached evaluator must not be retrained")

    monkeypatch.setattr(metrics, "train_evaluator", no_training)
    second = metrics.get_evaluator("shapes")
    assert capsys.readouterr().out == ""
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_corrupt_cache_is_detected_and_retrained(tiny_shapes):
    metrics.get_evaluator("shapes")
    weights, meta = metrics.evaluator_paths("shapes")
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated: checksum mismatch
    with pytest.raises(CheckpointError, match="checksum"):
        metrics.load_evaluator("shapes")

    info = json.loads(meta.read_text())
    weights.write_bytes(b"not a safetensors file")
    info["sha256"] = metrics._sha256(weights)  # consistent checksum, unreadable file
    meta.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="corrupt"):
        metrics.load_evaluator("shapes")
    with pytest.warns(UserWarning, match="retraining the shapes evaluator"):
        evaluator = metrics.get_evaluator("shapes")
    assert isinstance(metrics.load_evaluator("shapes"), Evaluator) and isinstance(evaluator, Evaluator)

    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match="metadata"):
        metrics.load_evaluator("shapes")


def test_cache_from_another_recipe_is_rejected(tiny_shapes, monkeypatch):
    metrics.get_evaluator("shapes")
    monkeypatch.setitem(metrics.EVALUATOR_RECIPES, "shapes", {**TINY_SHAPES, "steps": 5})
    with pytest.raises(CheckpointError, match="recipe"):
        metrics.load_evaluator("shapes")
    with pytest.raises(CheckpointError, match="no cached"):
        metrics.load_evaluator("mnist")


# ----------------------------------------------------------------------------- Fréchet distance


def _with_moments(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Affinely transform samples (N, F) so their sample mean and (unbiased) covariance are exactly mean, cov."""
    samples = samples.double()
    centred = samples - samples.mean(dim=0)
    sample_cov = centred.T @ centred / (len(samples) - 1)
    whitening = torch.linalg.inv(torch.linalg.cholesky(sample_cov))
    return centred @ whitening.T @ torch.linalg.cholesky(cov.double()).T + mean.double()


def test_fd_of_a_set_with_itself_is_zero():
    features = torch.randn(300, 16) @ torch.randn(16, 16)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features, features.clone().float()) < 1e-4


def test_fd_of_a_translation_is_the_squared_shift():
    features = torch.randn(200, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    shift = torch.arange(8, dtype=torch.float64) / 4
    assert frechet_distance(features, features + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)


def test_fd_diagonal_gaussians_closed_form():
    # Σ_a = diag(a), Σ_b = diag(b) commute: (Σ_a^½ Σ_b Σ_a^½)^½ = diag(√(a b)), so
    # FD = ||μ_a − μ_b||² + Σ_i (a_i + b_i − 2 √(a_i b_i)) = ||μ_a − μ_b||² + Σ_i (√a_i − √b_i)².
    var_a = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    var_b = torch.tensor([4.0, 1.0, 0.25, 1.0], dtype=torch.float64)
    mu_a = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    mu_b = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    a = _with_moments(torch.randn(500, 4), mu_a, torch.diag(var_a))
    b = _with_moments(torch.randn(400, 4), mu_b, torch.diag(var_b))
    expected = (mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum()
    assert expected.item() == pytest.approx(9.0 + 1.0 + 1.0 + 4.0)  # 9 from the means, 6 from the spreads
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-8)


def test_fd_one_dimension_and_numpy_input():
    a = _with_moments(torch.randn(100, 1), torch.tensor([0.5]), torch.tensor([[4.0]]))  # σ = 2
    b = _with_moments(torch.randn(50, 1), torch.tensor([-1.0]), torch.tensor([[0.25]]))  # σ = 0.5
    expected = 1.5**2 + (2 - 0.5) ** 2
    assert frechet_distance(a.numpy(), b.numpy()) == pytest.approx(expected, rel=1e-8)


def test_fd_general_covariances_match_eigenvalue_form_and_is_symmetric():
    # Tr (Σ_a^½ Σ_b Σ_a^½)^½ = Σ √λ_i(Σ_a Σ_b): an independent route through a non-symmetric eigen-solver.
    generator = torch.Generator().manual_seed(1)
    m_a, m_b = torch.randn(6, 6, generator=generator), torch.randn(6, 6, generator=generator)
    cov_a = (m_a @ m_a.T + 0.1 * torch.eye(6)).double()
    cov_b = (m_b @ m_b.T + 0.1 * torch.eye(6)).double()
    mu_a, mu_b = torch.randn(6, generator=generator).double(), torch.randn(6, generator=generator).double()
    a = _with_moments(torch.randn(400, 6, generator=generator), mu_a, cov_a)
    b = _with_moments(torch.randn(300, 6, generator=generator), mu_b, cov_b)
    trace_sqrt = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    expected = ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt).item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-8)


def test_fd_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.randn(1, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(torch.randn(10), torch.randn(10, 1))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((3, 2), float("nan")), torch.randn(3, 2))
    with pytest.raises(TypeError, match="features_b"):
        frechet_distance(torch.randn(3, 2), [[1.0, 2.0]])


def test_fd_score_uses_evaluator_features():
    model = Evaluator(in_chans=1, img_size=28, widths=[8, 8, 16], feature_dim=8).eval()
    real, fake = torch.rand(40, 1, 28, 28), torch.rand(30, 1, 28, 28) * 0.3
    assert fd_score(model, real, real) == pytest.approx(0.0, abs=1e-5)
    expected = frechet_distance(extract_features(model, real), extract_features(model, fake))
    assert fd_score(model, real, fake, batch_size=7) == pytest.approx(expected, rel=1e-5)
    assert expected > 0


# ----------------------------------------------------------------------------- class accuracy, prompt adherence


class PixelClassifier(nn.Module):
    """Stub classifier: the class is the value of the first pixel (times 10)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.one_hot((images[:, 0, 0, 0] * 10).round().long(), 10).float() + self.unused


def test_class_accuracy_on_known_predictions():
    images = torch.zeros(4, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0.1, 0.3, 0.5, 0.9])  # predicted classes 1, 3, 5, 9
    assert class_accuracy(PixelClassifier(), images, torch.tensor([1, 3, 0, 9])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="labels must be"):
        class_accuracy(PixelClassifier(), images, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="single-head"):
        class_accuracy(Evaluator(in_chans=3, img_size=32, num_classes=[3, 4, 4]), torch.rand(2, 3, 32, 32),
                       torch.tensor([0, 1]))


class FixedAttributes:
    """Stub Shapes evaluator that predicts the given attribute rows whatever the images."""

    def __init__(self, predictions: torch.Tensor):
        self.predictions = predictions

    def predict_attributes(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictions


def test_prompt_adherence_per_attribute_and_all():
    labels = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 0], [0, 0, 1]])
    predictions = torch.tensor([[0, 1, 2],    # all right
                                [1, 0, 3],    # wrong colour
                                [1, 3, 1],    # wrong shape and position
                                [0, 0, 1]])   # all right
    images = torch.zeros(4, 3, 32, 32)
    scores = prompt_adherence(FixedAttributes(predictions), images, labels[:, None])  # (N, 1, 3) as in Shapes
    assert scores == pytest.approx({"shape": 0.75, "color": 0.75, "position": 0.75, "all": 0.5})
    assert prompt_adherence(FixedAttributes(predictions), images, labels) == scores


def test_prompt_adherence_errors():
    evaluator = FixedAttributes(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="single-object"):
        prompt_adherence(evaluator, torch.zeros(2, 3, 32, 32), torch.zeros(2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="N = 3"):
        prompt_adherence(evaluator, torch.zeros(3, 3, 32, 32), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="Shapes evaluator"):
        prompt_adherence(FixedAttributes(torch.zeros(2, 1, dtype=torch.long)), torch.zeros(2, 3, 32, 32),
                         torch.zeros(2, 3, dtype=torch.long))


def test_prompt_adherence_with_a_real_evaluator_runs():
    model = Evaluator(in_chans=3, img_size=32, num_classes=[3, 4, 4], widths=[8, 8, 16])
    labels = torch.tensor([[[0, 1, 2]], [[2, 3, 0]]])
    scores = prompt_adherence(model, torch.rand(2, 3, 32, 32), labels)
    assert set(scores) == {"shape", "color", "position", "all"}
    assert np.all([0 <= v <= 1 for v in scores.values()])
