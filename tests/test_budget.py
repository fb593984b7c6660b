"""Tests of vitdiff.budget: the quick/full switch, pick(), device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vitdiff.budget import get_budget, get_device, is_full, pick, progress_bars, seed_everything


@pytest.mark.parametrize("value, expected", [("quick", "quick"), ("full", "full"), (" FULL ", "full"),
                                             ("Quick", "quick")])
def test_env_var_sets_budget(monkeypatch, value, expected):
    monkeypatch.setenv("VITDIFF_BUDGET", value)
    assert get_budget() == expected
    assert is_full() == (expected == "full")
    assert pick(quick=10, full=1000) == (10 if expected == "quick" else 1000)


def test_default_budget_follows_cuda(monkeypatch):
    monkeypatch.delenv("VITDIFF_BUDGET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_budget() == "quick" and pick(quick="a", full="b") == "a"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_budget() == "full" and pick(quick="a", full="b") == "b"
    monkeypatch.setenv("VITDIFF_BUDGET", "")  # empty means "not set"
    assert get_budget() == "full"


@pytest.mark.parametrize("value", ["fast", "slow", "1", "quick,full"])
def test_bad_budget_is_rejected(monkeypatch, value):
    monkeypatch.setenv("VITDIFF_BUDGET", value)
    with pytest.raises(ValueError, match="VITDIFF_BUDGET"):
        get_budget()
    with pytest.raises(ValueError, match=f"'{value}'"):
        pick(quick=1, full=2)


def test_get_device(monkeypatch):
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")


def draw() -> tuple:
    """One draw from each random number generator that seed_everything seeds."""
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_repeats_every_generator():
    generator = seed_everything(123)
    first, from_generator = draw(), torch.rand(2, generator=generator).tolist()
    generator = seed_everything(123)
    assert draw() == first
    assert torch.rand(2, generator=generator).tolist() == from_generator
    seed_everything(124)
    second = draw()
    assert all(a != b for a, b in zip(first, second))
    assert isinstance(seed_everything(2**40), torch.Generator)  # large seeds are fine for NumPy too


@pytest.mark.parametrize("seed", [-1, 1.5, "0", None])
def test_seed_everything_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(seed)


@pytest.mark.parametrize("value, shown", [("", True), ("0", True), ("1", False), ("true", False), (" YES ", False)])
def test_progress_bars_follow_tqdm_disable(monkeypatch, value, shown):
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert progress_bars() is shown
