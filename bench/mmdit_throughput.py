"""Training throughput of vitdiff's MMDiT against diffusers' SD3Transformer2DModel with the same configuration.

Both models get the same weights (`vitdiff.interop.mmdit_from_diffusers`), so they compute the same function;
the benchmark times forward + backward (mean squared error to a random target, as the flow-matching loss) in
images per second and prints the ratio vitdiff / diffusers. vitdiff runs without a text mask here, as diffusers
has none. Run `python bench/mmdit_throughput.py --help`.
"""

from __future__ import annotations

import _ratio_bench  # bench/ is on sys.path when a script here runs
import torch
from diffusers import SD3Transformer2DModel
from torch import nn

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


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
         pooled: torch.Tensor) -> torch.Tensor:
    """One forward pass with either calling convention."""
    if isinstance(model, SD3Transformer2DModel):
        return model(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
    return model(x, t, context, pooled)


def bench_config(name: str, device: torch.device, batch_size: int | None, steps: int, repeats: int,
                 warmup: int, amp: bool, compile_models: bool = False) -> dict:
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
    train_flops = _ratio_bench.training_flops(lambda: call(ours, x[:1], t[:1], context[:1], pooled[:1]))
    if compile_models:
        ours, theirs = torch.compile(ours), torch.compile(theirs)

    batch = (x, t, context, pooled, target)
    rates = _ratio_bench.median_rates({"vitdiff": ours, "diffusers": theirs}, call, batch, steps, repeats, warmup,
                                      amp, desc=name)
    ours_rate, their_rate = rates["vitdiff"], rates["diffusers"]
    return dict(config=name, batch=b, tokens=f"{(size // config['patch_size']) ** 2}+{tokens}",
                params=sum(p.numel() for p in ours.parameters()), vitdiff=ours_rate, diffusers=their_rate,
                ratio=ours_rate / their_rate, train_flops=train_flops, max_diff=max_diff.item())


def main() -> None:
    """Parse the command line, run every requested configuration and print the table."""
    _ratio_bench.run(__doc__.splitlines()[0], "MMDiT", CONFIGS, DEFAULT_CONFIGS, bench_config, width=13)


if __name__ == "__main__":
    main()
