"""Text in, batches of token blocks out.

`load_texts` reads documents from the embedded default corpus, local files or the Hugging Face hub; `split_text`
turns them into one training and one validation string; `BlockIterator` packs the token stream into next-token
prediction blocks in a resumable, seed-determined order; `eval_batches` gives a fixed validation set. Hub datasets
come from the local Hugging Face cache alone when the hub is unreachable or HF_HUB_OFFLINE=1 is set.

The default corpus (data.path = "") is the documentation text shipped inside Python's standard library:
`pydoc_data.topics.topics`, the ~80 help topics that `help("if")`, `help("FORMATTING")` and friends print (the
language reference sections on statements, operators, formatting, the data model, ...). It is about 465 KB of English
prose with code examples, licensed with CPython (PSF License), and present wherever Python is, so a first run needs no
download. Its documents are the topic texts in sorted key order.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
import warnings

import numpy as np

from transformer.config import ConfigError, DataConfig

DEFAULT_CORPUS = "pydoc_data.topics"

# File extension -> `datasets` builder; None means read directly as UTF-8 text, one document per file.
_BUILDERS = {".txt": None, ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# "owner/name" or a bare canonical name such as "wikitext".
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def default_corpus() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data from minimal installs
        raise ConfigError(f"the default corpus ({DEFAULT_CORPUS}) is missing from this Python; set data.path") from None
    return [topics[k] for k in sorted(topics)]


def load_texts(cfg: DataConfig) -> tuple[list[str], list[str] | None]:
    """The training documents and the validation documents (None when no validation data is given)."""
    from_hub = cfg.path != "" and not _is_local(cfg.path)
    if cfg.path == "":
        train = default_corpus()
    elif from_hub:
        train = _load_hub(cfg.path, cfg.name, cfg.split, cfg.text_column)
    else:
        train = _read_local(cfg.path, cfg.text_column)

    if cfg.val_path:
        return train, _read_local(cfg.val_path, cfg.text_column)
    if cfg.val_split:
        if not from_hub:
            raise ConfigError("data.val_split names a split of a hub dataset; for local data set data.val_path")
        return train, _load_hub(cfg.path, cfg.name, cfg.val_split, cfg.text_column)
    return train, None


def load_examples(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
    """(text, label) pairs for classification from local .csv / .json / .jsonl / .parquet files or a hub dataset:
    the training examples, and the validation ones (None when no validation data is given)."""
    if cfg.path == "":
        raise ConfigError("classification needs data.path: a .csv / .jsonl / .parquet file or a hub dataset with "
                          f"columns {cfg.text_column!r} and {cfg.label_column!r}")
    from_hub = not _is_local(cfg.path)

    def read(path, split):
        import datasets

        if from_hub and path == cfg.path:
            ds = _hub_dataset(path, cfg.name, split)
        else:
            files = _local_files(path)
            builders = {_BUILDERS.get(_ext(f)) for f in files}
            if len(builders) != 1 or None in builders:
                raise ConfigError(f"classification data {path} must be .csv, .json, .jsonl or .parquet files of one "
                                  "type")
            try:
                ds = datasets.load_dataset(builders.pop(), data_files=files, split="train")
            except Exception as e:
                raise ConfigError(f"could not read {path}: {type(e).__name__}: {_first_line(e)}") from None
        missing = [c for c in (cfg.text_column, cfg.label_column) if c not in ds.column_names]
        if missing:
            raise ConfigError(f"{path} has no column {missing[0]!r} (data.text_column / data.label_column); "
                              f"available columns: {', '.join(ds.column_names)}")
        rows = [(t, str(lab)) for t, lab in zip(ds[cfg.text_column], ds[cfg.label_column])
                if isinstance(t, str) and t and lab is not None]
        if not rows:
            raise ConfigError(f"no labelled text in {path}")
        return rows

    train = read(cfg.path, cfg.split)
    if cfg.val_path:
        return train, read(cfg.val_path, "train")
    if cfg.val_split:
        return train, read(cfg.path, cfg.val_split)
    return train, None


def load_pairs(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
    """(source, target) sentence pairs for translation: training pairs, and validation pairs (None if not given)."""
    if cfg.source_file or cfg.target_file:
        train = _read_aligned(cfg.source_file, cfg.target_file)
        val = _read_aligned(cfg.val_source_file, cfg.val_target_file) if (cfg.val_source_file or
                                                                          cfg.val_target_file) else None
        return train, val
    if not cfg.path:
        raise ConfigError("translation needs data.source_file and data.target_file (aligned text files), or "
                          "data.path naming a hub dataset with a 'translation' column")

    def hub(split):
        ds = _hub_dataset(cfg.path, cfg.name, split)
        if "translation" not in ds.column_names:
            raise ConfigError(f"{cfg.path} has no 'translation' column; available: {', '.join(ds.column_names)}")
        pairs = [(t.get(cfg.source_lang), t.get(cfg.target_lang)) for t in ds["translation"]]
        pairs = [(a, b) for a, b in pairs if a and b]
        if not pairs:
            raise ConfigError(f"no {cfg.source_lang}-{cfg.target_lang} pairs in {cfg.path} ({split})")
        return pairs

    return hub(cfg.split), hub(cfg.val_split) if cfg.val_split else None


def _read_aligned(source: str, target: str) -> list[tuple[str, str]]:
    if not (source and target):
        raise ConfigError("give both files of a parallel corpus (data.source_file and data.target_file, or "
                          "data.val_source_file and data.val_target_file)")
    src, tgt = (_read_txt(_local_files(p)[0]).splitlines() for p in (source, target))
    if len(src) != len(tgt):
        raise ConfigError(f"{source} has {len(src)} lines but {target} has {len(tgt)}: the files are not aligned "
                          "line by line")
    pairs = [(a.strip(), b.strip()) for a, b in zip(src, tgt) if a.strip() and b.strip()]
    if not pairs:
        raise ConfigError(f"no sentence pairs in {source} / {target}")
    return pairs


def label_names(examples: list[tuple[str, str]]) -> list[str]:
    """The sorted distinct labels (numerically when they all are integers): label id i is names[i]."""
    names = sorted({lab for _, lab in examples})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    return names


def split_text(docs: list[str], val_fraction: float, val_docs: list[str] | None = None) -> tuple[str, str]:
    """(train_text, val_text). Without validation documents, the last `val_fraction` of the characters of the joined
    training documents is held out: a contiguous tail, so no block of validation text was seen in training."""
    text = "\n\n".join(docs)
    if val_docs is not None:
        return text, "\n\n".join(val_docs)
    cut = int(len(text) * (1.0 - val_fraction))
    if not 0 < cut < len(text):
        raise ConfigError(f"cannot hold out data.val_fraction={val_fraction} of {len(text)} characters; "
                          "give more text or a separate data.val_path")
    return text[:cut], text[cut:]


def take_across_epochs(order_of, epoch: int, index: int, n: int, convert=None) -> tuple[np.ndarray, int, int]:
    """The next n items of an endless run of epochs, epoch e visiting `order_of(e)`, from position (epoch, index); a
    batch may run over the end of an epoch into the next one. `convert(e, items)` maps each epoch's share (e.g. to
    token offsets). Returns (items, epoch, index) with the position after them."""
    out = []
    while n:
        order = order_of(epoch)
        take = order[index:index + n]
        out.append(take if convert is None else convert(epoch, take))
        index += len(take)
        n -= len(take)
        if index == len(order):
            epoch, index = epoch + 1, 0
    return np.concatenate(out), epoch, index


def checked_position(state: dict, epoch_length, what: str) -> tuple[int, int]:
    """(epoch, index) of a saved iterator state, if it lies inside this data's epochs (`epoch_length(e)` items in
    epoch e); a ConfigError if not."""
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < epoch_length(epoch):
        raise ConfigError(f"data iterator state {state} does not fit these {what}; were the data, the batch size or "
                          "model.max_len changed since the checkpoint?")
    return epoch, index


class BlockIterator:
    """Endless batches of (x_BT, y_BT) blocks of a token stream, y being x shifted by one token.

    Epoch e starts the blocks at a random offset o in [0, T) (so block boundaries move between epochs) and visits
    them in a random order; both come from np.random.default_rng([seed, epoch]), so the order is a pure function of
    (seed, epoch) and the position is just (epoch, index): `state()` / `restore()` resume exactly.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.tokens = np.asarray(tokens, np.int32)
        if self.tokens.ndim != 1:
            raise ConfigError(f"BlockIterator wants a 1-D token stream, got shape {self.tokens.shape}")
        if len(self.tokens) < block_size + 1:
            raise ConfigError(f"the block size T={block_size} is longer than the whole dataset ({len(self.tokens)} "
                              "tokens); lower model.max_len or give more data")
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.epoch, self.index = 0, 0  # index: blocks of this epoch's permutation already served
        self._plan_epoch = None

    def _plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, block permutation) of an epoch, cached because it costs O(n_blocks) to draw."""
        if self._plan_epoch != epoch:
            T, n = self.block_size, len(self.tokens)
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(min(T, n - T)))  # clipped on tiny data so an epoch has at least one block
            self._plan_epoch, self._offset, self._perm = epoch, offset, rng.permutation((n - 1 - offset) // T)
        return self._offset, self._perm

    def blocks_in_epoch(self, epoch: int) -> int:
        return len(self._plan(epoch)[1])

    def next(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The next batch (x, y), or only its `rows`: on several hosts each reads just the rows its devices hold,
        and every host advances through the same global order."""
        starts, self.epoch, self.index = take_across_epochs(
            lambda e: self._plan(e)[1], self.epoch, self.index, self.batch_size,
            convert=lambda e, take: self._plan(e)[0] + take * self.block_size)
        return _gather(self.tokens, starts if rows is None else starts[rows], self.block_size)

    __next__ = next

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> "BlockIterator":
        self.epoch, self.index = checked_position(state, self.blocks_in_epoch, "token blocks")
        return self


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int,
                 n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed evaluation set: the first n_batches * batch_size non-overlapping blocks from offset 0, in order.

    With fewer blocks, as many full batches as fit; with fewer blocks than one batch, a single batch that repeats
    the blocks cyclically (batch shapes stay fixed for the jitted eval step; the loss is then a slightly uneven
    average of every block).
    """
    tokens = np.asarray(tokens, np.int32)
    n_blocks = (len(tokens) - 1) // block_size
    if n_blocks == 0:
        raise ConfigError(f"the validation set ({len(tokens)} tokens) is shorter than one block of "
                          f"T={block_size} + 1 tokens; lower model.max_len or give more validation data")
    n_full = min(n_batches, n_blocks // batch_size)
    if n_full == 0:
        return [_gather(tokens, np.arange(batch_size) % n_blocks * block_size, block_size)]
    starts_NB = np.arange(n_full * batch_size).reshape(n_full, batch_size) * block_size
    return [_gather(tokens, s, block_size) for s in starts_NB]


def _gather(tokens: np.ndarray, starts: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    window = tokens[starts[:, None] + np.arange(T + 1)]  # one gather for both x and y
    return window[:, :-1], window[:, 1:]


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _is_local(path: str) -> bool:
    """Anything that exists, is a glob, has a data-file extension or is not shaped like a hub name is local."""
    return (os.path.exists(os.path.expanduser(path)) or any(c in path for c in "*?[") or _ext(path) in _BUILDERS
            or not _HUB_NAME.match(path))


def _local_files(pattern: str) -> list[str]:
    pattern = os.path.expanduser(pattern)
    if any(c in pattern for c in "*?["):
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"no data files match {pattern}")
        return files
    if os.path.isdir(pattern):
        raise ConfigError(f"data path {pattern} is a directory; give a file or a glob such as {pattern}/*.txt")
    if not os.path.isfile(pattern):
        raise ConfigError(f"data file {pattern} not found")
    return [pattern]


def _read_local(pattern: str, column: str) -> list[str]:
    files = _local_files(pattern)
    exts = sorted({_ext(f) for f in files})
    unsupported = [e for e in exts if e not in _BUILDERS]
    if unsupported:
        raise ConfigError(f"unsupported data file type {unsupported[0] or '(no extension)'!r} in {pattern}; "
                          f"use one of {', '.join(_BUILDERS)}")
    builders = {_BUILDERS[e] for e in exts}
    if len(builders) > 1:
        raise ConfigError(f"{pattern} mixes file types {exts}; use one format")
    builder = builders.pop()
    if builder is None:  # plain text: read as is (no datasets cache, no splitting into lines)
        return _nonempty([_read_txt(f) for f in files], pattern)
    import datasets  # slow to import; only needed here and for the hub

    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # malformed files surface as assorted pyarrow / datasets errors
        raise ConfigError(f"could not read {pattern}: {type(e).__name__}: {_first_line(e)}") from None
    return _text_column(ds, column, pattern)


def _read_txt(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n becomes \n
            return f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"data file {path} is not UTF-8 text") from None


def _load_hub(path: str, name: str, split: str, column: str) -> list[str]:
    return _text_column(_hub_dataset(path, name, split), column, path)


# Loggers of the libraries a hub load goes through. Without network they print a warning per retry (20+ lines over
# ~25 s before the error); our one-line ConfigError says all of it.
_HUB_LOGGERS = ("datasets", "huggingface_hub", "httpx", "httpcore", "urllib3", "fsspec", "filelock")


def _hub_dataset(path: str, name: str, split: str):
    """One split of a Hugging Face hub dataset. With HF_HUB_OFFLINE=1, or when the hub does not answer a quick
    connection check, from the local cache alone: no network, and an error within seconds when it is not there."""
    import datasets

    forced_offline = datasets.config.HF_HUB_OFFLINE  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, read at import
    endpoint = datasets.config.HF_ENDPOINT  # HF_ENDPOINT or https://huggingface.co
    offline = forced_offline or not _hub_reachable(endpoint)
    try:
        with _quiet_hub_libraries(), _hub_offline_mode(offline):
            return datasets.load_dataset(path, name or None, split=split)
    except Exception as e:  # unknown name, bad split, ...: all one-line user errors
        if offline and isinstance(e, ConnectionError):  # what offline mode raises for a dataset not in the cache
            why = ("offline mode is on (HF_HUB_OFFLINE=1)" if forced_offline else
                   f"the Hugging Face hub ({urllib.parse.urlsplit(endpoint).hostname}) is unreachable")
            raise ConfigError(f"could not load {path!r} (split {split!r}): {why} and the dataset is not in the local "
                              "cache; use a local file for data.path or run on a connected machine") from None
        source = "the local Hugging Face cache" if offline else "the Hugging Face hub"
        raise ConfigError(f"could not load {path!r} (split {split!r}) from {source} and it is not a local file: "
                          f"{type(e).__name__}: {_first_line(e)}") from None


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (or to the proxy the libraries would use for it) opens within `timeout`
    seconds, name resolution included: that ignores socket timeouts, hence the thread, left behind if it hangs."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    opened, done = [], threading.Event()

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:  # refused, no route, unknown host, timed out
            pass
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return bool(opened)


@contextlib.contextmanager
def _quiet_hub_libraries():
    loggers = [logging.getLogger(n) for n in _HUB_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _hub_offline_mode(offline: bool):
    """HF_HUB_OFFLINE=1 for one call: both libraries read the variable once, at import, into these two flags."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _text_column(ds, column: str, source: str) -> list[str]:
    if column not in ds.column_names:
        raise ConfigError(f"{source} has no column {column!r} (data.text_column); available columns: "
                          f"{', '.join(ds.column_names)}")
    docs = [t for t in ds[column] if t]  # drop empty and missing cells
    if not all(isinstance(t, str) for t in docs):
        raise ConfigError(f"column {column!r} of {source} does not hold text; set data.text_column")
    return _nonempty(docs, source)


def _nonempty(docs: list[str], source: str) -> list[str]:
    if not any(docs):
        raise ConfigError(f"no text in {source}")
    return docs


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]
