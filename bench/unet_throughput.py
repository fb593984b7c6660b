"""Training throughput of vitdiff's U-Net against diffusers' UNet2DConditionModel at the closest configuration.

The two U-Nets are not the same function (diffusers' blocks differ in details: a projection in and out of
each transformer, GEGLU feed-forward, two resnets per up level like ours but with other skip wiring), so the
weights are not shared; each configuration gives both the same widths, levels, resnets per level,
cross-attention levels and text width, and the table prints both parameter counts beside the images/s
ratio. Forward + backward of a mean squared error, as in the other benchmarks. `--help` for the options.
"""

from __future__ import annotations

import _ratio_bench  # bench/ is on sys.path when a script here runs
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from vitdiff.unet import UNet

# name -> (shared configuration, default batch on CPU, default batch on CUDA)
CONFIGS = {
    "small32": (dict(size=32, in_channels=4, base=64, mult=(1, 2, 2), blocks=1, attention=(1, 2), heads=4,
                     context_dim=128, tokens=16), 8, 256),
    "sd-like32": (dict(size=32, in_channels=4, base=128, mult=(1, 2, 4), blocks=2, attention=(0, 1, 2), heads=8,
                       context_dim=768, tokens=77), 2, 64),
}
DEFAULT_CONFIGS = {"cpu": "small32", "cuda": "small32,sd-like32"}


def build_pair(c: dict) -> tuple[nn.Module, nn.Module]:
    """(vitdiff UNet, diffusers UNet2DConditionModel) with the same widths, levels and attention levels."""
    ours = UNet(in_channels=c["in_channels"], base_channels=c["base"], channel_mult=c["mult"],
                num_res_blocks=c["blocks"], attention_resolutions=c["attention"], num_heads=c["heads"],
                context_dim=c["context_dim"], groups=32)
    levels = range(len(c["mult"]))
    theirs = UNet2DConditionModel(
        sample_size=c["size"], in_channels=c["in_channels"], out_channels=c["in_channels"],
        block_out_channels=tuple(c["base"] * m for m in c["mult"]), layers_per_block=c["blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if i in c["attention"] else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in c["attention"] else "UpBlock2D" for i in reversed(levels)),
        cross_attention_dim=c["context_dim"], attention_head_dim=c["heads"], norm_num_groups=32)
    return ours, theirs


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One forward pass with either calling convention."""
    if isinstance(model, UNet2DConditionModel):
        return model(x, t, encoder_hidden_states=context).sample
    return model(x, t, context=context)


def bench_config(name: str, device: torch.device, batch_size: int | None, steps: int, repeats: int,
                 warmup: int, amp: bool, compile_models: bool = False) -> dict:
    """Median images/s of both U-Nets for one configuration; repeats alternate between the two."""
    c, cpu_batch, cuda_batch = CONFIGS[name]
    b = batch_size or (cuda_batch if device.type == "cuda" else cpu_batch)
    torch.manual_seed(0)
    ours, theirs = (m.to(device) for m in build_pair(c))
    if device.type == "cuda":  # channels-last helps convolutions on tensor cores; both get it
        ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
    x = torch.randn(b, c["in_channels"], c["size"], c["size"], device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    context = torch.randn(b, c["tokens"], c["context_dim"], device=device)
    target = torch.randn_like(x)
    flops = {key: _ratio_bench.training_flops(lambda m=m: call(m, x[:1], t[:1], context[:1]))
             for key, m in (("vitdiff", ours), ("diffusers", theirs))}
    params = {"vitdiff": sum(p.numel() for p in ours.parameters()),
              "diffusers": sum(p.numel() for p in theirs.parameters())}
    if compile_models:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    batch = (x, t, context, target)
    rates = _ratio_bench.median_rates({"vitdiff": ours, "diffusers": theirs}, call, batch, steps, repeats, warmup,
                                      amp, desc=name)
    ours_rate, their_rate = rates["vitdiff"], rates["diffusers"]
    print(f"{name}: parameters vitdiff {params['vitdiff'] / 1e6:.2f}M, diffusers {params['diffusers'] / 1e6:.2f}M; "
          f"training GFLOP/image vitdiff {flops['vitdiff'] / 1e9:.2f}, diffusers {flops['diffusers'] / 1e9:.2f}")
    return dict(config=name, batch=b, tokens=f"{c['size']}²", params=params["vitdiff"], vitdiff=ours_rate,
                diffusers=their_rate, ratio=ours_rate / their_rate, train_flops=flops["vitdiff"],
                max_diff=float("nan"))


def main() -> None:
    """Parse the command line, run every requested configuration and print the table."""
    _ratio_bench.run(__doc__.splitlines()[0], "U-Net (different weights, see params above)", CONFIGS,
                     DEFAULT_CONFIGS, bench_config, width=10)


if __name__ == "__main__":
    main()
