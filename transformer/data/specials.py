"""The special token ids a task frames its sequences with: the tokenizer's own when it has them, otherwise ids
appended after its vocabulary (which then grows the model's vocabulary)."""
from __future__ import annotations

from typing import NamedTuple


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


def translation_ids(tok) -> tuple[int, int, int, int]:
    """(bos, eos, pad, model vocabulary): the tokenizer's own when it has them (sentencepiece), otherwise three ids
    appended after its vocabulary (a char tokenizer)."""
    if None not in (tok.bos_id, tok.eos_id, tok.pad_id):
        return tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size
    V = tok.vocab_size
    return V, V + 1, V + 2, V + 3
