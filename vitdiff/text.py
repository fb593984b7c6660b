"""Text conditioning without downloads (chapter 05): a word-level tokenizer and a small text encoder.

In Stable Diffusion this role is filled by CLIP's pretrained text transformer: its per-token states
are the U-Net's cross-attention context. Here no pretrained encoder exists offline, so a small
transformer is trained jointly with the denoiser on the captions of the Shapes dataset.

Shapes: B batch, L tokens (= max_length), D encoder width.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import TransformerBlock, _check_positive_int

PAD, EOS = "<pad>", "<eos>"


class Tokenizer:
    """Word-level tokenizer over a closed vocabulary: lower-case, split on whitespace, append <eos>, pad.

    Ids: <pad> = 0, <eos> = 1, then the vocabulary words in order. Every caption becomes exactly
    max_length ids (its words, <eos>, padding), so captions of at most max_length - 1 words fit.
    The empty caption "" is just <eos>: the "null" text for classifier-free guidance.
    """

    def __init__(self, vocabulary: list[str], max_length: int = 16):
        if isinstance(vocabulary, str) or not hasattr(vocabulary, "__iter__"):
            raise TypeError(f"vocabulary must be a list of words (strings), got {vocabulary!r}")
        vocabulary = list(vocabulary)
        if not all(isinstance(w, str) for w in vocabulary):
            raise TypeError(f"vocabulary must be a list of words (strings), got {vocabulary!r}")
        words = [w.lower() for w in vocabulary]
        if len(set(words)) != len(words):
            repeated = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"vocabulary has repeated words (after lower-casing): {repeated}")
        if any(not w or w.split() != [w] or w in (PAD, EOS) for w in words):
            raise ValueError(f"vocabulary entries must be single words other than {PAD} and {EOS}, got {words}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (at least one word and <eos>), got {max_length!r}")
        self.max_length = max_length
        self.itos = [PAD, EOS, *words]  # id -> token
        self.stoi = {s: i for i, s in enumerate(self.itos)}  # token -> id
        self.pad_id, self.eos_id = 0, 1
        self.config = dict(vocabulary=words, max_length=max_length)

    @classmethod
    def from_texts(cls, texts: list[str], max_length: int = 16) -> Tokenizer:
        """A tokenizer whose vocabulary is every word of `texts`, in order of first appearance."""
        if isinstance(texts, str) or not hasattr(texts, "__iter__"):
            raise TypeError(f"texts must be a list of captions (strings), got {texts!r}")
        texts = list(texts)
        if not all(isinstance(text, str) for text in texts):
            raise TypeError(f"texts must be a list of captions (strings), got {texts!r}")
        words = dict.fromkeys(w for text in texts for w in text.lower().split())
        return cls(list(words), max_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ids (B, L) int64 and mask (B, L) bool (True = real token, <eos> included)."""
        if isinstance(texts, str):
            texts = [texts]
        if not hasattr(texts, "__iter__"):
            raise TypeError(f"texts must be a caption (str) or a list of captions, got {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise ValueError("texts is an empty list: pass at least one caption ('' is the null caption)")
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must hold strings (captions), got {type(text).__name__} at position {row}")
            words = text.lower().split()
            if len(words) + 1 > self.max_length:
                raise ValueError(f"caption {text!r} has {len(words)} words, but max_length={self.max_length} "
                                 f"holds at most {self.max_length - 1} words plus <eos>; "
                                 "build the tokenizer with a larger max_length")
            for col, word in enumerate(words):
                if word not in self.stoi or word in (PAD, EOS):
                    raise ValueError(f"unknown word {word!r} in caption {text!r}; the vocabulary is "
                                     f"{self.itos[2:]}. Fix: add {word!r} to the vocabulary list, or build "
                                     "the tokenizer with Tokenizer.from_texts(all_captions)")
                ids[row, col] = self.stoi[word]
            ids[row, len(words)] = self.eos_id
        return ids, ids != self.pad_id

    def decode(self, ids: torch.Tensor | list) -> list[str]:
        """ids (B, L) or (L,) -> captions: the words before the first <eos>, padding dropped."""
        ids = torch.as_tensor(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, L) or (L,), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in 0..{self.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}")
        texts = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == self.eos_id:
                    break
                if i != self.pad_id:
                    words.append(self.itos[i])
            texts.append(" ".join(words))
        return texts


class TextEncoder(nn.Module):
    """Small text transformer: token + learned position embeddings -> blocks (padding masked) -> LayerNorm.

    forward(ids, mask) -> (tokens (B, L, dim), mask (B, L), pooled (B, dim)); pooled is the mean of
    the real tokens. Padded positions are never attended to, so they cannot change the real tokens.
    With depth=0 there are no blocks: each token is its word and place only, nothing of its neighbours.
    """

    def __init__(self, vocab_size: int, max_length: int, dim: int = 128, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 4.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_length", max_length), ("dim", dim),
                            ("num_heads", num_heads)):
            _check_positive_int(name, value)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:  # 0: each token is only its word
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        self.vocab_size, self.max_length, self.dim = vocab_size, max_length, dim
        self.config = dict(vocab_size=vocab_size, max_length=max_length, dim=dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        self.blocks = nn.ModuleList([TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (B, L) int64, mask (B, L) bool (default ids != 0) -> tokens (B, L, D), mask, pooled (B, D)."""
        if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be integer token ids of shape (B, L), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"ids must hold at least one caption of at least one token, got shape "
                             f"{tuple(ids.shape)}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"ids have length {ids.shape[1]}, more than max_length={self.max_length}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"ids must lie in 0..{self.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}")
        if mask is None:
            mask = ids != 0
        if mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(f"mask must be bool of shape {tuple(ids.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        if not mask.any(dim=1).all():
            raise ValueError("every row of mask needs at least one True (real) token, e.g. <eos>")
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask=mask)  # padded keys masked out for every query
        tokens = self.norm(x)
        weights = mask.to(tokens.dtype)[:, :, None]  # (B, L, 1)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)  # (B, D)
        return tokens, mask, pooled
