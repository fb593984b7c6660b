"""Shared pytest fixtures: every test starts from the same random state; MNIST located or a loud failure."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdiff.data import data_root


@pytest.fixture(autouse=True)
def _seed_everything():
    """Seed Python, NumPy and torch before each test so results do not depend on test order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def mnist_root() -> Path:
    """The data root holding MNIST; fails (does not skip) with instructions when the files are missing."""
    root = data_root()
    raw = root / "MNIST" / "raw"
    names = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if not all((raw / n).exists() or (raw / (n + ".gz")).exists() for n in names):
        pytest.fail(f"MNIST test files not found under {raw}. Copy them there "
                    f"(e.g. `cp -r ../shared/data/MNIST {root}/`) or set VITDIFF_DATA to a folder that has them.")
    return root
