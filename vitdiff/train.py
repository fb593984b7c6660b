"""One training loop for every chapter: AdamW, warmup + cosine LR, clipping, bf16 on CUDA, EMA,
periodic evaluation, checkpoints and exact resume.

    result = train(model, loss_fn, (images, labels), TrainConfig(steps=500), eval_fn=...)

`loss_fn(model, batch) -> loss` (or `(loss, {"name": value})`) sees one batch: a tuple of tensors
sliced from `data`, already on the device. `data` is a tuple of tensors sharing their first
dimension (sampled without replacement, one seeded permutation per epoch, so the batch at step s
depends only on the seed and s), or a callable `step -> batch` for data made on the fly.

Under `torchrun --nproc_per_node=N` the same call trains with DistributedDataParallel (gloo on the CPU,
NCCL on CUDA, one GPU per process): every rank draws the same global batch of `batch_size` and keeps its
own slice of `batch_size / N` examples, DDP averages the gradients, so the updates equal a single process
on the whole batch. Rank 0 alone shows the progress bar and writes checkpoints; each rank's random state
is saved, so a run resumes exactly at the same number of processes. The logged loss is the mean over ranks.
There `loss_fn` receives the DDP wrapper as `model`: it should call `model(...)` (the forward pass, where
DDP hooks the gradient averaging), not other methods of the module.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import get_device
from .checkpoint import load_checkpoint, read_config, save_checkpoint

Batch = tuple[torch.Tensor, ...]


@dataclass
class TrainConfig:
    """Hyper-parameters of `train`; every field has a sensible default except the number of steps."""

    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays the LR to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    eval_every: int = 0  # 0: evaluate only at the end (when eval_fn is given)
    checkpoint_every: int = 0  # 0: checkpoint only at the end (when checkpoint_dir is given)
    checkpoint_dir: str | None = None  # resume from here if a checkpoint exists
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    channels_last: bool = False  # NHWC memory layout for conv nets on CUDA
    seed: int = 0

    def __post_init__(self):
        for name, low, note in (("steps", 1, ""), ("batch_size", 1, ""), ("warmup_steps", 0, ""),
                                ("eval_every", 0, " (0: only at the end)"),
                                ("checkpoint_every", 0, " (0: only at the end)"), ("seed", 0, "")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "a positive int" if low else "a non-negative int"
                raise ValueError(f"{name} must be {kind}{note}, got {value!r}")
        if not _is_number(self.lr) or not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")
        if not _is_number(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(_is_number(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1) (Adam's beta1, beta2), got {self.betas!r}")
        if not self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps!r}")
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be a number in [0, 1] (the final LR over lr), "
                             f"got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or not 0 < self.grad_clip < math.inf):
            raise ValueError(f"grad_clip must be a finite positive max-norm, or None for no clipping, "
                             f"got {self.grad_clip!r}")
        if self.ema_decay is not None and (not _is_number(self.ema_decay) or not 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        for name in ("amp", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.checkpoint_dir, os.PathLike):
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)  # a Path is fine; stored as str (JSON)
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise ValueError(f"checkpoint_dir must be a folder path or None, got {self.checkpoint_dir!r}")


def _is_number(value: object) -> bool:
    """True for an int or float that is not a bool (NaN included: range checks then refuse it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# TrainConfig fields a resumed run may change: `steps` (the LR schedule is re-planned) and those that
# change neither the recipe nor the data order. Any other difference is refused.
RESUMABLE_CHANGES = ("steps", "eval_every", "checkpoint_every", "checkpoint_dir", "amp", "channels_last")


def _check_resumable(saved: dict[str, Any], config: TrainConfig, directory: Path) -> None:
    """Raise a ValueError listing the recipe fields in which `config` differs from the checkpoint's."""
    current = json.loads(json.dumps(asdict(config)))  # tuples -> lists, as in the saved JSON
    differ = [f"{name}: checkpoint {saved[name]!r}, now {value!r}" for name, value in current.items()
              if name not in RESUMABLE_CHANGES and name in saved and saved[name] != value]
    if differ:
        raise ValueError(f"checkpoint_dir {str(directory)!r} holds a run with another recipe, so it cannot be "
                         f"resumed with this config; differing fields: {'; '.join(differ)}. Use the "
                         f"checkpoint's values or a new checkpoint_dir (a resumed run may change only "
                         f"{', '.join(RESUMABLE_CHANGES[:-1])} and {RESUMABLE_CHANGES[-1]})")


@dataclass
class History:
    """What happened during training: per-step loss and LR, evaluations, wall time."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)  # each has "step"
    metrics: list[dict[str, float]] = field(default_factory=list)  # extra values from loss_fn
    seconds: float = 0.0
    examples: int = 0

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module | None
    history: History
    interrupted: bool = False

    @property
    def best_model(self) -> nn.Module:
        """The EMA copy when training kept one, else the model."""
        return self.ema if self.ema is not None else self.model


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def tensor_batches(data: Sequence[torch.Tensor], batch_size: int, seed: int) -> Callable[[int], Batch]:
    """A function step -> batch over tensors sharing dim 0, epoch-wise shuffled, reproducible from (seed, step)."""
    if not data or not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in data):
        raise ValueError("data must be a non-empty tuple of tensors sharing their first dimension, e.g. (images,)")
    n = data[0].shape[0]
    if any(t.shape[0] != n for t in data):
        raise ValueError(f"all data tensors must share their first dimension, got {[t.shape[0] for t in data]}")
    if n == 0:
        raise ValueError(f"data is empty: its tensors have 0 examples (shapes {[tuple(t.shape) for t in data]})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    cache: dict[int, torch.Tensor] = {}

    def batch(step: int) -> Batch:
        epoch, i = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=gen).to(data[0].device)
        idx = cache[epoch][i * batch_size:(i + 1) * batch_size]
        return tuple(t[idx] for t in data)

    return batch


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def distributed_setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this process: (1, 0, device) in a plain run; under torchrun (WORLD_SIZE
    > 1 in the environment) the process group is initialised if needed (NCCL for CUDA, else gloo) and a CUDA
    device becomes this process's GPU, cuda:LOCAL_RANK."""
    import torch.distributed as dist

    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return 1, 0, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size(), dist.get_rank(), device


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Batch], Any],
          data: Sequence[torch.Tensor] | Callable[[int], Batch], config: TrainConfig, *,
          eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
          device: str | torch.device | None = None, progress: bool = True,
          parameters: list[nn.Parameter] | None = None) -> TrainResult:
    """Train `model` for `config.steps` steps and return the model, its EMA copy and the history.

    With `config.checkpoint_dir` set, a checkpoint there is resumed exactly (weights, optimizer,
    LR schedule, RNG, data order) and a new one is written every `checkpoint_every` steps, at the
    end, and on Ctrl-C (which then returns what was trained so far instead of raising).
    `parameters` restricts optimisation to a subset (e.g. a linear probe on a frozen backbone).
    A fresh run seeds the global torch RNG with `config.seed` (loss_fn's noise draws come from it), so the
    same config gives the same run; a resumed run restores the saved RNG state instead.

    Resuming with a changed config: a finished run resumed with the same `steps` returns at once with
    the loaded weights and history (no second evaluation). A different `steps` (at least the step
    reached) re-plans the LR schedule: from the checkpoint's step s on, the LR is the one a fresh run
    with the new `steps` would use, lr · lr_factor(s, steps, warmup_steps, min_lr_ratio); so extending a
    finished 10-step run to 20 steps continues at half the peak LR (the cosine's midpoint), not at 0.
    `eval_every`, `checkpoint_every`, `checkpoint_dir`, `amp` and `channels_last` may change freely;
    any other difference (batch size, LR, warmup, seed, ...) raises a ValueError listing the fields.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not callable(data) and (isinstance(data, torch.Tensor) or not isinstance(data, (tuple, list))):
        raise TypeError(f"data must be a tuple of tensors sharing their first dimension, e.g. (images, labels) "
                        f"or (images,), or a callable step -> batch; got {type(data).__name__}")
    device = get_device(device)
    world, rank, device = distributed_setup(device)
    if world > 1 and config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {world} processes of this run")
    model.to(device)
    if config.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if callable(data):
        next_batch = data
    else:
        tensors = tuple(t.to(device) for t in data)
        next_batch = tensor_batches(tensors, config.batch_size, config.seed)
    if world > 1:  # every rank draws the same global batch and keeps its own contiguous slice
        global_batch, per_rank = next_batch, config.batch_size // world
        next_batch = lambda step: tuple(t[rank * per_rank:(rank + 1) * per_rank] for t in global_batch(step))  # noqa: E731

    params = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # weight decay on matrices (incl. embeddings), not biases/norms
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]],
                                  lr=config.lr, betas=config.betas, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup_steps, config.min_lr_ratio))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if config.ema_decay else None

    history, start = History(), 0
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if ckpt is not None and ((ckpt / "config.json").exists() or ckpt.with_name(ckpt.name + ".old").is_dir()):
        saved = read_config(ckpt)
        saved_config = saved["extra"].get("train_config")
        if saved_config is not None:
            _check_resumable(saved_config, config, ckpt)
        if saved["step"] > config.steps:
            raise ValueError(f"steps={config.steps} is below the {saved['step']} steps the checkpoint in "
                             f"{str(ckpt)!r} has already trained; pass steps >= {saved['step']}, or a new "
                             "checkpoint_dir for a shorter run")
        meta = load_checkpoint(ckpt, model, optimizer=optimizer, scheduler=scheduler, ema=ema)
        start = meta["step"]
        history = History(**meta["extra"].get("history", {}))
        saved_steps = saved_config["steps"] if saved_config is not None else config.steps
        if meta["extra"].get("finished", start >= saved_steps) and start == config.steps:
            model.eval()  # a finished run, resumed as it was: nothing more to train or evaluate
            return TrainResult(model=model, ema=ema, history=history, interrupted=False)
        if saved_steps != config.steps:  # re-plan the LR schedule for the new length (see the docstring)
            factor = lr_factor(start, config.steps, config.warmup_steps, config.min_lr_ratio)
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * factor
        rng = meta["rng"]
        if world > 1 and rng is not None and "per_rank" in rng:
            rng = rng["per_rank"][rank]  # this rank's own stream
        if rng is not None:
            _set_rng_state(rng, device)
    else:
        torch.manual_seed(config.seed + rank)  # ranks draw different noise (rank 0: the single-process stream)

    def checkpoint(step: int, rng: dict[str, Any] | None = None, finished: bool = False) -> None:
        if ckpt is None:
            return
        rng = rng if rng is not None else _rng_state(device)
        extra = {"train_config": asdict(config), "history": asdict(history), "finished": finished}
        if world > 1:  # every rank's random state, so that each resumes its own stream; rank 0 writes
            import torch.distributed as dist

            states: list[Any] = [None] * world
            dist.all_gather_object(states, {k: v.cpu() for k, v in rng.items()})
            rng = {**rng, "per_rank": states}
        if rank == 0:
            save_checkpoint(ckpt, model, step=step, optimizer=optimizer, scheduler=scheduler, ema=ema,
                            extra=extra, rng=rng)
        if world > 1:
            torch.distributed.barrier()  # nobody reads the folder before it is complete

    def record(step: int, loss: torch.Tensor, lr: float, extra: dict, batch: Any) -> None:
        if history.step and history.step[-1] == step:
            return  # already recorded
        history.step.append(step)
        if world > 1:  # the loss of the global batch: the mean of the ranks' equal-sized slices
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss = loss / world
        history.loss.append(loss.item())
        history.lr.append(lr)
        if extra:
            history.metrics.append({k: float(v) for k, v in extra.items()})
        history.examples += batch[0].shape[0] * world if isinstance(batch, (tuple, list)) else 0

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        target = ema if ema is not None else model
        was_training = target.training
        target.eval()
        with torch.no_grad():
            values = {k: float(v) for k, v in eval_fn(target).items()}
        target.train(was_training)
        history.evals.append({"step": step, **values})

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=config.amp and device.type == "cuda")
    model.train()
    trained = model
    if world > 1:  # DDP averages the gradients of the ranks in backward()
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step, interrupted = start, False
    completed = start  # steps whose update is in the weights
    rng_at = (start, None)  # (step, RNG state as that step began): what an exact resume restores
    pending = None  # an applied update not yet recorded in history
    bar = tqdm(total=config.steps, initial=start, disable=not progress or rank != 0, desc="train", leave=False)
    tic = time.perf_counter()
    try:
        for step in range(start, config.steps):
            rng_at = (step, _rng_state(device))
            batch = next_batch(step)
            with autocast:
                out = loss_fn(trained, batch)
            loss, extra = out if isinstance(out, tuple) else (out, {})
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower lr or check data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # the LR this step trains with
            optimizer.step()
            scheduler.step()
            if ema is not None:
                update_ema(ema, model, config.ema_decay)
            completed, pending = step + 1, (step, loss, lr, extra, batch)
            record(*pending)
            pending = None
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{history.loss[-1]:.4f}")
            if config.eval_every and completed % config.eval_every == 0 and completed < config.steps:
                evaluate(completed)
            if config.checkpoint_every and completed % config.checkpoint_every == 0 and completed < config.steps:
                history.seconds += time.perf_counter() - tic
                tic = time.perf_counter()
                checkpoint(completed)
        step = config.steps
    except KeyboardInterrupt:
        interrupted = True
        if pending is not None:
            record(*pending)  # the update was applied before the interrupt: count it
        step = completed
        # Resume must replay the interrupted step from the RNG state it began with; if no step had begun
        # since the last completed one, no randomness was consumed since, and the live state is right.
        rng = rng_at[1] if rng_at[0] == completed and rng_at[1] is not None else _rng_state(device)
        history.seconds += time.perf_counter() - tic
        tic = time.perf_counter()
        checkpoint(step, rng)
        print(f"Interrupted at step {step}; " + (f"checkpoint saved to {ckpt}." if ckpt else
                                                 "set checkpoint_dir to keep progress across interruptions."))
    finally:
        bar.close()
    history.seconds += time.perf_counter() - tic
    if not interrupted:
        evaluate(step)
        checkpoint(step, finished=True)
    model.eval()
    return TrainResult(model=model, ema=ema, history=history, interrupted=interrupted)
