"""Training throughput of vitdiff's MMDiT against diffusers' SD3Transformer2DModel with the same configuration.

Both models get the same weights (`vitdiff.interop.mmdit_from_diffusers`), so they compute the same function;
the benchmark times forward + backward (mean squared error to a random target, as the flow-matching loss) in
images per second and prints the ratio vitdiff / diffusers. vitdiff runs without a text mask here, as diffusers
has none. Run `python bench/mmdit_throughput.py --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch import nn
from tqdm.auto import tqdm

from vitdiff.interop import mmdit_from_diffusers

# name -> (SD3Transformer2DModel configuration, text tokens M, default batch on CPU, default batch on CUDA)
CONFIGS = {
    "small16": (dict(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=64,
                     num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=256,
                     pooled_projection_dim=128, out_channels=4, pos_embed_max_size=None, qk_norm=None), 16, 16, 256),
    "small16-qk": (dict(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=64,
                        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=256,
                        pooled_projection_dim=128, out_channels=4, pos_embed_max_size=32, qk_norm="rms_norm"),
                   16, 16, 256),
    "B2-32": (dict(sample_size=32, patch_size=2, in_channels=16, num_layers=12, attention_head_dim=64,
                   num_attention_heads=12, joint_attention_dim=1024, caption_projection_dim=768,
                   pooled_projection_dim=768, out_channels=16, pos_embed_max_size=64, qk_norm="rms_norm"), 77, 2, 128),
    "sd3-medium-64": (dict(sample_size=64, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                           num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                           pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm=None),
                      154, 1, 16),
}
DEFAULT_CONFIGS = {"cpu": "small16,small16-qk", "cuda": "small16,B2-32,sd3-medium-64"}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
         pooled: torch.Tensor) -> torch.Tensor:
    """One forward pass with either calling convention."""
    if isinstance(model, SD3Transformer2DModel):
        return model(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
    return model(x, t, context, pooled)


def train_steps(model: nn.Module, batch: tuple[torch.Tensor, ...], steps: int, amp: bool) -> None:
    """`steps` forward + backward passes (gradients cleared each time, no optimizer update)."""
    *inputs, target = batch
    autocast = torch.autocast(target.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = F.mse_loss(call(model, *inputs).float(), target)
        loss.backward()


def images_per_second(model: nn.Module, batch: tuple[torch.Tensor, ...], steps: int, amp: bool) -> float:
    """Throughput of one timed run of `steps` training passes."""
    device = batch[0].device
    synchronize(device)
    start = time.perf_counter()
    train_steps(model, batch, steps, amp)
    synchronize(device)
    return batch[0].shape[0] * steps / (time.perf_counter() - start)


def bench_config(name: str, device: torch.device, batch_size: int | None, steps: int, repeats: int,
                 warmup: int, amp: bool) -> dict:
    """Median images/s of vitdiff and diffusers for one configuration; repeats alternate between the two."""
    config, tokens, cpu_batch, cuda_batch = CONFIGS[name]
    b = batch_size or (cuda_batch if device.type == "cuda" else cpu_batch)
    torch.manual_seed(0)
    theirs = SD3Transformer2DModel(**config).to(device)
    with torch.no_grad():  # the zero-initialised output layers would make the check below trivial
        for p in theirs.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    ours = mmdit_from_diffusers(theirs)
    size, channels = config["sample_size"], config["in_channels"]
    x = torch.randn(b, channels, size, size, device=device)
    t = 1000 * torch.rand(b, device=device)
    context = torch.randn(b, tokens, config["joint_attention_dim"], device=device)
    pooled = torch.randn(b, config["pooled_projection_dim"], device=device)
    target = torch.randn(b, config["out_channels"], size, size, device=device)
    with torch.no_grad():  # same weights, same function: check once in eval mode
        max_diff = (call(ours.eval(), x, t, context, pooled) - call(theirs.eval(), x, t, context, pooled)).abs().max()
    ours.train(), theirs.train()

    batch = (x, t, context, pooled, target)
    for model in (ours, theirs):
        train_steps(model, batch, warmup, amp)
    rates = {"vitdiff": [], "diffusers": []}
    for _ in tqdm(range(repeats), desc=name, leave=False):
        rates["vitdiff"].append(images_per_second(ours, batch, steps, amp))
        rates["diffusers"].append(images_per_second(theirs, batch, steps, amp))
    ours_rate, their_rate = statistics.median(rates["vitdiff"]), statistics.median(rates["diffusers"])
    return dict(config=name, batch=b, tokens=f"{(size // config['patch_size']) ** 2}+{tokens}",
                params=sum(p.numel() for p in ours.parameters()), vitdiff=ours_rate, diffusers=their_rate,
                ratio=ours_rate / their_rate, max_diff=max_diff.item())


def print_table(rows: list[dict], device: torch.device, amp: bool) -> None:
    """A plain-text table: one row per configuration."""
    precision = "bf16 autocast" if amp else "float32"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\nMMDiT forward+backward throughput on {device.type}{threads}, {precision} (median images/s)")
    header = f"{'config':<13} {'params':>7} {'batch':>5} {'tokens':>7} {'vitdiff':>9} {'diffusers':>9} " \
             f"{'vitdiff/diffusers':>17} {'max|Δout|':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<13} {r['params'] / 1e6:>6.1f}M {r['batch']:>5} {r['tokens']:>7} {r['vitdiff']:>9.1f} "
              f"{r['diffusers']:>9.1f} {r['ratio']:>17.3f} {r['max_diff']:>9.1e}")


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
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off for CPU)")
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
    amp = args.amp if args.amp is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    rows = [bench_config(name, device, args.batch_size, steps, args.repeats, args.warmup, amp) for name in names]
    print_table(rows, device, amp)


if __name__ == "__main__":
    main()
