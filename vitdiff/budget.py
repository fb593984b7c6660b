"""How long training runs (quick on a CPU, full on a GPU), seeding, and device choice."""

from __future__ import annotations

import os
import random
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

BUDGETS = ("quick", "full")


def get_budget() -> str:
    """Return "full" when CUDA is available, else "quick"; the env var VITDIFF_BUDGET overrides."""
    value = os.environ.get("VITDIFF_BUDGET", "").strip().lower()
    if value:
        if value not in BUDGETS:
            raise ValueError(f"VITDIFF_BUDGET={value!r} is not a budget; expected one of {BUDGETS}")
        return value
    return "full" if torch.cuda.is_available() else "quick"


def is_full() -> bool:
    """True when training cells should run at full budget."""
    return get_budget() == "full"


def pick(quick: T, full: T) -> T:
    """Choose a setting by budget: `steps = pick(quick=200, full=20_000)`."""
    return full if is_full() else quick


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on: the one asked for, else CUDA when available, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was asked for, but CUDA is not available here; "
                             "pass device=None (the best available) or 'cpu'")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) in one call; return a CPU generator seeded the same."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def progress_bars() -> bool:
    """Whether command-line tools show tqdm bars: yes unless TQDM_DISABLE is set to 1/true/yes (tqdm's own switch,
    which an explicit disable=False in the code would otherwise override)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("1", "true", "yes")
