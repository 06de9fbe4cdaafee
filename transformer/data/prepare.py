"""Data prepared once: per run directory, the tokenizer (given, cached in the run, or trained on the training text)
and, for the token-stream tasks, the encoded token streams, so a resumed run trains on exactly the same tokens; or
(data.prepared) token shards in a cache that every run of the same data and tokenizer shares (`shards.py`)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from transformer.config import Config, ConfigError, DataConfig
from transformer.data.shards import cache_key, prepare_shards
from transformer.data.sources import load_texts, source_identity, split_text, stream_texts
from transformer.data.tokenizer import (
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_json,
)
from transformer.files import write_atomic, write_json_atomic

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
            write_atomic(path, lambda f, arr=arr: np.save(f, arr), binary=True)
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


def cache_root(cfg: DataConfig) -> str:
    return os.path.expanduser(cfg.cache_dir or os.environ.get("TRANSFORMER_CACHE", "") or "~/.cache/transformer")


def prepared_shards(cfg: DataConfig, tok: Tokenizer | None = None, log=print) -> tuple[Tokenizer, str]:
    """The tokenizer (given, or trained on a sample of the training text and cached) and the shard cache of this
    data, prepared now unless a complete one is there. Without validation data, every k-th document (k = 1 /
    data.val_fraction) is held out."""
    source = source_identity(cfg)
    root = cache_root(cfg)
    tok = tok or _sample_tokenizer(cfg, source, root, log)
    val_every = 0 if source["val"] else max(2, round(1.0 / cfg.val_fraction))

    def documents():
        for i, text in enumerate(stream_texts(cfg)):
            yield ("val" if val_every and (i + 1) % val_every == 0 else "train"), text
        for text in stream_texts(cfg, val=True):
            yield "val", text

    cache = os.path.join(root, "shards", cache_key(source=source, tokenizer=tok.to_json(), val_every=val_every,
                                                   shard_tokens=cfg.shard_tokens))
    prepare_shards(documents, tok, cache, workers=cfg.workers, shard_tokens=cfg.shard_tokens, log=log)
    return tok, cache


def _sample_tokenizer(cfg: DataConfig, source: dict, root: str, log) -> Tokenizer:
    """A tokenizer trained on the first data.tokenizer_sample_mb MB of the training documents, cached by what it
    depends on (a given sentencepiece model is read as it is)."""
    if cfg.tokenizer == "sentencepiece" and cfg.tokenizer_model:
        return build_tokenizer(cfg, "")
    settings = {k: getattr(cfg, k) for k in ("tokenizer", "vocab_size", "sp_model_type", "tokenizer_sample_mb")}
    path = os.path.join(root, "tokenizers", cache_key(source=source["train"], settings=settings) + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return tokenizer_from_json(json.load(f))
    sample = _tokenizer_sample(cfg)
    log(f"training the {cfg.tokenizer} tokenizer on {len(sample) / 2**20:.1f} MB of the training text")
    if len(sample) > SEPARATE_TRAINING_MB * 2**20:
        # Training on a large sample takes ~17x its size in memory (sentencepiece, 64 MB: 1.1 GB), which the
        # allocator keeps after training: in a process of its own, which reads the sample again, it goes back before
        # the shards are written, and this process holds no copy meanwhile (2 GB corpus: 2.1 GB -> under 1.5).
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        del sample
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            tok = tokenizer_from_json(pool.submit(_trained_tokenizer_json, cfg).result())
    else:
        tok = tokenizer_from_json(_trained_tokenizer_json(cfg, sample))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, tok.to_json())
    return tok


def _tokenizer_sample(cfg: DataConfig) -> str:
    """The first data.tokenizer_sample_mb MB of the training documents, joined by blank lines."""
    budget, texts = int(cfg.tokenizer_sample_mb * 2**20), []
    for text in stream_texts(cfg):
        texts.append(text)
        budget -= len(text)
        if budget <= 0:
            break
    sample = "\n\n".join(texts)[:int(cfg.tokenizer_sample_mb * 2**20)]
    if not sample.strip():
        raise ConfigError(f"the training data at data.path={cfg.path!r} has no text ({len(texts)} document(s), all "
                          "empty); point data.path at the corpus (and data.text_column at its text column)")
    return sample


SEPARATE_TRAINING_MB = 8  # samples above this train in a process of their own


def _trained_tokenizer_json(cfg: DataConfig, sample: str | None = None) -> dict:
    sample = _tokenizer_sample(cfg) if sample is None else sample
    # characters get an end-of-text id of their own (the others have one: sentencepiece's eos, BPE's <|endoftext|>)
    tok = CharTokenizer(sample, end_of_text=True) if cfg.tokenizer == "char" else build_tokenizer(cfg, sample)
    return tok.to_json()
