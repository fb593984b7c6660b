"""Tests of the word-level tokenizer and the small text encoder (chapter 05)."""

import json

import pytest
import torch

from vitdiff.data import Shapes, shapes_vocabulary
from vitdiff.text import TextEncoder, Tokenizer


def test_round_trip_on_shapes_captions():
    _, captions, _ = Shapes(size=30, img_size=8, max_objects=2).tensors()
    tokenizer = Tokenizer(shapes_vocabulary(), max_length=16)
    ids, mask = tokenizer.encode(captions)
    assert ids.shape == mask.shape == (30, 16) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert tokenizer.decode(ids) == captions
    assert any(" and " in c for c in captions)  # two-object captions (the longest) are covered


def test_padding_and_mask():
    tokenizer = Tokenizer(shapes_vocabulary(), max_length=8)
    ids, mask = tokenizer.encode(["A  Red circle", "", "a blue square at the top left"])
    assert mask.sum(dim=1).tolist() == [4, 1, 8]  # words + <eos>
    assert ids[0, :4].tolist() == [tokenizer.stoi[w] for w in ("a", "red", "circle")] + [tokenizer.eos_id]
    assert torch.all(ids[~mask] == tokenizer.pad_id) and torch.all(ids[mask] != tokenizer.pad_id)
    assert ids[1, 0] == tokenizer.eos_id  # the empty caption is just <eos>
    assert tokenizer.decode(ids) == ["a red circle", "", "a blue square at the top left"]
    single, _ = tokenizer.encode("a red circle")
    assert torch.equal(single, ids[:1])
    assert tokenizer.decode(ids[0]) == ["a red circle"]


def test_unknown_word_is_named():
    tokenizer = Tokenizer(shapes_vocabulary())
    with pytest.raises(ValueError, match="unknown word 'purple'.*from_texts"):
        tokenizer.encode(["a red circle", "a purple circle"])
    with pytest.raises(ValueError, match="unknown word '<pad>'"):
        tokenizer.encode("a <pad> circle")


def test_too_long_caption():
    tokenizer = Tokenizer(shapes_vocabulary(), max_length=4)
    tokenizer.encode("a red circle")  # 3 words + <eos> fit exactly
    with pytest.raises(ValueError, match="4 words.*max_length=4"):
        tokenizer.encode("a red circle at")


def test_from_texts_and_bad_vocabularies():
    texts = ["Big dog runs", "small dog sleeps"]
    tokenizer = Tokenizer.from_texts(texts, max_length=5)
    assert tokenizer.config == {"vocabulary": ["big", "dog", "runs", "small", "sleeps"], "max_length": 5}
    assert tokenizer.vocab_size == len(tokenizer) == 7
    assert tokenizer.decode(tokenizer.encode(texts)[0]) == [t.lower() for t in texts]
    with pytest.raises(ValueError, match="repeated"):
        Tokenizer(["red", "Red"])
    with pytest.raises(ValueError, match="single words"):
        Tokenizer(["top left"])
    with pytest.raises(ValueError, match="single words"):
        Tokenizer(["<eos>"])


def make_encoder():
    torch.manual_seed(0)
    tokenizer = Tokenizer(shapes_vocabulary(), max_length=10)
    encoder = TextEncoder(tokenizer.vocab_size, tokenizer.max_length, dim=16, depth=2, num_heads=2).eval()
    return tokenizer, encoder


def test_encoder_shapes_and_config():
    tokenizer, encoder = make_encoder()
    ids, mask = tokenizer.encode(["a red circle", "a blue square at the top left"])
    tokens, out_mask, pooled = encoder(ids, mask)
    assert tokens.shape == (2, 10, 16) and pooled.shape == (2, 16)
    assert torch.equal(out_mask, mask)
    torch.testing.assert_close(pooled[0], tokens[0, :4].mean(dim=0))  # mean of the 3 words and <eos>
    _, default_mask, default_pooled = encoder(ids)  # mask defaults to ids != <pad>
    assert torch.equal(default_mask, mask)
    torch.testing.assert_close(default_pooled, pooled)
    assert TextEncoder(**json.loads(json.dumps(encoder.config))).config == encoder.config


def test_padded_positions_do_not_change_real_tokens():
    tokenizer, encoder = make_encoder()
    ids, mask = tokenizer.encode(["a red circle", "a blue square at the top left"])
    tokens, _, pooled = encoder(ids, mask)
    scrambled = ids.clone()
    scrambled[~mask] = torch.randint(1, tokenizer.vocab_size, (int((~mask).sum()),))
    tokens2, _, pooled2 = encoder(scrambled, mask)
    torch.testing.assert_close(tokens2[mask], tokens[mask])
    torch.testing.assert_close(pooled2, pooled)
    changed = ids.clone()
    changed[0, 1] = tokenizer.stoi["green"]  # a real word does change the encoding
    assert not torch.allclose(encoder(changed, mask)[2][0], pooled[0], atol=1e-4)


def test_depth_zero_keeps_each_token_its_own_word():
    tokenizer = Tokenizer(shapes_vocabulary(), max_length=10)
    torch.manual_seed(0)
    bag, deep = TextEncoder(tokenizer.vocab_size, 10, dim=16, depth=0), TextEncoder(tokenizer.vocab_size, 10, dim=16)
    ids, mask = tokenizer.encode(["a red circle at the top left"])
    changed = ids.clone()
    changed[0, 1] = tokenizer.stoi["green"]  # another colour word
    for encoder, others_move in ((bag, False), (deep, True)):
        tokens, _, _ = encoder(ids, mask)
        tokens2, _, _ = encoder(changed, mask)
        assert not torch.allclose(tokens2[0, 1], tokens[0, 1])
        assert torch.allclose(tokens2[0, 2:], tokens[0, 2:]) != others_move  # the shape word hears the colour?
    with pytest.raises(ValueError, match="depth must be a non-negative int"):
        TextEncoder(tokenizer.vocab_size, 10, depth=-1)


def test_encoder_errors():
    _, encoder = make_encoder()
    with pytest.raises(ValueError, match="ids must lie in"):
        encoder(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="max_length=10"):
        encoder(torch.ones(1, 11, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one True"):
        encoder(torch.zeros(1, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer token ids"):
        encoder(torch.ones(2, 10))
