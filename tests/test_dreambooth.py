"""vitdiff.dreambooth: a new word added to a trained text model changes nothing else, fine-tuning learns it (and
the prior-preservation term is trained on), the four subject images, and clear errors."""

from __future__ import annotations

import pytest
import torch

from vitdiff import dreambooth, pretrained
from vitdiff.data import EXTRA_SHAPE_NAMES, SHAPE_NAMES
from vitdiff.mmdit import TextMMDiT

CONFIG = {"mmdit": {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2,
                    "context_dim": 16, "pooled_dim": 16},
          "encoder": {"vocab_size": 17, "max_length": 8, "dim": 16, "depth": 1, "num_heads": 2}}


def tiny_model(seed: int = 0) -> TextMMDiT:
    torch.manual_seed(seed)
    model = TextMMDiT(**CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # off adaLN-Zero's all-zero start, as after training
    return model.eval().requires_grad_(False)  # as pretrained.load returns it


def test_the_subject_is_the_ring_in_the_top_row():
    images, labels = dreambooth.concept_images()
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert SHAPE_NAMES[dreambooth.CIRCLE] == dreambooth.CLASS_NOUN
    assert (labels[:, 0] == dreambooth.RING).all() and EXTRA_SHAPE_NAMES[dreambooth.RING - len(SHAPE_NAMES)] == "ring"
    assert set(labels[:, 2].tolist()) == {0, 1}  # top left and top right only: the bottom row is a new context
    assert set(labels[:, 1].tolist()) == {0, 1, 2, 3}  # the ring in every colour
    assert dreambooth.concept_caption(3) == "a [v] circle at the bottom right"
    assert len(dreambooth.class_captions()) == 20 and all("circle" in c for c in dreambooth.class_captions())


def test_add_token_starts_as_the_class_noun_and_leaves_every_old_caption_alone():
    model, tokenizer = tiny_model(), pretrained.shapes_tokenizer()
    new_model, new_tokenizer = dreambooth.add_token(model, tokenizer)
    assert new_tokenizer.vocab_size == tokenizer.vocab_size + 1 and new_model.encoder.config["vocab_size"] == 18
    assert model.encoder.token_embed.num_embeddings == 17  # the original is untouched
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 800.0])
    old_ids, old_mask = tokenizer.encode(["a red square at the top left", "a circle at the bottom right"])
    new_ids, new_mask = new_tokenizer.encode(["a red square at the top left", "a circle at the bottom right"])
    assert torch.equal(old_ids, new_ids)
    with torch.no_grad():
        torch.testing.assert_close(new_model(x, t, new_ids, new_mask), model(x, t, old_ids, old_mask))
        v_ids, v_mask = new_tokenizer.encode(["a [v] circle at the top left"] * 2)
        c_ids, c_mask = tokenizer.encode(["a circle circle at the top left"] * 2)
        torch.testing.assert_close(new_model(x, t, v_ids, v_mask), model(x, t, c_ids, c_mask))
    with pytest.raises(ValueError, match="already"):
        dreambooth.add_token(new_model, new_tokenizer)


def test_finetune_learns_the_new_word_and_trains_on_the_prior():
    original, tokenizer = tiny_model(), pretrained.shapes_tokenizer()
    with pytest.raises(ValueError, match="add_token"):
        dreambooth.finetune(original, tokenizer, steps=1, progress=False)
    prior = dreambooth.prior_set(original, per_prompt=1, scale=1.0)
    assert prior[0].shape == (20, 4, 8, 8) and len(prior[1]) == 20
    runs = {}
    for use_prior in (False, True):
        model, new_tokenizer = dreambooth.add_token(original, tokenizer)
        losses = dreambooth.finetune(model, new_tokenizer, prior if use_prior else None, steps=30, lr=2e-3,
                                     prior_batch=4, progress=False)
        assert len(losses) == 30 and not model.training
        assert not any(p.requires_grad for p in model.parameters())  # handed back frozen, as loaded
        runs[use_prior] = (model, losses)
    new_row = lambda m: m.encoder.token_embed.weight[-1]
    assert not torch.equal(new_row(runs[True][0]), new_row(dreambooth.add_token(original, tokenizer)[0]))
    assert sum(runs[False][1][-5:]) < sum(runs[False][1][:5])  # the subject images are being fitted
    assert sum(runs[True][1]) > sum(runs[False][1])  # the prior term adds a loss of its own


def test_measure_reads_the_new_word_the_drift_and_the_old_prompts():
    original, tokenizer = tiny_model(), pretrained.shapes_tokenizer()
    before = dreambooth.measure(original, tokenizer, per_prompt=1, concept_per_position=2, steps=2)
    assert "concept" not in before, "no [v] in the vocabulary yet: nothing to measure"
    assert before["drift"]["samples"] == 8 and before["old"]["samples"] == 48
    model, new_tokenizer = dreambooth.add_token(original, tokenizer)
    after = dreambooth.measure(model, new_tokenizer, per_prompt=1, concept_per_position=2, steps=2)
    concept = after["concept"]
    assert concept["samples"] == 8
    assert concept["ring_and_position"] <= min(concept["ring"], concept["position"])
    assert concept["ring"] == (concept["ring_top_row"] + concept["ring_bottom_row"]) / 2  # 4 + 4 samples
    for part in (after["drift"], after["old"]):
        assert all(0 <= v <= 1 for k, v in part.items() if k != "samples")
