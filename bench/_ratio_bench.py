"""The command line and the ratio table shared by the vitdiff-vs-diffusers throughput benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

# Dense bf16 tensor-core peak (TFLOP/s) of the GPUs this book is refreshed on, from NVIDIA's data sheets (SXM).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def training_flops(forward_one: Callable[[], torch.Tensor]) -> float:
    """Model FLOPs of one training pass for one image: 3 x the forward FLOPs (backward = 2 x forward),
    counted by torch's FlopCounterMode (matrix products and attention; elementwise work is not counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward_one()
    return 3.0 * counter.get_total_flops()


def median_rates(models: dict[str, nn.Module], call: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, ...],
                 steps: int, repeats: int, warmup: int, amp: bool, desc: str = "") -> dict[str, float]:
    """Median images/s of forward + backward passes (MSE of call(model, *inputs) to the batch's last tensor,
    gradients cleared each pass, no optimizer update) for each model; `warmup` untimed passes first, then
    `repeats` timed runs of `steps` passes, alternating between the models so that a change in load hits all."""
    *inputs, target = batch
    autocast = torch.autocast(target.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def passes(model: nn.Module, n: int) -> None:
        for _ in range(n):
            model.zero_grad(set_to_none=True)
            with autocast:
                loss = F.mse_loss(call(model, *inputs).float(), target)
            loss.backward()

    def synchronize() -> None:  # wait for queued GPU work so that wall-clock time measures it
        if target.device.type == "cuda":
            torch.cuda.synchronize(target.device)

    for model in models.values():
        passes(model, warmup)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, model in models.items():
            synchronize()
            start = time.perf_counter()
            passes(model, steps)
            synchronize()
            rates[name].append(target.shape[0] * steps / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def peak_tflops(device: torch.device) -> float | None:
    """The device's bf16 peak from PEAK_BF16_TFLOPS, or None for an unknown device or the CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def print_table(title: str, rows: list[dict], device: torch.device, amp: bool, width: int = 8,
                peak: float | None = None, compiled: bool = False) -> None:
    """A plain-text table, one row per configuration: params, batch, tokens, images/s of both, their ratio,
    and with a known `peak` (TFLOP/s) the model-FLOPs utilisation (MFU) of each."""
    precision = ("bf16 autocast" if amp else "float32") + (", torch.compile" if compiled else "")
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\n{title} forward+backward throughput on {device.type}{threads}, {precision} (median images/s)")
    header = f"{'config':<{width}} {'params':>7} {'batch':>5} {'tokens':>7} {'vitdiff':>9} {'diffusers':>9} " \
             f"{'vitdiff/diffusers':>17} {'max|Δout|':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<{width}} {r['params'] / 1e6:>6.1f}M {r['batch']:>5} {str(r['tokens']):>7} "
              f"{r['vitdiff']:>9.1f} {r['diffusers']:>9.1f} {r['ratio']:>17.3f} {r['max_diff']:>9.1e}")
    if peak:
        print(f"\nmodel-FLOPs utilisation (MFU) = images/s x training FLOPs per image / {peak:g} TFLOP/s (bf16 peak)")
        for r in rows:
            flops = r["train_flops"]
            mfu = {k: r[k] * flops / (peak * 1e12) for k in ("vitdiff", "diffusers")}
            print(f"{r['config']:<{width}} {flops / 1e9:8.2f} GFLOP/image  MFU vitdiff {100 * mfu['vitdiff']:5.1f}%  "
                  f"diffusers {100 * mfu['diffusers']:5.1f}%")


def run(description: str, title: str, configs: dict, default_configs: dict[str, str],
        bench_config: Callable[..., dict], width: int = 8) -> None:
    """Parse the command line, run bench_config(name, device, batch_size, steps, repeats, warmup, amp) for every
    requested configuration and print the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated names from {sorted(configs)} (default: {default_configs})")
    parser.add_argument("--batch-size", type=int, default=None, help="override each config's batch size")
    parser.add_argument("--steps", type=int, default=None, help="training passes per timed run "
                        "(default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per model before timing")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off for CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models before timing")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's bf16 peak for the MFU column (default: known H100/H200/A100 values)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (args.configs or default_configs.get(device.type, default_configs["cpu"])).split(",")
    unknown = [n for n in names if n not in configs]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(configs)}")
    for value, flag in ((args.batch_size, "--batch-size"), (args.steps, "--steps"), (args.repeats, "--repeats")):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    steps = args.steps or (20 if device.type == "cuda" else 3)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = [bench_config(name, device, args.batch_size, steps, args.repeats, args.warmup, amp, args.compile)
            for name in names]
    print_table(title, rows, device, amp, width, args.peak_tflops or peak_tflops(device), args.compile)
