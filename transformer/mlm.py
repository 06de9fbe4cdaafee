"""Masked-language-model data: BERT's corruption recipe, applied in the input pipeline with a seed.

Of the real tokens of each sequence, `rate` (15%) are selected; a selected token becomes [MASK] with probability
0.8, a random vocabulary token with 0.1, and stays unchanged with 0.1. The loss is taken on selected positions only.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Specials(NamedTuple):
    """Ids of the encoder's special tokens."""
    cls: int
    sep: int
    mask: int
    pad: int


def specials_for(tokenizer) -> tuple[Specials, int]:
    """The tokenizer's own [CLS] / [SEP] / [MASK] / [PAD] when it has them (WordPiece), otherwise four ids appended
    after its vocabulary. Returns the specials and the model's vocabulary size."""
    own = [getattr(tokenizer, f"{name}_id", None) for name in ("cls", "sep", "mask")]
    if all(i is not None for i in own) and tokenizer.pad_id is not None:
        return Specials(*own, tokenizer.pad_id), tokenizer.vocab_size
    V = tokenizer.vocab_size
    return Specials(V, V + 1, V + 2, V + 3), V + 4


def frame(chunks_BL: np.ndarray, sp: Specials) -> np.ndarray:
    """[CLS] chunk [SEP] for each row: packed text blocks become encoder inputs of length L + 2."""
    B = chunks_BL.shape[0]
    return np.concatenate([np.full((B, 1), sp.cls), chunks_BL, np.full((B, 1), sp.sep)], axis=1).astype(np.int32)


def mask_tokens(tokens_BT: np.ndarray, rng: np.random.Generator, sp: Specials, n_regular: int,
                rate: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (inputs, targets, weights): corrupted inputs, the original tokens, and 1.0 at the selected positions.

    Special tokens are never selected; random replacements are drawn from the `n_regular` ordinary token ids.
    """
    tokens_BT = np.asarray(tokens_BT, np.int32)
    special = np.isin(tokens_BT, np.asarray(sp, np.int32))
    selected = (rng.random(tokens_BT.shape) < rate) & ~special
    roll = rng.random(tokens_BT.shape)
    to_mask = selected & (roll < 0.8)
    to_random = selected & (roll >= 0.8) & (roll < 0.9)
    inputs = np.where(to_mask, sp.mask, tokens_BT)
    inputs = np.where(to_random, rng.integers(0, n_regular, tokens_BT.shape), inputs).astype(np.int32)
    return inputs, tokens_BT, selected.astype(np.float32)
