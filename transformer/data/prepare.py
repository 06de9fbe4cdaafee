"""Data prepared once per run directory: the tokenizer (given, cached in the run, or trained on the training text)
and, for the token-stream tasks, the encoded token streams, so a resumed run trains on exactly the same tokens."""
from __future__ import annotations

import os

import jax
import numpy as np

from transformer.config import Config, ConfigError
from transformer.data.sources import load_texts, split_text
from transformer.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, save_tokenizer

TOKENS_DIR = "tokens"


def token_streams(cfg: Config, run_dir: str, tok: Tokenizer | None = None) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Tokenizer (trained here unless given) and the (train, val) token streams; cached in the run dir."""
    tok_dir = os.path.join(run_dir, TOKENS_DIR)
    train_path, val_path = os.path.join(tok_dir, "train.npy"), os.path.join(tok_dir, "val.npy")
    if all(os.path.exists(p) for p in (train_path, val_path, os.path.join(run_dir, "tokenizer.json"))):
        return load_tokenizer(run_dir), np.load(train_path), np.load(val_path)
    docs, val_docs = load_texts(cfg.data)
    train_text, val_text = split_text(docs, cfg.data.val_fraction, val_docs)
    tok = tok or build_tokenizer(cfg.data, train_text, val_text)
    train_tokens, val_tokens = tok.encode(train_text), tok.encode(val_text)
    if jax.process_index() == 0:  # every host computes the same tokens; one writes the cache
        os.makedirs(tok_dir, exist_ok=True)
        for path, arr in ((train_path, train_tokens), (val_path, val_tokens)):
            tmp = f"{path}.tmp{os.getpid()}.npy"
            np.save(tmp, arr)
            os.replace(tmp, path)
        save_tokenizer(tok, run_dir)
    return tok, train_tokens, val_tokens


def hold_out(items: list, fraction: float, alternative: str) -> tuple[list, list]:
    """(train, val): a seeded random `fraction` of the items held out for validation (files are often sorted, by
    label for instance, so a tail would not do)."""
    order = np.random.default_rng(0).permutation(len(items))
    cut = int(len(items) * (1.0 - fraction))
    if not 0 < cut < len(items):
        raise ConfigError(f"cannot hold out data.val_fraction={fraction} of {len(items)} examples; give more data "
                          f"or {alternative}")
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]


def text_tokenizer(cfg: Config, run_dir: str, tok: Tokenizer | None, train_texts, val_texts) -> Tokenizer:
    """The given tokenizer, the run's cached one, or one trained on the texts; saved with the run."""
    if tok is None and os.path.exists(os.path.join(run_dir, "tokenizer.json")):
        tok = load_tokenizer(run_dir)
    if tok is None:
        tok = build_tokenizer(cfg.data, "\n".join(train_texts), "\n".join(val_texts))
    if jax.process_index() == 0:
        save_tokenizer(tok, run_dir)
    return tok
