"""Training throughput of vitdiff's DiT against diffusers' DiTTransformer2DModel with the same configuration.

Both models get the same weights (`vitdiff.interop.dit_from_diffusers`), so they compute the same function;
the benchmark times forward + backward (mean squared error to a random target, as the denoising loss) in
images per second and prints the ratio vitdiff / diffusers. Run `python bench/dit_throughput.py --help`.
"""

from __future__ import annotations

import _ratio_bench  # bench/ is on sys.path when a script here runs
import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from vitdiff.interop import dit_from_diffusers

# name -> (DiT configuration, default batch size on CPU, default batch size on CUDA)
CONFIGS = {
    "small16": (dict(input_size=16, patch_size=2, in_channels=4, hidden_size=256, depth=4, num_heads=4,
                     num_classes=10), 32, 256),
    "B2-32": (dict(input_size=32, patch_size=2, in_channels=4, hidden_size=768, depth=12, num_heads=12,
                   num_classes=1000), 4, 128),
    "XL2-32": (dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                    num_classes=1000), 1, 64),
}
DEFAULT_CONFIGS = {"cpu": "small16", "cuda": "small16,B2-32,XL2-32"}


def diffusers_dit(config: dict) -> nn.Module:
    """A diffusers DiT (learn_sigma: 2C outputs) whose blocks share one timestep/label embedder, as checkpoints do."""
    model = DiTTransformer2DModel(
        num_attention_heads=config["num_heads"], attention_head_dim=config["hidden_size"] // config["num_heads"],
        in_channels=config["in_channels"], out_channels=2 * config["in_channels"], num_layers=config["depth"],
        sample_size=config["input_size"], patch_size=config["patch_size"], num_embeds_ada_norm=config["num_classes"])
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    return model


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One forward pass with either calling convention."""
    if isinstance(model, DiTTransformer2DModel):
        return model(x, timestep=t, class_labels=y).sample
    return model(x, t, y)


def bench_config(name: str, device: torch.device, batch_size: int | None, steps: int, repeats: int,
                 warmup: int, amp: bool, compile_models: bool = False) -> dict:
    """Median images/s of vitdiff and diffusers for one configuration; repeats alternate between the two."""
    config, cpu_batch, cuda_batch = CONFIGS[name]
    b = batch_size or (cuda_batch if device.type == "cuda" else cpu_batch)
    torch.manual_seed(0)
    theirs = diffusers_dit(config).to(device)
    ours = dit_from_diffusers(theirs)
    size, channels = config["input_size"], config["in_channels"]
    x = torch.randn(b, channels, size, size, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    y = torch.randint(0, config["num_classes"], (b,), device=device)
    target = torch.randn(b, 2 * channels, size, size, device=device)
    with torch.no_grad():  # same weights, same function: check once in eval mode
        max_diff = (call(ours.eval(), x, t, y) - call(theirs.eval(), x, t, y)).abs().max().item()
    ours.train(), theirs.train()
    train_flops = _ratio_bench.training_flops(lambda: call(ours, x[:1], t[:1], y[:1]))
    if compile_models:
        ours, theirs = torch.compile(ours), torch.compile(theirs)

    batch = (x, t, y, target)
    rates = _ratio_bench.median_rates({"vitdiff": ours, "diffusers": theirs}, call, batch, steps, repeats, warmup,
                                      amp, desc=name)
    ours_rate, their_rate = rates["vitdiff"], rates["diffusers"]
    return dict(config=name, batch=b, tokens=ours.pos_embed.shape[1], params=sum(p.numel() for p in ours.parameters()),
                vitdiff=ours_rate, diffusers=their_rate, ratio=ours_rate / their_rate,
                train_flops=train_flops, max_diff=max_diff)


def main() -> None:
    """Parse the command line, run every requested configuration and print the table."""
    _ratio_bench.run(__doc__.splitlines()[0], "DiT", CONFIGS, DEFAULT_CONFIGS, bench_config, width=8)


if __name__ == "__main__":
    main()
