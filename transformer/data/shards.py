"""Token shards, prepared once and shared by every run that reads the same data with the same tokenizer.

Documents stream in from their source (nothing holds the corpus in memory), are tokenized in parallel worker
processes, and land in flat token files with an end-of-text token after every document:

    CACHE/index.json        what is done: the flushes of shards (token counts, documents consumed), complete or not
    CACHE/train_00000.bin   raw little-endian tokens, uint16 when the ids fit, else uint32
    CACHE/val_00000.bin     the validation documents (the caller says which documents are which)
    CACHE/.lock             held while preparing: a second preparer waits, then finds the work done

A flush writes the train shard (and the validation documents gathered since the last flush) at a document boundary,
each file to a temporary name first, then records it in index.json (atomically replaced). A killed preparation
resumes after the last recorded flush, skipping the documents it consumed, and writes the same bytes an uninterrupted
one would; a file the index does not list is never read, and a listed file of the wrong size is rebuilt from its
flush on.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import itertools
import json
import mmap
import multiprocessing
import os
from typing import Callable, Iterable, Iterator

import numpy as np

from transformer.config import ConfigError
from transformer.data.tokenizer import tokenizer_from_json
from transformer.files import write_atomic, write_json_atomic

FORMAT = 1
INDEX = "index.json"
SPLITS = ("train", "val")


def cache_key(**what) -> str:
    """A cache directory's name: a hash of what its contents depend on (the data's identity, the tokenizer, the
    layout), so a change to any of them prepares a new cache and runs that agree share one."""
    what = dict(what, format=FORMAT)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def end_of_text(tok) -> tuple[int, int]:
    """(the end-of-text id, the model's vocabulary): the tokenizer's EOS, or one id appended after its vocabulary."""
    return (tok.eos_id, tok.vocab_size) if tok.eos_id is not None else (tok.vocab_size, tok.vocab_size + 1)


def prepare_shards(docs: Callable[[], Iterable[tuple[str, str]]], tok, cache_dir: str, *, workers: int = 1,
                   shard_tokens: int = 1 << 24, chunk_docs: int = 256,
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """Tokenize the (split, text) documents `docs()` yields, in the same order every time, into shards under
    `cache_dir` (resuming a preparation cut short, or returning at once when it is complete); returns the index."""
    os.makedirs(cache_dir, exist_ok=True)
    eot, vocab = end_of_text(tok)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    with _locked(cache_dir):
        index = _valid_prefix(cache_dir, read_index(cache_dir))
        if index is not None and index["complete"]:
            return index
        if index is None:
            index = {"format": FORMAT, "eot": eot, "vocab": vocab, "dtype": np.dtype(dtype).name, "flushes": [],
                     "complete": False}
        done = index["flushes"][-1]["docs"] if index["flushes"] else 0
        if done:
            log(f"resuming the preparation of {cache_dir} after {done:,} documents")
        buffers, counts, n_docs = {s: [] for s in SPLITS}, dict.fromkeys(SPLITS, 0), done

        def flush():
            record = {"docs": n_docs}
            for split in SPLITS:
                if counts[split]:
                    name = f"{split}_{sum(split in f for f in index['flushes']):05d}.bin"
                    write_atomic(os.path.join(cache_dir, name), np.concatenate(buffers[split]).astype(dtype).tofile,
                                 binary=True, durable=True)
                    record[split] = [name, counts[split]]
                buffers[split], counts[split] = [], 0
            index["flushes"].append(record)
            write_index(cache_dir, index)

        for split, ids in _tokenized(itertools.islice(docs(), done, None), tok.to_json(), eot, workers, chunk_docs):
            n_docs += 1  # empty documents count too: resuming skips documents of the source, not of the output
            if len(ids):
                buffers[split].append(ids)
                counts[split] += len(ids)
            if counts["train"] >= shard_tokens:
                flush()
                log(f"{n_docs:,} documents, {total_tokens(index, 'train'):,} training tokens")
        if not total_tokens(index, "train") + counts["train"]:
            raise ConfigError("the corpus has no text to train on: every document is empty")
        if any(counts.values()):
            flush()
        index["complete"] = True
        write_index(cache_dir, index)
        return index


def total_tokens(index: dict, split: str) -> int:
    return sum(f[split][1] for f in index["flushes"] if split in f)


def shard_files(cache_dir: str, index: dict, split: str) -> list[tuple[str, int]]:
    return [(os.path.join(cache_dir, f[split][0]), f[split][1]) for f in index["flushes"] if split in f]


def read_index(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, INDEX)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            return None
        return index
    except (ValueError, OSError):  # unreadable: prepared again from the start
        return None


def write_index(cache_dir: str, index: dict) -> None:
    write_json_atomic(os.path.join(cache_dir, INDEX), index, durable=True)


class TokenShards:
    """A split's shards, memory-mapped (nothing is read until asked for): `len()` tokens, `shards` the arrays."""

    def __init__(self, cache_dir: str, split: str = "train"):
        index = read_index(cache_dir)
        if index is None or not index["complete"]:
            raise ConfigError(f"{cache_dir} holds no complete prepared data; run python -m transformer.prepare")
        self.cache_dir, self.eot, self.vocab = cache_dir, index["eot"], index["vocab"]
        dtype = np.dtype(index["dtype"])
        self.shards = []
        for path, n in shard_files(cache_dir, index, split):
            if not os.path.exists(path) or os.path.getsize(path) != n * dtype.itemsize:
                raise ConfigError(f"prepared shard {path} is missing or truncated; run python -m transformer.prepare "
                                  "again to rebuild it")
            self.shards.append(_mapped(path, dtype, n))

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)


def _mapped(path: str, dtype: np.dtype, n: int) -> np.ndarray:
    """The file as a read-only array over a memory map advised for random access: a page fault reads its page, not
    the kernel's readahead window (a loader reads 2 KB blocks in random order)."""
    if n == 0:
        return np.zeros(0, dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mm, dtype, count=n)


def _valid_prefix(cache_dir: str, index: dict | None) -> dict | None:
    """The index cut back to its flushes whose files are all there at their recorded sizes (a later flush is
    prepared again): a damaged shard is rebuilt, never read."""
    if index is None:
        return None
    itemsize = np.dtype(index["dtype"]).itemsize
    for k, record in enumerate(index["flushes"]):
        files = [record[s] for s in SPLITS if s in record]
        if not all(os.path.exists(p := os.path.join(cache_dir, name)) and os.path.getsize(p) == n * itemsize
                   for name, n in files):
            index = dict(index, flushes=index["flushes"][:k], complete=False)
            break
    return index


@contextlib.contextmanager
def _locked(cache_dir: str):
    with open(os.path.join(cache_dir, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_worker_tok = None


def _init_worker(tokenizer_json: dict) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_tok = tokenizer_from_json(tokenizer_json)


def _encode_chunk(docs: list[tuple[str, str]], eot: int, tok=None) -> list[tuple[str, np.ndarray]]:
    tok = tok or _worker_tok
    texts = [text for _, text in docs]
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    return [(split, np.append(np.asarray(ids, np.int64), eot) if text else np.zeros(0, np.int64))
            for (split, text), ids in zip(docs, encoded)]


def _tokenized(docs: Iterable[tuple[str, str]], tokenizer_json: dict, eot: int, workers: int,
               chunk_docs: int) -> Iterator[tuple[str, np.ndarray]]:
    """Each document's split and ids with its end-of-text token, in document order; with several workers, chunks of
    documents are encoded in that many processes, at most two chunks per worker in flight (memory stays bounded)."""
    chunks = iter(lambda it=iter(docs): list(itertools.islice(it, chunk_docs)), [])
    if workers <= 1:
        tok = tokenizer_from_json(tokenizer_json)
        for chunk in chunks:
            yield from _encode_chunk(chunk, eot, tok)
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX's threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk, eot)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
