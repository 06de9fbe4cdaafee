"""Where text comes from: the embedded default corpus, local files (.txt, .csv, .json(l), .parquet, globs) or a
Hugging Face hub dataset (hub.py).

`load_texts` reads documents (language modelling), `load_examples` (text, label) pairs (classification),
`load_pairs` (source, target) sentence pairs (translation); `split_text` turns documents into one training and one
validation string.

The default corpus (data.path = "") is the documentation text shipped inside Python's standard library:
`pydoc_data.topics.topics`, the ~80 help topics that `help("if")`, `help("FORMATTING")` and friends print (the
language reference sections on statements, operators, formatting, the data model, ...). It is about 465 KB of English
prose with code examples, licensed with CPython (PSF License), and present wherever Python is, so a first run needs no
download. Its documents are the topic texts in sorted key order.
"""
from __future__ import annotations

import glob
import os
import re
import sys
from typing import Iterator

from transformer.config import ConfigError, DataConfig, first_line
from transformer.data.hub import hub_dataset

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


def stream_texts(cfg: DataConfig, val: bool = False) -> Iterator[str]:
    """The training documents (with `val`, the validation ones of data.val_path / data.val_split) one at a time,
    never all in memory: .txt files one per file, tables and hub datasets through `datasets` streaming."""
    if val and not (cfg.val_path or cfg.val_split):
        return
    if not val and cfg.path == "":
        yield from default_corpus()
        return
    if val and cfg.val_split:
        yield from _stream_column(hub_dataset(cfg.path, cfg.name, cfg.val_split, streaming=True), cfg.text_column,
                                  cfg.path)
        return
    path = cfg.val_path if val else cfg.path
    if not _is_local(path):
        yield from _stream_column(hub_dataset(path, cfg.name, cfg.split, streaming=True), cfg.text_column, path)
        return
    files, builder = _files_and_builder(path)
    if builder is None:
        for f in files:
            yield _read_txt(f)
        return
    import datasets

    yield from _stream_column(datasets.load_dataset(builder, data_files=files, split="train", streaming=True),
                              cfg.text_column, path)


def source_identity(cfg: DataConfig) -> dict:
    """What prepared data depends on in its source: local files by path, size and modification time (an edited
    file prepares again), a hub dataset by name and split, the default corpus by this Python's version."""
    def files(path):
        return [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in _local_files(path)]

    def one(path, split):
        if path == "":
            return {"default": DEFAULT_CORPUS, "python": sys.version.split()[0]}
        if _is_local(path):
            return {"files": files(path), "column": cfg.text_column}
        return {"hub": path, "name": cfg.name, "split": split, "column": cfg.text_column}

    val = one(cfg.val_path, "") if cfg.val_path else one(cfg.path, cfg.val_split) if cfg.val_split else None
    return {"train": one(cfg.path, cfg.split), "val": val}


def _stream_column(rows, column: str, source: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise ConfigError(f"{source} has no column {column!r} (data.text_column); available columns: "
                              f"{', '.join(row)}")
        text = row[column]
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"column {column!r} of {source} does not hold text; set data.text_column")
        yield text or ""


def load_examples(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
    """(text, label) pairs for classification from local .csv / .json / .jsonl / .parquet files or a hub dataset:
    the training examples, and the validation ones (None when no validation data is given)."""
    if cfg.path == "":
        raise ConfigError("classification needs data.path: a .csv / .jsonl / .parquet file or a hub dataset with "
                          f"columns {cfg.text_column!r} and {cfg.label_column!r}")

    def read(path, split):
        ds = _table(cfg, path, split, "classification data")
        missing = [c for c in (cfg.text_column, cfg.label_column) if c not in ds.column_names]
        if missing:
            raise ConfigError(f"{path} has no column {missing[0]!r} (data.text_column / data.label_column); "
                              f"available columns: {', '.join(ds.column_names)}")
        rows = [(t, str(lab)) for t, lab in zip(ds[cfg.text_column], ds[cfg.label_column])
                if isinstance(t, str) and t and lab is not None]
        if not rows:
            raise ConfigError(f"no labelled text in {path}")
        return rows

    return _train_and_val(cfg, read)


ROLES = ("system", "user", "assistant")


def load_conversations(cfg: DataConfig) -> tuple[list[list[dict]], list[list[dict]] | None]:
    """Chat conversations for supervised fine-tuning, each a list of {"role", "content"} turns, from local .json /
    .jsonl / .parquet files or a hub dataset with a `messages` column (role / content turns) or `prompt` and
    `completion` columns (one user turn, one assistant turn). Returns the training conversations and the validation
    ones (None when no validation data is given). A row with an unknown role, a turn that is not text, or no
    assistant turn to learn from is refused, naming the row."""
    if cfg.path == "":
        raise ConfigError("train.task=sft needs data.path: a .jsonl / .parquet file or a hub dataset with a "
                          "'messages' column (role / content turns) or 'prompt' and 'completion' columns")

    def read(path, split):
        ds = _table(cfg, path, split, "chat data")
        if "messages" in ds.column_names:
            rows = ds["messages"]
        elif {"prompt", "completion"} <= set(ds.column_names):
            rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                    for p, c in zip(ds["prompt"], ds["completion"])]
        else:
            raise ConfigError(f"{path} has neither a 'messages' column nor 'prompt' and 'completion' columns; "
                              f"available columns: {', '.join(ds.column_names)}")
        for i, turns in enumerate(rows):
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                raise ConfigError(f"{path} row {i}: messages must be a list of {{'role', 'content'}} turns")
            for t in turns:
                if t.get("role") not in ROLES:
                    raise ConfigError(f"{path} row {i}: unknown role {t.get('role')!r} (roles: {', '.join(ROLES)})")
                if not isinstance(t.get("content"), str):
                    raise ConfigError(f"{path} row {i}: a {t['role']} turn's content is not text")
            if not any(t["role"] == "assistant" for t in turns):
                raise ConfigError(f"{path} row {i} has no assistant turn: nothing to learn from it")
        if not rows:
            raise ConfigError(f"no conversations in {path}")
        return [[{"role": t["role"], "content": t["content"]} for t in turns] for turns in rows]

    return _train_and_val(cfg, read)


def _table(cfg: DataConfig, path: str, split: str, what: str):
    """A local .csv / .json / .jsonl / .parquet file set, or (for data.path) a hub dataset, as a datasets.Dataset."""
    import datasets

    if not _is_local(cfg.path) and path == cfg.path:
        return hub_dataset(path, cfg.name, split)
    files = _local_files(path)
    builders = {_BUILDERS.get(_ext(f)) for f in files}
    if len(builders) != 1 or None in builders:
        raise ConfigError(f"{what} {path} must be .csv, .json, .jsonl or .parquet files of one type")
    try:
        return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except Exception as e:
        raise ConfigError(f"could not read {path}: {type(e).__name__}: {first_line(e)}") from None


def _train_and_val(cfg: DataConfig, read):
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
        ds = hub_dataset(cfg.path, cfg.name, split)
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


def _files_and_builder(pattern: str) -> tuple[list[str], str | None]:
    """The files a local data path names and the `datasets` builder that reads them (None: plain text)."""
    files = _local_files(pattern)
    exts = sorted({_ext(f) for f in files})
    unsupported = [e for e in exts if e not in _BUILDERS]
    if unsupported:
        raise ConfigError(f"unsupported data file type {unsupported[0] or '(no extension)'!r} in {pattern}; "
                          f"use one of {', '.join(_BUILDERS)}")
    builders = {_BUILDERS[e] for e in exts}
    if len(builders) > 1:
        raise ConfigError(f"{pattern} mixes file types {exts}; use one format")
    return files, builders.pop()


def _read_local(pattern: str, column: str) -> list[str]:
    files, builder = _files_and_builder(pattern)
    if builder is None:  # plain text: read as is (no datasets cache, no splitting into lines)
        return _nonempty([_read_txt(f) for f in files], pattern)
    import datasets  # slow to import; only needed here and for the hub

    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # malformed files surface as assorted pyarrow / datasets errors
        raise ConfigError(f"could not read {pattern}: {type(e).__name__}: {first_line(e)}") from None
    return _text_column(ds, column, pattern)


def _read_txt(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n becomes \n
            return f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"data file {path} is not UTF-8 text") from None


def _load_hub(path: str, name: str, split: str, column: str) -> list[str]:
    return _text_column(hub_dataset(path, name, split), column, path)


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
