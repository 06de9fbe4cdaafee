"""Inference with encoder models: fill-mask, classification and sentence embeddings (what `sample.py` calls for a run
whose model.arch is "encoder")."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.config import ConfigError
from transformer.data.specials import Specials, specials_for
from transformer.data.tokenizer import SentencePieceTokenizer
from transformer.model.encoder import mean_pool

MASK_TEXT = "[MASK]"


def encode_text(tok, text: str, sp: Specials, max_len: int) -> np.ndarray:
    """[CLS] text [SEP] with every "[MASK]" in the text as the mask token. A WordPiece tokenizer does all of this
    itself; for the others the text is split on "[MASK]" and framed here.

    A sentencepiece tokenizer writes a space as part of the piece after it ("The break" is "The", "▁break"), so a
    space right before a [MASK] belongs to the masked word: it is left out of the text before the mask, which is then
    encoded as in training ("The", [MASK], "▁statement") rather than as "The", "▁", [MASK], ... -- a lone "▁" that in
    the training text mostly starts a run of indentation, which makes the model predict another "▁"."""
    if getattr(tok, "mask_id", None) == sp.mask:
        ids = np.asarray(tok.encode(text), np.int32)
    else:
        parts = text.split(MASK_TEXT)
        if _spaces_in_next_piece(tok):
            parts = [p[:-1] if p.endswith(" ") else p for p in parts[:-1]] + parts[-1:]
        parts = [np.asarray(tok.encode(p), np.int32) for p in parts]
        pieces = [parts[0]]
        for p in parts[1:]:
            pieces += [np.array([sp.mask], np.int32), p]
        ids = np.concatenate([[sp.cls], *pieces, [sp.sep]]).astype(np.int32)
    if len(ids) > max_len:
        raise ConfigError(f"the text is {len(ids)} tokens with [CLS] and [SEP]; this model reads at most {max_len}")
    return ids


def _spaces_in_next_piece(tok) -> bool:
    return isinstance(tok, SentencePieceTokenizer)


def _stands_alone(tok, i: int, piece: str) -> bool:
    """Whether sentencepiece piece i, whose text is `piece`, is a fill-mask candidate: visible text that the tokenizer
    writes as this one piece. That leaves out whitespace-only pieces, <unk> (" ⁇ "), the control pieces and byte pieces
    (an incomplete UTF-8 byte decodes to "\ufffd"; a whole character has its own piece)."""
    return piece.strip().isprintable() and piece.strip() != "" and tok.encode(piece).tolist() == [i]


def _batch(run, texts: list[str]):
    sp, _ = specials_for(run.tokenizer)
    rows = [encode_text(run.tokenizer, t, sp, run.cfg.model.max_len) for t in texts]
    T = max(len(r) for r in rows)
    tokens = np.full((len(rows), T), sp.pad, np.int32)
    valid = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], valid[i, :len(r)] = r, True
    return sp, tokens, valid


@functools.lru_cache(maxsize=8)
def _fn(graphdef, what: str):
    def f(params, tokens, valid):
        model = nnx.merge(graphdef, params)
        if what == "mlm":
            return jax.nn.softmax(model(tokens, valid_BT=valid), axis=-1)
        if what == "classify":
            return jax.nn.softmax(model.classify(tokens, valid_BT=valid), axis=-1)
        return mean_pool(model.hidden(tokens, valid_BT=valid), valid)
    return jax.jit(f)


def fill_mask(run, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in the text, the top_k (token text, probability) predictions.

    With a sentencepiece tokenizer the candidates are the pieces that can stand for the masked text on their own,
    shown as the text that replaces "[MASK]": after a space (which encode_text gives to the mask) only pieces that
    start a word ("▁break", shown as "break"); never a piece that is only whitespace (a bare "▁" says the word is
    still to come in pieces this one position cannot show), <unk>, a byte piece or an appended special token. The
    probabilities are the model's over the whole vocabulary, so the pieces left out keep their share."""
    if MASK_TEXT not in text:
        raise ConfigError(f"--fill-mask needs at least one {MASK_TEXT} in the text")
    sp, tokens, valid = _batch(run, [text])
    probs_TV = np.asarray(_fn(run.graphdef, "mlm")(run.params, jnp.asarray(tokens), jnp.asarray(valid)))[0]
    tok = run.tokenizer
    words = _spaces_in_next_piece(tok)
    after_space = [p.endswith(" ") for p in text.split(MASK_TEXT)[:-1]]
    out = []
    for k, t in enumerate(np.flatnonzero(tokens[0] == sp.mask)):
        if not words:
            best = np.argsort(-probs_TV[t])[:top_k]
            out.append([(tok.decode([int(i)]), float(probs_TV[t, i])) for i in best])
            continue
        preds = []
        for i in map(int, np.argsort(-probs_TV[t, :tok.vocab_size])):  # the appended specials are never candidates
            piece = tok.decode([i])
            if not _stands_alone(tok, i, piece) or (after_space[k] and not piece.startswith(" ")):
                continue
            preds.append((piece[1:] if after_space[k] else piece, float(probs_TV[t, i])))
            if len(preds) == top_k:
                break
        out.append(preds)
    return out


def classify(run, texts: list[str]) -> np.ndarray:
    """Label probabilities, one row per text."""
    if not run.cfg.model.n_classes:
        raise ConfigError("this run has no classification head (model.n_classes is 0); fine-tune one with a "
                          "configs/classify_* preset")
    _, tokens, valid = _batch(run, texts)
    return np.asarray(_fn(run.graphdef, "classify")(run.params, jnp.asarray(tokens), jnp.asarray(valid)))


def embed(run, texts: list[str]) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings, one row per text."""
    _, tokens, valid = _batch(run, texts)
    return np.asarray(_fn(run.graphdef, "embed")(run.params, jnp.asarray(tokens), jnp.asarray(valid)))
