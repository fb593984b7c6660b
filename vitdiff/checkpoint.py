"""Checkpoints: weights in safetensors, config and step in JSON, optimizer state through torch.save.

A checkpoint is a folder:
    model.safetensors   the model's state_dict
    ema.safetensors     the EMA copy's state_dict (when training keeps one)
    config.json         {"format", "model_class", "model_config", "step", "extra"}
    trainer.pt          optimizer, LR-scheduler and RNG states (loaded with weights_only=True)
It is written to a temporary folder and renamed into place, so an interruption never leaves half a
checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "vitdiff-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, unshared CPU tensors
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, *, step: int = 0,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    ema: nn.Module | None = None, extra: dict | None = None,
                    rng: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically and return its path."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_tensors(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_tensors(ema), str(tmp / "ema.safetensors"))
    meta = {"format": FORMAT, "model_class": type(model).__name__,
            "model_config": getattr(model, "config", None), "step": int(step), "extra": extra or {}}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    if optimizer is not None or scheduler is not None or rng is not None:
        state = {"optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "rng": rng}
        torch.save(state, tmp / "trainer.pt")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _recover(directory: Path) -> None:
    """Finish a replace that was interrupted between its two renames (the previous checkpoint is in .old)."""
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.is_dir():
        old.rename(directory)


def read_config(directory: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint folder; a clear error if it is missing or unreadable."""
    _recover(Path(directory))
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {Path(directory)}: {path.name} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint config {path} is corrupt: {error}") from error
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _load_weights(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint weights {path} are corrupt or unreadable: {error}") from error
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(module).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}"
        )
    module.load_state_dict(state)


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, *,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    ema: nn.Module | None = None) -> dict:
    """Load a checkpoint folder into `model` (and optimizer/scheduler/EMA if given); return its metadata.

    The metadata gains "rng" (saved RNG states, or None) for an exact resume.
    """
    directory = Path(directory)
    meta = read_config(directory)
    if meta["model_class"] != type(model).__name__:
        raise CheckpointError(f"checkpoint {directory} holds a {meta['model_class']}, "
                              f"not a {type(model).__name__}")
    _load_weights(model, directory / "model.safetensors")
    if ema is not None:
        _load_weights(ema, directory / "ema.safetensors")
    meta["rng"] = None
    trainer_path = directory / "trainer.pt"
    if optimizer is not None or scheduler is not None or trainer_path.exists():
        if not trainer_path.is_file():
            raise CheckpointError(f"{trainer_path} is missing: the checkpoint has no optimizer state")
        try:
            state = torch.load(trainer_path, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling errors come in many types
            raise CheckpointError(f"trainer state {trainer_path} is corrupt or unsafe: {error}") from error
        if optimizer is not None:
            if state.get("optimizer") is None:
                raise CheckpointError(f"{trainer_path} has no optimizer state")
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        meta["rng"] = state.get("rng")
    return meta


def load_model(directory: str | os.PathLike, cls: type[nn.Module], use_ema: bool = False) -> nn.Module:
    """Rebuild `cls(**model_config)` from a checkpoint and load its (EMA) weights."""
    meta = read_config(directory)
    if meta["model_class"] != cls.__name__:
        raise CheckpointError(f"checkpoint {directory} holds a {meta['model_class']}, not a {cls.__name__}")
    if meta.get("model_config") is None:
        raise CheckpointError(f"checkpoint {directory} stores no model_config; build the model and "
                              "call load_checkpoint instead")
    model = cls(**meta["model_config"])
    _load_weights(model, Path(directory) / ("ema.safetensors" if use_ema else "model.safetensors"))
    return model
