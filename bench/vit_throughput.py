"""Training throughput of vitdiff's ViT against timm's VisionTransformer with the same configuration.

Both models get the same weights (`vitdiff.interop.vit_from_timm`), so they compute the same function;
the benchmark times forward + backward (cross-entropy on random labels) in images per second and
prints the ratio vitdiff / timm. Run `python bench/vit_throughput.py --help` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm.auto import tqdm

from vitdiff.interop import vit_from_timm

# name -> (model configuration, default batch size on CPU, default batch size on CUDA)
CONFIGS = {
    "tiny32": (dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=10), 16, 256),
    "small16-224": (dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000),
                    2, 128),
    "base16-224": (dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000),
                   1, 64),
}
DEFAULT_CONFIGS = {"cpu": "tiny32,small16-224", "cuda": "tiny32,small16-224,base16-224"}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, amp: bool) -> None:
    """`steps` forward + backward passes (gradients cleared each time, no optimizer update)."""
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()


def images_per_second(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
                      amp: bool) -> float:
    """Throughput of one timed run of `steps` training passes."""
    synchronize(images.device)
    start = time.perf_counter()
    train_steps(model, images, labels, steps, amp)
    synchronize(images.device)
    return images.shape[0] * steps / (time.perf_counter() - start)


def bench_config(name: str, device: torch.device, batch_size: int | None, steps: int, repeats: int,
                 warmup: int, amp: bool) -> dict:
    """Median images/s of vitdiff and timm for one configuration; repeats alternate between the two."""
    config, cpu_batch, cuda_batch = CONFIGS[name]
    batch = batch_size or (cuda_batch if device.type == "cuda" else cpu_batch)
    torch.manual_seed(0)
    theirs = VisionTransformer(**config).to(device)
    ours = vit_from_timm(theirs)
    images = torch.randn(batch, 3, config["img_size"], config["img_size"], device=device)
    labels = torch.randint(0, config["num_classes"], (batch,), device=device)
    with torch.no_grad():  # same weights, same function: check once in eval mode
        max_diff = (ours.eval()(images) - theirs.eval()(images)).abs().max().item()
    ours.train(), theirs.train()

    for model in (ours, theirs):
        train_steps(model, images, labels, warmup, amp)
    rates = {"vitdiff": [], "timm": []}
    for _ in tqdm(range(repeats), desc=name, leave=False):
        rates["vitdiff"].append(images_per_second(ours, images, labels, steps, amp))
        rates["timm"].append(images_per_second(theirs, images, labels, steps, amp))
    ours_rate, timm_rate = statistics.median(rates["vitdiff"]), statistics.median(rates["timm"])
    return dict(config=name, batch=batch, tokens=ours.pos_embed.shape[1], vitdiff=ours_rate, timm=timm_rate,
                ratio=ours_rate / timm_rate, max_diff=max_diff)


def print_table(rows: list[dict], device: torch.device, amp: bool) -> None:
    """A plain-text table: one row per configuration."""
    precision = "bf16 autocast" if amp else "float32"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\nViT forward+backward throughput on {device.type}{threads}, {precision} (median images/s)")
    header = f"{'config':<13} {'batch':>5} {'tokens':>6} {'vitdiff':>10} {'timm':>10} {'vitdiff/timm':>12} " \
             f"{'max|Δlogit|':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<13} {r['batch']:>5} {r['tokens']:>6} {r['vitdiff']:>10.1f} {r['timm']:>10.1f} "
              f"{r['ratio']:>12.3f} {r['max_diff']:>11.1e}")


def main() -> None:
    """Parse the command line, run every requested configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated names from {sorted(CONFIGS)} (default: {DEFAULT_CONFIGS})")
    parser.add_argument("--batch-size", type=int, default=None, help="override each config's batch size")
    parser.add_argument("--steps", type=int, default=None, help="training passes per timed run "
                        "(default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per model before timing")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (meant for CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (args.configs or DEFAULT_CONFIGS.get(device.type, DEFAULT_CONFIGS["cpu"])).split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    for value, flag in ((args.batch_size, "--batch-size"), (args.steps, "--steps"), (args.repeats, "--repeats")):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    steps = args.steps or (20 if device.type == "cuda" else 3)

    rows = [bench_config(name, device, args.batch_size, steps, args.repeats, args.warmup, args.amp)
            for name in names]
    print_table(rows, device, args.amp)


if __name__ == "__main__":
    main()
