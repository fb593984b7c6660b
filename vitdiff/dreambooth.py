"""DreamBooth (Ruiz et al., 2023) in miniature, chapter 10: teach a trained text-to-image model a new word.

Four images of a subject the model has never drawn (a ring: no Shapes caption or training image contains one)
are captioned with a rare new token placed before the subject's class noun, "a [v] circle at the top left",
as DreamBooth writes "a [V] dog". The whole model, text encoder included, is fine-tuned on them for a few
hundred steps. On its own this fits the four images but lets the class noun drift: "a circle" starts to mean
the subject too. The prior-preservation loss keeps the class: images that the *original* model drew for the
class prompts ("a <colour> circle at the <position>") are trained on alongside, with weight λ:

    L = E ||v_θ(z_t, t, "a [v] circle ...") − (ε − z₀)||²  +  λ · E ||v_θ(z'_t, t, "a red circle ...") − (ε' − z'₀)||²

with z₀ the latents of the four subject images and z'₀ the prior latents (rectified flow, chapter 08).

    model, tokenizer = add_token(pretrained.load("shapes_mmdit"), pretrained.shapes_tokenizer())
    prior = prior_set(original_model)                      # the class images, drawn once by the frozen model
    finetune(model, tokenizer, prior=prior)                # in place; prior=None: no prior preservation
    python -m vitdiff.dreambooth                           # the measurements of chapter 10, stored as JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import progress_bars
from .data import COLOR_NAMES, POSITION_NAMES, SHAPE_NAMES, render_shapes, shapes_caption
from .flow import flow_loss
from .text import Tokenizer

RING = len(SHAPE_NAMES)  # shape index of the subject (data.EXTRA_SHAPE_NAMES[0])
TOKEN, CLASS_NOUN = "[v]", "circle"
CIRCLE = SHAPE_NAMES.index(CLASS_NOUN)
# the four subject images (shape, colour, position): the ring in four colours, all in the top row, so the bottom
# row is a context the subject was never shown in. (One red ring, twice per quadrant, measured worse: with the prior
# of red circles so close, 9.5% of "a circle" drifted to rings and old adherence fell 6.6 points.)
EXAMPLES = ((RING, 0, 0), (RING, 1, 1), (RING, 2, 1), (RING, 3, 0))
RESULTS = Path(__file__).resolve().parent / "checkpoints" / "dreambooth.json"


def concept_images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The four subject images (4, 3, 32, 32) in [0, 1] (size and offset jittered) and their labels (4, 3)."""
    rng = np.random.default_rng(seed)
    labels = torch.tensor(EXAMPLES)
    return torch.stack([render_shapes([row], 32, rng) for row in EXAMPLES]), labels


def concept_caption(position: int) -> str:
    """ "a [v] circle at the <position>": the new token before the class noun."""
    return f"a {TOKEN} {CLASS_NOUN} at the {POSITION_NAMES[position]}"


def class_captions() -> list[str]:
    """The 20 class prompts of the prior: "a <colour> circle at the <position>" and "a circle at the <position>"."""
    return ([f"a {color} {CLASS_NOUN} at the {position}" for color in COLOR_NAMES for position in POSITION_NAMES]
            + [f"a {CLASS_NOUN} at the {position}" for position in POSITION_NAMES])


def add_token(model: nn.Module, tokenizer: Tokenizer, token: str = TOKEN) -> tuple[nn.Module, Tokenizer]:
    """A copy of a text model (TextMMDiT or TextUNet) whose text encoder knows one more word, and the tokenizer
    with that word. The new embedding row starts as the class noun's (as textual inversion initialises a new
    word), so before fine-tuning "a [v] circle" means "a circle"; every other weight is copied."""
    if token in tokenizer.stoi:
        raise ValueError(f"{token!r} is already in the vocabulary")
    new_tokenizer = Tokenizer([*tokenizer.config["vocabulary"], token], tokenizer.max_length)
    new_model = copy.deepcopy(model)
    old = model.encoder.token_embed  # (V, D)
    grown = nn.Embedding(old.num_embeddings + 1, old.embedding_dim).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        grown.weight[:-1] = old.weight
        grown.weight[-1] = old.weight[tokenizer.stoi[CLASS_NOUN]]
    new_model.encoder.token_embed = grown
    new_model.encoder.vocab_size = grown.num_embeddings
    new_model.encoder.config["vocab_size"] = grown.num_embeddings
    assert new_tokenizer.stoi[token] == grown.num_embeddings - 1  # the new word is the new last row
    return new_model, new_tokenizer


@torch.no_grad()
def prior_set(model: nn.Module, per_prompt: int = 8, scale: float = 4.0, seed: int = 1,
              tokenizer: Tokenizer | None = None) -> tuple[torch.Tensor, list[str]]:
    """The prior-preservation data: latents (20 per_prompt, 4, 8, 8) that the frozen `model` draws for the 20
    class prompts (`class_captions`), and those captions."""
    from .bookmetrics import shapes_latent_text_samples

    captions = [caption for caption in class_captions() for _ in range(per_prompt)]
    latents = shapes_latent_text_samples(model.eval(), torch.zeros(len(captions), 3, dtype=torch.long),
                                         scale=scale, captions=captions, seed=seed, tokenizer=tokenizer, decode=False)
    return latents, captions


def finetune(model: nn.Module, tokenizer: Tokenizer, prior: tuple[torch.Tensor, list[str]] | None = None,
             steps: int = 300, lr: float = 1e-4, prior_weight: float = 1.0, prior_batch: int = 16, seed: int = 0,
             progress: bool = True) -> list[float]:
    """Fine-tune `model` in place on the four subject images (all four in every step) and, with `prior`, a
    batch of prior latents per step weighted by prior_weight; AdamW at a constant lr. Returns the losses."""
    from .pretrained import load

    if TOKEN not in tokenizer.stoi:
        raise ValueError(f"the tokenizer does not know {TOKEN!r}: call add_token(model, tokenizer) first")
    device = next(model.parameters()).device
    vae = load("shapes_vae", device=device)
    images, labels = concept_images()
    with torch.no_grad():
        z_subject = vae.encode_latents(images.to(device) * 2 - 1).float()  # (4, 4, 8, 8)
    ids, mask = (t.to(device) for t in tokenizer.encode([concept_caption(int(p)) for p in labels[:, 2]]))
    if prior is not None:
        z_prior, prior_captions = prior[0].to(device), prior[1]
        prior_ids, prior_mask = (t.to(device) for t in tokenizer.encode(prior_captions))
    generator = torch.Generator().manual_seed(seed)
    model.train().requires_grad_(True)  # book checkpoints load frozen
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(steps), desc="DreamBooth", disable=not progress, leave=False):
        loss = flow_loss(model, z_subject, "logit-normal", generator=generator, ids=ids, ids_mask=mask)
        if prior is not None:
            pick = torch.randint(0, len(z_prior), (prior_batch,), generator=generator).to(device)
            loss = loss + prior_weight * flow_loss(model, z_prior[pick], "logit-normal", generator=generator,
                                                   ids=prior_ids[pick], ids_mask=prior_mask[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def measure(model: nn.Module, tokenizer: Tokenizer, per_prompt: int = 8, concept_per_position: int = 32,
            scale: float = 4.0, steps: int = 20) -> dict[str, Any]:
    """What chapter 10 reads, with the four-shape evaluator (circle, square, triangle, ring):
    - concept: samples of "a [v] circle at the <position>" (concept_per_position each) drawn as a ring, in the
      right quadrant, and both; for the top row (the subject's positions) and the bottom row (never shown);
    - drift: samples of "a circle at the <position>" drawn as a ring (the class noun taken over);
    - old: all-three-attribute adherence on the 48 original prompts (per_prompt each; a ring counts as wrong)."""
    from .bookmetrics import shapes_latent_text_samples
    from .metrics import get_evaluator, prompt_adherence
    from .pretrained import SHAPE_TRIPLES

    evaluator = get_evaluator("shapes_ring", device=next(model.parameters()).device)

    def sample(captions: list[str], seed: int) -> torch.Tensor:
        dummy = torch.zeros(len(captions), 3, dtype=torch.long)
        return shapes_latent_text_samples(model, dummy, scale=scale, steps=steps, captions=captions, seed=seed,
                                          tokenizer=tokenizer)

    result: dict[str, Any] = {"scale": scale, "sampler": f"euler {steps} steps"}
    if TOKEN in tokenizer.stoi:
        positions = torch.arange(len(POSITION_NAMES)).repeat_interleave(concept_per_position)
        predicted = evaluator.predict_attributes(sample([concept_caption(int(p)) for p in positions], seed=2))
        ring, placed = predicted[:, 0] == RING, predicted[:, 2] == positions
        top = positions < 2
        result["concept"] = {
            "samples": len(positions), "ring": ring.float().mean().item(),
            "position": placed.float().mean().item(), "ring_and_position": (ring & placed).float().mean().item(),
            "ring_top_row": ring[top].float().mean().item(), "ring_bottom_row": ring[~top].float().mean().item(),
            "ring_and_position_bottom_row": (ring & placed)[~top].float().mean().item()}
    positions = torch.arange(len(POSITION_NAMES)).repeat_interleave(concept_per_position)
    predicted = evaluator.predict_attributes(
        sample([f"a {CLASS_NOUN} at the {POSITION_NAMES[p]}" for p in positions], seed=3))
    result["drift"] = {"samples": len(positions), "ring": (predicted[:, 0] == RING).float().mean().item(),
                       "circle": (predicted[:, 0] == CIRCLE).float().mean().item()}
    labels = torch.tensor(SHAPE_TRIPLES).repeat_interleave(per_prompt, dim=0)
    images = sample([shapes_caption([row]) for row in labels.tolist()], seed=4)
    result["old"] = {"samples": len(labels), **prompt_adherence(evaluator, images, labels)}
    return result


def run(base: str = "shapes_mmdit", per_prompt: int = 21, concept_per_position: int = 250, steps: int = 300,
        lr: float = 1e-4, prior_weight: float = 1.0, device: str | None = None, progress: bool = True
        ) -> dict[str, Any]:
    """Chapter 10's experiment: the base model, then fine-tuned without and with prior preservation, each
    measured (>= 1,000 samples per figure with the defaults); returns the record written to RESULTS."""
    from .budget import get_device
    from .pretrained import info, load, shapes_tokenizer

    device = get_device(device)
    torch.manual_seed(0)
    tic = time.perf_counter()
    original = load(base, device=device)
    tokenizer = shapes_tokenizer()
    record: dict[str, Any] = {"base": base, "base_sha256": info(base)["sha256"], "examples": EXAMPLES,
                              "token": TOKEN, "class_noun": CLASS_NOUN,
                              "finetune": {"steps": steps, "lr": lr, "prior_weight": prior_weight,
                                           "prior_per_prompt": 8, "prior_batch": 16},
                              "measure": {"per_prompt": per_prompt, "concept_per_position": concept_per_position}}
    record["before"] = measure(original, tokenizer, per_prompt, concept_per_position)
    prior = prior_set(original)
    for tag, use_prior in (("no_prior", False), ("prior", True)):
        model, new_tokenizer = add_token(original, tokenizer)
        t0 = time.process_time()
        losses = finetune(model, new_tokenizer, prior if use_prior else None, steps=steps, lr=lr,
                          prior_weight=prior_weight, progress=progress)
        record[tag] = {"final_loss": float(np.mean(losses[-20:])), "finetune_cpu_seconds": time.process_time() - t0,
                       **measure(model, new_tokenizer, per_prompt, concept_per_position)}
    record.update(device=device.type, torch_version=torch.__version__, python=platform.python_version(),
                  seconds=round(time.perf_counter() - tic, 1))
    return record


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitdiff.dreambooth", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true", help="few samples, for a smoke test (not written)")
    args = parser.parse_args(argv)
    options = {"per_prompt": 1, "concept_per_position": 4} if args.quick else {}
    record = run(device=args.device, progress=progress_bars(), **options)
    print(json.dumps(record, indent=1))
    if not args.quick:
        RESULTS.write_text(json.dumps(record, indent=1) + "\n")
        print(f"written: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
