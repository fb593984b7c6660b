"""Bad input at the public API: a ValueError/TypeError that names the argument and the value received.

Each probe is a plausible mistake that used to give a silent NaN, a silently wrong model, or an error
from deep inside torch. The regex of every probe names the argument (and usually the value).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from vitdiff.budget import get_device
from vitdiff.data import Shapes, load_dataset, render_shapes
from vitdiff.diffusion import (
    NoiseSchedule,
    classifier_free_guidance,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    diffusion_loss,
    img2img_start,
)
from vitdiff.layers import Attention, PatchEmbed, patchify, timestep_embedding, unpatchify
from vitdiff.metrics import confusion_matrix, predict
from vitdiff.plot import image_grid, patch_grid
from vitdiff.text import TextEncoder, Tokenizer
from vitdiff.train import TrainConfig, train
from vitdiff.unet import UNet
from vitdiff.vae import VAE, vae_loss
from vitdiff.vit import ViT, attention_rollout

NAN, INF = float("nan"), float("inf")
SCHEDULE = NoiseSchedule(10)
TINY_UNET = dict(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), groups=4)
TINY_VIT = dict(img_size=8, patch_size=4, embed_dim=8, num_heads=2, depth=1)
TINY_VAE = dict(base_channels=4, channel_mult=(1,), groups=1)


def zero_model(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    return torch.zeros_like(x)


def guided_with_mask_none():
    uncond = {"context": torch.zeros(1, 3, 4), "context_mask": torch.ones(1, 3, dtype=torch.bool)}
    guided = classifier_free_guidance(zero_model, 2.0, uncond)
    return guided(torch.zeros(2, 1, 2, 2), torch.tensor(1), context=torch.zeros(2, 3, 4), context_mask=None)


def sample_from_meta_x_T():
    """A sample started on another device than the schedule ("meta" stands in for CUDA on a CPU-only machine)."""
    return ddim_sample(zero_model, SCHEDULE, (1, 1, 2, 2), steps=2, x_T=torch.zeros(1, 1, 2, 2, device="meta"),
                       progress=False)


def sample_with_meta_model():
    return ddpm_sample(nn.Linear(2, 2).to("meta"), SCHEDULE, (1, 2), progress=False)


def unet_at(t) -> torch.Tensor:
    return UNet(**TINY_UNET)(torch.zeros(1, 1, 4, 4), t)


def train_on(data) -> object:
    return train(nn.Linear(2, 1), lambda m, b: m(b[0]).sum(), data, TrainConfig(steps=1), progress=False)


PROBES = {
    # silent NaN before
    "ddim_sample eta=nan": (lambda: ddim_sample(zero_model, SCHEDULE, (1, 1, 2, 2), steps=2, eta=NAN,
                                                progress=False), ValueError, r"eta must .*got nan"),
    "ddim_step eta=inf": (lambda: ddim_step(SCHEDULE, torch.zeros(1), 5, 4, torch.zeros(1), eta=INF),
                          ValueError, r"eta must .*got inf"),
    "guidance scale=nan": (lambda: classifier_free_guidance(zero_model, NAN, {"y": torch.zeros(1)}),
                           ValueError, r"scale must be a finite number.*got nan"),
    "vae_loss beta=nan": (lambda: vae_loss(VAE(**TINY_VAE), torch.zeros(1, 1, 4, 4), beta=NAN),
                          ValueError, r"beta must .*got nan"),
    "vae_loss empty batch": (lambda: vae_loss(VAE(**TINY_VAE), torch.zeros(0, 1, 4, 4)),
                             ValueError, r"batch must .*non-empty.*\(0, 1, 4, 4\)"),
    "diffusion_loss empty batch": (lambda: diffusion_loss(zero_model, SCHEDULE, torch.zeros(0, 1, 2, 2)),
                                   ValueError, r"x0 must be a non-empty batch.*\(0, 1, 2, 2\)"),
    # silently wrong before
    "UNet num_res_blocks=-1": (lambda: UNet(num_res_blocks=-1), ValueError, r"num_res_blocks must .*got -1"),
    "UNet out_channels=0": (lambda: UNet(out_channels=0), ValueError, r"out_channels must .*got 0"),
    "UNet dropout=1.0": (lambda: UNet(dropout=1.0), ValueError, r"dropout must .*got 1\.0"),
    "UNet context_dim=-8": (lambda: UNet(context_dim=-8), ValueError, r"context_dim must .*got -8"),
    "UNet t=5000": (lambda: unet_at(torch.tensor([5000])), ValueError, r"t must hold timesteps in \[0, 1000\].*5000"),
    "UNet t=-3": (lambda: unet_at(-3), ValueError, r"t must hold timesteps in \[0, 1000\].*-3"),
    "UNet t=nan": (lambda: unet_at(torch.tensor([NAN])), ValueError, r"t must hold timesteps.*nan"),
    "UNet t=True": (lambda: unet_at(torch.tensor([True])), TypeError, r"t must hold numeric timesteps.*bool"),
    "ViT depth=-1": (lambda: ViT(**{**TINY_VIT, "depth": -1}), ValueError, r"depth must .*got -1"),
    "ViT num_classes=-3": (lambda: ViT(**TINY_VIT, num_classes=-3), ValueError, r"num_classes must .*got -3"),
    "ViT mlp_ratio=0": (lambda: ViT(**TINY_VIT, mlp_ratio=0), ValueError, r"mlp_ratio must .*got 0"),
    "TrainConfig grad_clip=-1": (lambda: TrainConfig(steps=1, grad_clip=-1), ValueError, r"grad_clip must .*got -1"),
    "TrainConfig grad_clip=0": (lambda: TrainConfig(steps=1, grad_clip=0), ValueError, r"grad_clip must .*None"),
    "TrainConfig lr=nan": (lambda: TrainConfig(steps=1, lr=NAN), ValueError, r"lr must .*got nan"),
    "TrainConfig lr=inf": (lambda: TrainConfig(steps=1, lr=INF), ValueError, r"lr must .*got inf"),
    "TrainConfig min_lr_ratio=2": (lambda: TrainConfig(steps=1, min_lr_ratio=2), ValueError,
                                   r"min_lr_ratio must .*got 2"),
    "TrainConfig min_lr_ratio=nan": (lambda: TrainConfig(steps=1, min_lr_ratio=NAN), ValueError,
                                     r"min_lr_ratio must .*got nan"),
    "TrainConfig eval_every=-1": (lambda: TrainConfig(steps=1, eval_every=-1), ValueError, r"eval_every must .*-1"),
    "TrainConfig checkpoint_every=1.5": (lambda: TrainConfig(steps=1, checkpoint_every=1.5), ValueError,
                                         r"checkpoint_every must .*got 1\.5"),
    "TrainConfig weight_decay=-0.1": (lambda: TrainConfig(steps=1, weight_decay=-0.1), ValueError,
                                      r"weight_decay must .*-0\.1"),
    "TrainConfig betas=(0.9, 1.0)": (lambda: TrainConfig(steps=1, betas=(0.9, 1.0)), ValueError,
                                     r"betas must .*\(0\.9, 1\.0\)"),
    "TrainConfig steps=True": (lambda: TrainConfig(steps=True), ValueError, r"steps must .*got True"),
    "TrainConfig seed=-1": (lambda: TrainConfig(steps=1, seed=-1), ValueError, r"seed must .*got -1"),
    "TrainConfig amp='yes'": (lambda: TrainConfig(steps=1, amp="yes"), ValueError, r"amp must .*'yes'"),
    # obscure crashes before
    "guidance context_mask=None": (guided_with_mask_none, ValueError, r"\['context_mask'\] are in uncond"),
    "guidance uncond value not a tensor": (lambda: classifier_free_guidance(zero_model, 1.0, {"y": [0]}),
                                           TypeError, r"uncond\['y'\] must be a tensor.*\[0\]"),
    "TextEncoder empty batch": (lambda: TextEncoder(5, 4, dim=8, num_heads=2)(torch.zeros(0, 4, dtype=torch.long)),
                                ValueError, r"ids must hold at least one caption.*\(0, 4\)"),
    "TextEncoder dim=0": (lambda: TextEncoder(5, 4, dim=0), ValueError, r"dim must .*got 0"),
    "Tokenizer.encode(None)": (lambda: Tokenizer(["a"]).encode(None), TypeError, r"texts must .*NoneType"),
    "Tokenizer.encode([])": (lambda: Tokenizer(["a"]).encode([]), ValueError, r"texts is an empty list"),
    "Tokenizer.encode([1])": (lambda: Tokenizer(["a"]).encode([1]), TypeError, r"texts must hold strings.*int"),
    "Tokenizer('red green')": (lambda: Tokenizer("red green"), TypeError, r"vocabulary must be a list.*'red green'"),
    "Tokenizer.from_texts('a b')": (lambda: Tokenizer.from_texts("a b"), TypeError, r"texts must be a list.*'a b'"),
    "Shapes img_size=30.0": (lambda: Shapes(img_size=30.0), ValueError, r"img_size must be an int.*got 30\.0"),
    "render_shapes img_size=16.0": (lambda: render_shapes([[0, 0, 0]], img_size=16.0), ValueError,
                                    r"img_size must be an int.*16\.0"),
    "patchify patch_size=0": (lambda: patchify(torch.zeros(1, 1, 4, 4), 0), ValueError, r"patch_size must .*got 0"),
    "patchify 3-D x": (lambda: patchify(torch.zeros(1, 4, 4), 2), ValueError, r"x of shape \(B, C, H, W\).*\(1, 4"),
    "unpatchify 2-D x": (lambda: unpatchify(torch.zeros(4, 4), 2, 1), ValueError, r"x of shape \(B, N.*\(4, 4\)"),
    "unpatchify channels=0": (lambda: unpatchify(torch.zeros(1, 4, 4), 2, 0), ValueError, r"channels must .*got 0"),
    "PatchEmbed in_chans=0": (lambda: PatchEmbed(8, 4, in_chans=0), ValueError, r"in_chans must .*got 0"),
    "Attention dim=0": (lambda: Attention(0, num_heads=1), ValueError, r"dim must .*got 0"),
    "timestep_embedding dim=0": (lambda: timestep_embedding(torch.zeros(2), 0), ValueError, r"dim must .*got 0"),
    "train on empty data": (lambda: train_on((torch.zeros(0, 2),)), ValueError, r"data is empty.*\(0, 2\)"),
    "train on a bare tensor": (lambda: train_on(torch.zeros(4, 2)), TypeError, r"data must be a tuple.*Tensor"),
    "train on no tensors": (lambda: train_on(()), ValueError, r"data must be a non-empty tuple of tensors"),
    "attention_rollout mismatched T": (lambda: attention_rollout([torch.rand(1, 2, 5, 5), torch.rand(1, 2, 3, 3)]),
                                       ValueError, r"maps must .*maps\[1\] is \(1, 2, 3, 3\)"),
    "CUDA-like x_T, CPU schedule": (sample_from_meta_x_T, ValueError, r"x_T is on meta but the schedule is on cpu"),
    "CUDA-like model, CPU schedule": (sample_with_meta_model, ValueError, r"model is on meta but the schedule"),
    "sampler shape with 0": (lambda: ddpm_sample(zero_model, SCHEDULE, (0, 1, 2, 2), progress=False), ValueError,
                             r"shape must be a tuple of positive ints.*\(0, 1, 2, 2\)"),
    "img2img strength=nan": (lambda: img2img_start(SCHEDULE, torch.zeros(1, 1), NAN), ValueError,
                             r"strength must .*got nan"),
    "VAE scaling_factor=inf": (lambda: VAE(**TINY_VAE, scaling_factor=INF), ValueError,
                               r"scaling_factor must .*got inf"),
    "VAE groups=0": (lambda: VAE(base_channels=4, channel_mult=(1,), groups=0), ValueError, r"groups must .*got 0"),
    "predict batch_size=0": (lambda: predict(nn.Identity(), torch.zeros(2, 3), batch_size=0), ValueError,
                             r"batch_size must .*got 0"),
    "confusion_matrix num_classes=0": (lambda: confusion_matrix(torch.zeros(2), torch.zeros(2), 0), ValueError,
                                       r"num_classes must .*got 0"),
    "image_grid ncols=0": (lambda: image_grid(torch.zeros(2, 1, 4, 4), ncols=0), ValueError, r"ncols must .*got 0"),
    "patch_grid patch_size=0": (lambda: patch_grid(torch.zeros(1, 4, 4), 0), ValueError, r"patch_size must .*got 0"),
    "load_dataset timeout=0": (lambda: load_dataset("mnist", timeout=0), ValueError, r"timeout must .*got 0"),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_bad_input_gives_a_clear_error_naming_the_argument(probe):
    call, error, message = PROBES[probe]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_asking_for_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device='cuda' was asked for, but CUDA is not available"):
        get_device("cuda")


# ----------------------------------------------------------------------------- mistakes that now just work


def test_predict_runs_a_model_without_parameters_where_the_images_are():
    x = torch.randn(5, 3)
    assert torch.equal(predict(nn.Identity(), x, batch_size=2), x)


def test_guidance_treats_none_conditions_as_absent():
    seen = {}

    def model(x, t, **cond):
        seen.update(cond)
        return torch.zeros_like(x)

    guided = classifier_free_guidance(model, 3.0, {"context": torch.zeros(1, 3, 4), "context_mask": None})
    out = guided(torch.zeros(2, 1, 2, 2), torch.tensor(5), context=torch.ones(2, 3, 4), context_mask=None)
    assert out.shape == (2, 1, 2, 2) and set(seen) == {"context"} and seen["context"].shape == (4, 3, 4)


def test_checkpoint_dir_may_be_a_path(tmp_path):
    config = TrainConfig(steps=2, batch_size=2, checkpoint_dir=tmp_path / "run")
    assert config.checkpoint_dir == str(tmp_path / "run")
    train(nn.Linear(2, 1), lambda m, b: m(b[0]).pow(2).mean(), (torch.randn(4, 2),), config, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["extra"]["train_config"]["checkpoint_dir"] == str(tmp_path / "run") and saved["step"] == 2


def test_unet_accepts_every_timestep_of_the_0_to_1000_scale():
    unet = UNet(**TINY_UNET)
    x = torch.zeros(4, 1, 4, 4)
    assert unet(x, torch.tensor([0, 1, 999, 1000])).shape == x.shape
    assert unet(x, torch.tensor([0.0, 0.5, 1000 * math.exp(-1), 1000.0])).shape == x.shape  # flow's 1000·σ
