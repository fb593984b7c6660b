"""The measurements stored in the sidecars of the book checkpoints (see `vitdiff.pretrained`).

Every number comes with what it should be read against: the chance level and the real-data ceiling
for accuracies, the real-vs-real floor (at the same number of samples) for Fréchet distances. The
functions are also what the notebooks call to re-measure a small subset live.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .data import ATTRIBUTES, Shapes, dataset_tensors, shapes_caption
from .diffusion import NoiseSchedule, classifier_free_guidance, ddim_sample, ddpm_sample
from .metrics import class_accuracy, extract_features, fd_score, get_evaluator, prompt_adherence
from .text import Tokenizer


def to01(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] -> images in [0, 1] for the evaluators (clamped)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def crop28(x: torch.Tensor) -> torch.Tensor:
    """Undo the 2-pixel padding of the 32x32 Fashion-MNIST latent models: (B, C, 32, 32) -> (B, C, 28, 28)."""
    return x[..., 2:30, 2:30]


@torch.no_grad()
def generate(model: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], n: int, *, steps: int = 20,
             sampler: str = "ddim", eta: float = 0.0, prediction: str = "epsilon", clip_x0: bool = True,
             cond: Callable[[int, int], dict[str, torch.Tensor]] | None = None, scale: float | None = None,
             uncond: dict[str, torch.Tensor] | None = None, batch_size: int = 250, seed: int = 0,
             progress: bool = True, eps_from_clipped_x0: bool = False) -> torch.Tensor:
    """`n` samples (n, *shape) on the CPU, drawn in batches; `cond(i0, i1)` gives the conditions of rows i0:i1.

    sampler "ddim" uses `steps` DDIM steps ("trailing" spacing) with `eta`; "ddpm" runs all T ancestral steps.
    With `scale`, classifier-free guidance against `uncond` (the null or a negative condition).
    eps_from_clipped_x0: DDIM re-derives ε̂ from the clipped x̂0 (see `vitdiff.diffusion.ddim_step`); it acts only
    with sampler "ddim" and clip_x0 (the ancestral DDPM step is consistent by construction).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    for i0 in tqdm(range(0, n, batch_size), desc=f"{sampler} {steps if sampler == 'ddim' else 'T'}",
                   disable=not progress, leave=False):
        i1 = min(n, i0 + batch_size)
        c = {k: v.to(device) for k, v in cond(i0, i1).items()} if cond is not None else {}
        denoiser = model if scale is None else classifier_free_guidance(model, scale, uncond)
        size = (i1 - i0, *shape)
        if sampler == "ddpm":
            x = ddpm_sample(denoiser, schedule, size, generator=generator, prediction=prediction,
                            clip_x0=clip_x0, progress=False, **c)
        else:
            x = ddim_sample(denoiser, schedule, size, steps=steps, eta=eta, spacing="trailing", generator=generator,
                            prediction=prediction, clip_x0=clip_x0, eps_from_clipped_x0=eps_from_clipped_x0,
                            progress=False, **c)
        out.append(x.float().cpu())
    return torch.cat(out)


def fd_floor(evaluator: nn.Module, name: str, n: int) -> float:
    """Fréchet distance between n real training and n real test images: the best a generator can score at n."""
    train_x, _ = dataset_tensors(name, train=True, limit=n)
    test_x, _ = dataset_tensors(name, train=False, limit=n)
    return fd_score(evaluator, test_x, train_x)


def feature_diversity(evaluator: nn.Module, images: torch.Tensor, groups: int) -> float:
    """Mean pairwise distance of evaluator features among images of the same group (images grouped in order)."""
    features = extract_features(evaluator, images).reshape(groups, -1, evaluator.head.in_features)  # (G, n, F)
    n = features.shape[1]
    return (torch.cdist(features, features).sum(dim=(1, 2)) / (n * (n - 1))).mean().item()


# ----------------------------------------------------------------------------- per recipe


def _mnist_ddpm(name: str, model: nn.Module, device: torch.device, progress: bool, samples: int = 500,
                samples_1000: int = 100, steps: tuple[int, ...] = (10, 20, 50, 100),
                diffusers_default_steps: tuple[int, ...] = (10, 20, 50, 100)) -> dict[str, Any]:
    """The DDIM / strided DDPM rows re-derive ε̂ from the clipped x̂0; `diffusers_default_steps` adds DDIM rows
    that keep the model's ε̂ (diffusers' default), which drift off the trajectory as steps are added."""
    from .pretrained import recipe_schedule

    evaluator = get_evaluator("mnist", device=device)
    schedule = recipe_schedule(name).to(device)
    test_x, _ = dataset_tensors("mnist", train=False, limit=max(samples, samples_1000))
    floors = {n: fd_floor(evaluator, "mnist", n) for n in {samples, samples_1000} - {0}}
    rows = []
    for s in steps:
        for label, eta in (("DDIM (eta=0)", 0.0), ("DDPM, strided (eta=1)", 1.0)):
            x = generate(model, schedule, (1, 28, 28), samples, steps=s, eta=eta, eps_from_clipped_x0=True,
                         progress=progress)
            rows.append({"sampler": label, "steps": s, "samples": samples,
                         "fd": fd_score(evaluator, test_x[:samples], to01(x)), "floor": floors[samples]})
    for s in diffusers_default_steps:
        x = generate(model, schedule, (1, 28, 28), samples, steps=s, eta=0.0, progress=progress)
        rows.append({"sampler": "DDIM, model's eps kept", "steps": s, "samples": samples,
                     "fd": fd_score(evaluator, test_x[:samples], to01(x)), "floor": floors[samples]})
    if samples_1000:  # 0 skips the slow row (measured in another process, then merged)
        x = generate(model, schedule, (1, 28, 28), samples_1000, sampler="ddpm", progress=progress)
        rows.append({"sampler": "DDPM (all 1000 steps)", "steps": 1000, "samples": samples_1000,
                     "fd": fd_score(evaluator, test_x[:samples_1000], to01(x)), "floor": floors[samples_1000]})
    return {"fd_table": rows}


def _class_conditional(name: str, model: nn.Module, device: torch.device, progress: bool, samples: int = 1000,
                       scales: tuple[float, ...] = (1.0, 2.0, 4.0), steps: int = 20) -> dict[str, Any]:
    from .pretrained import recipe_schedule

    evaluator = get_evaluator("fashion_mnist", device=device)
    schedule = recipe_schedule(name).to(device)
    test_x, test_y = dataset_tensors("fashion_mnist", train=False)
    labels = torch.arange(10).repeat_interleave(samples // 10)  # (N,), grouped by class
    null = torch.full((1,), 10, dtype=torch.long)
    rows = []
    for scale in scales:
        x = to01(generate(model, schedule, (1, 28, 28), len(labels), steps=steps, prediction="v", clip_x0=False,
                          cond=lambda i0, i1: {"y": labels[i0:i1]}, scale=scale, uncond={"y": null.to(device)},
                          progress=progress))
        rows.append({"scale": scale, "samples": len(labels), "class_accuracy": class_accuracy(evaluator, x, labels),
                     "diversity": feature_diversity(evaluator, x, 10), "fd": fd_score(evaluator, test_x[:len(x)], x)})
    per_class = len(labels) // 10
    real_by_class = torch.cat([test_x[test_y == k][:per_class] for k in range(10)])  # grouped like the samples
    return {"guidance_sweep": rows, "chance": 0.1, "sampler": f"DDIM {steps} steps",
            "real_accuracy": class_accuracy(evaluator, test_x, test_y),
            "real_diversity": feature_diversity(evaluator, real_by_class, 10),
            "fd_floor": fd_floor(evaluator, "fashion_mnist", len(labels))}


def _shapes_text(name: str, model: nn.Module, device: torch.device, progress: bool, per_prompt: int = 20,
                 scales: tuple[float, ...] = (1.0, 3.0, 5.0), steps: int = 20, experts: bool | None = None,
                 base: bool = True) -> dict[str, Any]:
    """The guidance sweep of a Shapes text U-Net; for shapes_text (or experts=True) also "experts_sweep": the
    same prompts and noise drawn by `model` while ᾱ < 0.5 and by shapes_text_noshift after it
    (`pretrained.shapes_text_experts`). base=False measures only the experts."""
    from .pretrained import SHAPE_TRIPLES, recipe_schedule, shapes_text_experts, shapes_tokenizer

    evaluator = get_evaluator("shapes", device=device)
    schedule = recipe_schedule(name).to(device)  # the recipe's own: shapes_text shifted by 4, shapes_text_noshift plain
    tokenizer = shapes_tokenizer()
    labels = torch.tensor(SHAPE_TRIPLES).repeat_interleave(per_prompt, dim=0)  # (48·n, 3)
    ids, mask = tokenizer.encode([shapes_caption([row]) for row in labels.tolist()])
    null_ids, null_mask = tokenizer.encode("")

    def sweep(denoiser: nn.Module) -> list[dict[str, Any]]:
        rows = []
        for scale in scales:
            x = to01(generate(denoiser, schedule, (3, 32, 32), len(labels), steps=steps, prediction="v",
                              clip_x0=False, cond=lambda i0, i1: {"ids": ids[i0:i1], "ids_mask": mask[i0:i1]},
                              scale=scale, uncond={"ids": null_ids.to(device), "ids_mask": null_mask.to(device)},
                              progress=progress))
            scores = prompt_adherence(evaluator, x, labels)
            rows.append({"scale": scale, "samples": len(labels), **scores,
                         "diversity": feature_diversity(evaluator, x, len(SHAPE_TRIPLES))})
        return rows

    result: dict[str, Any] = {"guidance_sweep": sweep(model)} if base else {}
    if experts if experts is not None else name == "shapes_text":  # this model above SNR 1, the plain one below
        ensemble = shapes_text_experts(device=device, high=model)
        result["experts_sweep"] = sweep(ensemble)
        result["experts"] = {"high": name, "low": "shapes_text_noshift", "switch_abar": ensemble.switch_abar}
    real_images, _, real_labels = Shapes(size=len(labels), img_size=32, seed=1).tensors()
    return {**result, "sampler": f"DDIM {steps} steps",
            "chance": {"shape": 1 / 3, "color": 1 / 4, "position": 1 / 4, "all": 1 / 48},
            "real": prompt_adherence(evaluator, real_images, real_labels[:, 0])}


def _unconditional_fmnist(name: str, model: nn.Module, device: torch.device, progress: bool, latent: bool,
                          samples: int = 1000, steps: int = 20) -> dict[str, Any]:
    from .pretrained import load, recipe_schedule

    evaluator = get_evaluator("fashion_mnist", device=device)
    schedule = recipe_schedule(name).to(device)
    test_x, _ = dataset_tensors("fashion_mnist", train=False, limit=samples)
    shape = (4, 8, 8) if latent else (1, 28, 28)
    x = generate(model, schedule, shape, samples, steps=steps, prediction="v", clip_x0=not latent,
                 eps_from_clipped_x0=True, progress=progress)
    if latent:
        vae = load("fmnist_vae", device=device)
        with torch.no_grad():
            x = torch.cat([crop28(vae.decode_latents(x[i:i + 250].to(device))).float().cpu()
                           for i in range(0, len(x), 250)])
    sampler = f"DDIM {steps} steps" + ("" if latent else ", x0 clipped, eps re-derived from it")
    return {"samples": samples, "sampler": sampler, "fd": fd_score(evaluator, test_x, to01(x)),
            "fd_floor": fd_floor(evaluator, "fashion_mnist", samples)}


@torch.no_grad()
def _vae(model: nn.Module, device: torch.device, progress: bool, shapes: bool, samples: int = 1000) -> dict[str, Any]:
    if shapes:
        images, _, labels = Shapes(size=samples, img_size=32, seed=1).tensors()
        x = images * 2 - 1
    else:
        images, labels = dataset_tensors("fashion_mnist", train=False, limit=samples)
        x = F.pad(images * 2 - 1, (2, 2, 2, 2), value=-1.0)
    recon = torch.cat([model(x[i:i + 250].to(device), sample=False)[0].float().cpu() for i in range(0, len(x), 250)])
    result: dict[str, Any] = {"samples": samples, "mse": F.mse_loss(recon, x).item()}
    if shapes:
        evaluator = get_evaluator("shapes", device=device)
        result["original"] = prompt_adherence(evaluator, images, labels[:, 0])
        result["reconstruction"] = prompt_adherence(evaluator, to01(recon), labels[:, 0])
        result["chance"] = {"shape": 1 / 3, "color": 1 / 4, "position": 1 / 4, "all": 1 / 48}
    else:
        evaluator = get_evaluator("fashion_mnist", device=device)
        result["original_accuracy"] = class_accuracy(evaluator, images, labels)
        result["reconstruction_accuracy"] = class_accuracy(evaluator, crop28(to01(recon)), labels)
        result["chance"] = 0.1
        result["fd_reconstruction"] = fd_score(evaluator, images, crop28(to01(recon)))
        result["fd_floor"] = fd_floor(evaluator, "fashion_mnist", samples)
    return result


@torch.no_grad()
def _vit(model: nn.Module, device: torch.device, progress: bool) -> dict[str, Any]:
    test_x, test_y = dataset_tensors("fashion_mnist", train=False)
    logits = torch.cat([model(test_x[i:i + 1000].to(device)).float().cpu() for i in range(0, len(test_x), 1000)])
    return {"test_accuracy": (logits.argmax(1) == test_y).float().mean().item(), "test_images": len(test_x),
            "chance": 0.1}


_GPU_OPTIONS: dict[str, dict[str, Any]] = {
    "mnist_ddpm": {"samples": 1000, "samples_1000": 1000},
    "shapes_text": {"per_prompt": 21},  # 48 prompts x 21 = 1,008 samples per guidance scale
    "fmnist_dit": {"samples": 1000}, "fmnist_dit_eps": {"samples": 1000}, "fmnist_unet_flow": {"samples": 1000},
    "ablation": {"samples": 1000},
    "shapes_mmdit": {"per_prompt": 21}, "shapes_crossdit": {"per_prompt": 21},  # >= 1,000 samples per scale
    "shapes_unet_latent": {"per_prompt": 21},
    "shapes_mmdit_holdout": {"per_prompt": 25, "held_out_per_prompt": 143},  # 41 x 25 seen, 7 x 143 held out
}


def _family(name: str) -> str:
    """The measurements a recipe gets: a candidate recipe (shapes_text_pool8, fmnist_vit_cls_w96) is measured as its
    family (shapes_text, fmnist_vit)."""
    for family in ("shapes_text", "fmnist_vit", "shapes_unet_latent", "mnist_ddpm"):
        if name.startswith(family + "_"):
            return family
    return name


def measure(name: str, model: nn.Module, device: torch.device, progress: bool = True, **options: Any
            ) -> dict[str, Any]:
    """The sidecar metrics of book checkpoint `name`; options (e.g. samples=1000) override the defaults."""
    torch.manual_seed(0)
    if device.type == "cuda":  # a GPU measures every figure on >= 1,000 samples; a CPU run keeps the smaller defaults
        family = "ablation" if name.startswith(("ablation_", "scaling_")) else _family(name)
        for key, value in _GPU_OPTIONS.get(family, {}).items():
            options.setdefault(key, value)
    recipe_name, name = name, _family(name)
    if name == "mnist_ddpm":
        return _mnist_ddpm(recipe_name, model, device, progress, **options)
    if name == "fmnist_cfg":
        return _class_conditional(recipe_name, model, device, progress, **options)
    if name == "shapes_text":
        return _shapes_text(recipe_name, model, device, progress, **options)
    if name in ("fmnist_latent", "fmnist_pixel"):
        return _unconditional_fmnist(recipe_name, model, device, progress, latent=name == "fmnist_latent", **options)
    if name in ("shapes_vae", "fmnist_vae"):
        return _vae(model, device, progress, shapes=name == "shapes_vae", **options)
    if name in ("fmnist_vit", "fmnist_vit_plain", "fmnist_cnn_teacher"):
        return _vit(model, device, progress)
    if name in ("fmnist_dit", "fmnist_dit_eps", "fmnist_unet_flow") or name.startswith(("ablation_", "scaling_")):
        if name in ("fmnist_dit", "fmnist_dit_eps"):
            options.setdefault("step_table", (2, 5, 10, 20, 50))
        if name.startswith(("ablation_", "scaling_")):
            options.setdefault("scales", (1.0, 2.0))
        return _latent_dit(name, model, device, progress, **options)
    if name in ("shapes_mmdit", "shapes_mmdit_holdout", "shapes_crossdit", "shapes_unet_latent"):
        return _shapes_mmdit(name, model, device, progress, **options)
    raise ValueError(f"no measurements defined for {name!r}")


__all__ = ["ATTRIBUTES", "crop28", "fd_floor", "feature_diversity", "generate", "measure", "to01"]


# ----------------------------------------------------------------------------- chapters 07 and 08: latent DiTs


def gflops(model: nn.Module, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> float:
    """Forward GFLOPs of one call on a batch of one (multiply-adds count 2, so half of this is the DiT paper's
    "Gflops"), measured by torch's FLOP counter. Attention is counted through SDPA's math backend, whose matrix
    products the counter sees on every device (the fused CPU kernel is invisible to it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x[:1], t[:1], **{k: v[:1] for k, v in cond.items()})
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def latent_class_samples(model: nn.Module, objective: str, labels: torch.Tensor, *, scale: float = 1.0,
                         steps: int = 20, method: str = "euler", eta: float = 0.0, seed: int = 0,
                         batch_size: int = 250, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """Class-conditional Fashion-MNIST samples (N, 1, 28, 28) in [0, 1] from a latent model and the fmnist_vae.

    objective "flow": `vitdiff.flow.sample` with `method` ("euler" | "heun"); "epsilon": DDIM with `eta`
    (eta = 1: strided ancestral DDPM) under the `schedule` the model was trained with (None: the linear one of
    1000 steps; `vitdiff.pretrained.recipe_schedule(name)` gives a recipe's own, shift included)
    scale > 1 guides against the null class (label 10)."""
    from . import flow
    from .pretrained import load

    device = next(model.parameters()).device
    vae = load("fmnist_vae", device=device)
    schedule = (schedule if schedule is not None else NoiseSchedule(1000, "linear")).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    null = torch.full((1,), 10, dtype=torch.long, device=device)
    out = []
    for i0 in range(0, len(labels), batch_size):
        y = labels[i0:i0 + batch_size].to(device)
        denoiser = model if scale == 1.0 else classifier_free_guidance(model, scale, {"y": null})
        if objective == "flow":
            noise = torch.randn((len(y), 4, 8, 8), generator=generator, device=device)
            z = flow.sample(denoiser, noise, steps=steps, method=method, progress=False, y=y)
        else:
            z = ddim_sample(denoiser, schedule, (len(y), 4, 8, 8), steps=steps, eta=eta, spacing="trailing",
                            generator=generator, prediction="epsilon", clip_x0=False, progress=False, y=y)
        out.append(crop28(to01(vae.decode_latents(z))).cpu())
    return torch.cat(out)


def _latent_dit(name: str, model: nn.Module, device: torch.device, progress: bool, samples: int = 500,
                scales: tuple[float, ...] = (1.0, 2.0, 4.0), steps: int = 20,
                step_table: tuple[int, ...] = ()) -> dict[str, Any]:
    from .pretrained import recipe, recipe_schedule

    objective = recipe(name).objective
    schedule = None if objective == "flow" else recipe_schedule(name)  # a flow model has no noise schedule
    evaluator = get_evaluator("fashion_mnist", device=device)
    test_x, _ = dataset_tensors("fashion_mnist", train=False, limit=samples)
    labels = torch.arange(10).repeat_interleave(samples // 10)
    method = "euler" if objective == "flow" else "ddim"

    def row(x: torch.Tensor, **what: Any) -> dict[str, Any]:
        return {**what, "samples": len(x), "class_accuracy": class_accuracy(evaluator, x, labels),
                "fd": fd_score(evaluator, test_x[:len(x)], x)}

    sweep = [row(latent_class_samples(model, objective, labels, scale=s, steps=steps, schedule=schedule),
                 scale=s) for s in
             tqdm(scales, desc=f"{name} guidance", disable=not progress, leave=False)]
    table = []
    samplers = [("euler", 0.0), ("heun", 0.0)] if objective == "flow" else [("ddim", 0.0), ("ddpm-strided", 1.0)]
    for n in tqdm(step_table, desc=f"{name} steps", disable=not progress, leave=False):
        for sampler, eta in samplers:
            x = latent_class_samples(model, objective, labels, steps=n, method=sampler, eta=eta,
                                     schedule=schedule)
            # Heun evaluates the model twice per step but once on the last one: 2n - 1 evaluations
            table.append(row(x, sampler=sampler, steps=n, evaluations=2 * n - 1 if sampler == "heun" else n))
    x = torch.zeros(1, 4, 8, 8, device=device)
    t, y = torch.full((1,), 500.0, device=device), torch.zeros(1, dtype=torch.long, device=device)
    return {"guidance_sweep": sweep, "steps_table": table, "sampler": f"{method} {steps} steps", "chance": 0.1,
            "fd_floor": fd_floor(evaluator, "fashion_mnist", samples), "gflops": gflops(model, x, t, y=y),
            "real_accuracy": class_accuracy(evaluator, *dataset_tensors("fashion_mnist", train=False))}


# ----------------------------------------------------------------------------- chapters 09 and 10: text-to-image MMDiT


@torch.no_grad()
def shapes_latent_text_samples(model: nn.Module, labels: torch.Tensor, *, scale: float = 4.0, steps: int = 20,
                               method: str = "euler", seed: int = 0, batch_size: int = 256,
                               captions: list[str] | None = None, negative: str = "",
                               tokenizer: Tokenizer | None = None, decode: bool = True) -> torch.Tensor:
    """Text-to-image samples (N, 3, 32, 32) in [0, 1] from a latent text model and the shapes_vae.

    The captions are the full captions of `labels` (N, 3) unless `captions` is given; guidance `scale`
    against the empty caption, or against `negative`. Rectified-flow sampling (`vitdiff.flow.sample`).
    `tokenizer`: the model's (default: `pretrained.shapes_tokenizer()`); decode=False returns the latents
    (N, 4, 8, 8) on the CPU instead of images."""
    from . import flow
    from .pretrained import load, shapes_tokenizer

    device = next(model.parameters()).device
    vae = load("shapes_vae", device=device)
    tokenizer = tokenizer or shapes_tokenizer()
    ids, mask = tokenizer.encode(captions if captions is not None else [shapes_caption([row]) for row in
                                                                       labels.tolist()])
    null_ids, null_mask = tokenizer.encode(negative)
    uncond = {"ids": null_ids.to(device), "ids_mask": null_mask.to(device)}
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    for i0 in range(0, len(ids), batch_size):
        c = {"ids": ids[i0:i0 + batch_size].to(device), "ids_mask": mask[i0:i0 + batch_size].to(device)}
        denoiser = model if scale == 1.0 else classifier_free_guidance(model, scale, uncond)
        noise = torch.randn((len(c["ids"]), 4, 8, 8), generator=generator, device=device)
        z = flow.sample(denoiser, noise, steps=steps, method=method, progress=False, **c)
        out.append(to01(vae.decode_latents(z)).cpu() if decode else z.float().cpu())
    return torch.cat(out)


def _shapes_mmdit(name: str, model: nn.Module, device: torch.device, progress: bool, per_prompt: int = 8,
                  scales: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0), steps: int = 20,
                  held_out_per_prompt: int | None = None) -> dict[str, Any]:
    """Prompt adherence over the guidance scale, on the seen and (for the holdout recipe) held-out prompts;
    the 7 held-out prompts get `held_out_per_prompt` samples each (default: per_prompt)."""
    from .pretrained import HELD_OUT, SHAPE_TRIPLES

    evaluator = get_evaluator("shapes", device=device)
    groups = {"seen": [t for t in SHAPE_TRIPLES if t not in HELD_OUT], "held_out": HELD_OUT} \
        if name == "shapes_mmdit_holdout" else {"all": SHAPE_TRIPLES}
    counts = {"held_out": held_out_per_prompt or per_prompt}
    result: dict[str, Any] = {"sampler": f"euler {steps} steps", "chance": {"shape": 1 / 3, "color": 1 / 4,
                                                                          "position": 1 / 4, "all": 1 / 48}}
    real_images, _, real_labels = Shapes(size=len(SHAPE_TRIPLES) * per_prompt, img_size=32, seed=1).tensors()
    for group, triples in groups.items():
        labels = torch.tensor(triples).repeat_interleave(counts.get(group, per_prompt), dim=0)
        rows = []
        for scale in tqdm(scales, desc=f"{name} {group}", disable=not progress, leave=False):
            x = shapes_latent_text_samples(model, labels, scale=scale, steps=steps)
            row = {"scale": scale, "samples": len(labels), **prompt_adherence(evaluator, x, labels),
                   "diversity": feature_diversity(evaluator, x, len(triples))}
            if group == "all":  # every prompt equally often, as in the real images: FD is meaningful
                row["fd"] = fd_score(evaluator, real_images, x)
            rows.append(row)
        result[f"guidance_sweep_{group}"] = rows
    if "all" in groups:
        other, _, _ = Shapes(size=len(real_images), img_size=32, seed=2).tensors()
        result["fd_floor"] = fd_score(evaluator, real_images, other)  # real vs real at the same N
        result["validation_loss"] = shapes_validation_loss(model)
    if hasattr(model, "unet"):  # a TextUNet: where its words land (chapter 05)
        result["cross_attention"] = cross_attention_shares(model)
    result["real"] = prompt_adherence(evaluator, real_images, real_labels[:, 0])
    return result


@torch.no_grad()
def _validation_latents(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """n unseen Shapes images (seed 1) encoded by shapes_vae, (n, 4, 8, 8) on the CPU, and their labels (n, 3)."""
    from .pretrained import _encoded

    def images() -> tuple[torch.Tensor, torch.Tensor]:
        x, _, labels = Shapes(size=n, img_size=32, seed=1).tensors()
        return x * 2 - 1, labels[:, 0]

    return _encoded("shapes_vae", f"shapes-validation-{n}", images, torch.device("cpu"))


CAPTION_WORDS = ("a", "colour", "shape", "at", "the", "row", "column", "<eos>")  # token j of every full caption


@torch.no_grad()
def cross_attention_shares(model: nn.Module, t: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Where a latent text U-Net's words land: for one unseen image per caption (48), noised to flow time t, the
    share of each token's cross-attention weight (the mean over heads) that falls inside the object's quadrant,
    averaged over the images, for every SpatialTransformer in the order they run (chance: 25%). Also the maps themselves
    (head mean) of a red circle top left and a blue square bottom right at the layer where the colour word lands
    most inside and at the one where the shape word does, for the notebook to draw."""
    from .pretrained import SHAPE_TRIPLES, shapes_tokenizer

    device = next(model.parameters()).device
    latents, labels = _validation_latents()
    rows = [tuple(row) for row in labels.tolist()]
    missing = [tr for tr in SHAPE_TRIPLES if tuple(tr) not in rows]
    if missing:
        raise ValueError(f"the validation images hold no example of the captions {missing}")
    first = [rows.index(tuple(tr)) for tr in SHAPE_TRIPLES]
    z0, labels = latents[first].to(device), labels[first]  # (48, 4, 8, 8), (48, 3)
    ids, mask = shapes_tokenizer().encode([shapes_caption([row]) for row in labels.tolist()])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    maps = model.cross_attention_maps((1 - t) * z0 + t * noise, torch.full((len(z0),), t, device=device),
                                      ids.to(device), mask.to(device))
    layers, names = [], _transformer_names(model)
    if len(names) != len(maps):
        raise ValueError(f"{len(maps)} attention maps for {len(names)} SpatialTransformers")
    sides = [int(weights.shape[2] ** 0.5) for weights in maps]
    plain = [f"{part} {side}x{side}" for part, side in zip(names, sides)]  # e.g. "up 4x4", twice
    names = [name + (f" #{plain[:i + 1].count(name)}" if plain.count(name) > 1 else "")
             for i, name in enumerate(plain)]  # unique: "up 4x4 #1", "up 4x4 #2"
    for layer_name, weights in zip(names, maps):
        side = int(weights.shape[2] ** 0.5)
        token_maps = weights.float().mean(dim=1).reshape(len(z0), side, side, -1).cpu()  # (48, side, side, L)
        inside = torch.zeros(len(z0), side, side)
        for b, position in enumerate(labels[:, 2].tolist()):
            r, c = divmod(position, 2)
            inside[b, r * side // 2:(r + 1) * side // 2, c * side // 2:(c + 1) * side // 2] = 1
        share = (token_maps * inside[..., None]).sum(dim=(1, 2)) / token_maps.sum(dim=(1, 2))  # (48, L)
        layers.append({"layer": layer_name, "side": side,
                       "share": {w: share[:, j].mean().item() for j, w in enumerate(CAPTION_WORDS)},
                       "share_se": {w: share[:, j].std().item() / len(z0) ** 0.5 for j, w in enumerate(CAPTION_WORDS)},
                       "maps": token_maps})
    # for the figure: every token's map of two probe images, at the layer where the colour word lands most inside
    # and at the one where the shape word does
    chosen = [max(layers, key=lambda layer: layer["share"][word]) for word in ("colour", "shape")]
    probes = [SHAPE_TRIPLES.index((0, 0, 0)), SHAPE_TRIPLES.index((1, 2, 3))]
    shown = {"layers": [layer["layer"] for layer in chosen], "triples": [list(SHAPE_TRIPLES[b]) for b in probes],
             "maps": {layer["layer"]: [[[[round(v, 5) for v in row] for row in layer["maps"][b, :, :, j].tolist()]
                                        for j in range(len(CAPTION_WORDS))] for b in probes]  # (2, L, side, side)
                      for layer in chosen}}
    for layer in layers:
        del layer["maps"]
    return {"t": t, "images": len(z0), "chance": 0.25, "words": list(CAPTION_WORDS), "layers": layers,
            "probe_maps": shown}


def _transformer_names(model: nn.Module) -> list[str]:
    """'down', 'middle' or 'up' for each SpatialTransformer of a (Text)UNet, in the order they run."""
    from .unet import SpatialTransformer

    names = []
    for name, module in model.named_modules():
        if isinstance(module, SpatialTransformer):
            part = "down" if ".down" in f".{name}" else "middle" if ".mid" in f".{name}" else "up"
            names.append(part)
    return names


@torch.no_grad()
def shapes_validation_loss(model: nn.Module, n: int = 1000, seed: int = 0) -> float:
    """The rectified-flow loss (logit-normal t, full captions) of a latent text model on n Shapes images it never
    saw (seed 1), encoded by shapes_vae, with t and ε drawn from one seeded generator: the same draws for
    every model, so the numbers compare."""
    from . import flow
    from .pretrained import shapes_tokenizer

    device = next(model.parameters()).device
    latents, labels = _validation_latents(n)
    ids, mask = shapes_tokenizer().encode([shapes_caption([row]) for row in labels.tolist()])
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for i0 in range(0, n, 250):
        z0 = latents[i0:i0 + 250].to(device)
        loss = flow.flow_loss(model, z0, "logit-normal", generator=generator,
                              ids=ids[i0:i0 + 250].to(device), ids_mask=mask[i0:i0 + 250].to(device))
        total += loss.item() * len(z0)
    return total / n
