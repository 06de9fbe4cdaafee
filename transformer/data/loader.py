"""Batches of token blocks from prepared shards (`shards.py`), through Grain.

Block i of a shard is its tokens [i*T, i*T + T + 1): inputs and targets shifted by one. The order is Grain's global,
seeded shuffle of all blocks, reshuffled every epoch (`shuffle().repeat()`), so global batch b is blocks
[b*B, (b+1)*B) of that order: a pure function of (seed, b). Each host reads only its own rows of a batch, and the
iterator's state is b alone, so a run resumed on a different number of hosts or devices sees the batches it would
have. Grain reads the next batches in a background thread, off the training step's path.

Documents are separated by end-of-text tokens; with `segments`, each row also carries segment ids (a new document
starts after every end-of-text token) and positions that restart at 0 in each document, so attention never crosses a
document boundary and every document is seen as if it began the block (the packing of T5 / MaxText).
"""
from __future__ import annotations

import sys

import grain
import numpy as np

from transformer.config import ConfigError
from transformer.data.shards import TokenShards


class ShardBlocks:
    """Random access to the blocks of T + 1 tokens of a split's shards (a Grain data source)."""

    def __init__(self, shards: TokenShards, T: int):
        self.shards, self.T = shards.shards, T
        per_shard = np.array([max(len(s) - 1, 0) // T for s in self.shards], np.int64)
        self.ends = np.cumsum(per_shard)
        if not len(self.ends) or self.ends[-1] == 0:
            raise ConfigError(f"the prepared data ({len(shards):,} tokens) is shorter than one block of "
                              f"T={T} + 1 tokens; lower model.max_len or give more data")

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.ends, i, side="right"))
        j = i - (int(self.ends[s - 1]) if s else 0)
        return np.asarray(self.shards[s][j * self.T:(j + 1) * self.T + 1], np.int32)


def document_segments(tokens_BT: np.ndarray, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """(segments, positions) of rows of documents that end in `eot`: the segment id goes up after each end-of-text
    token (which belongs to the document it ends), and positions count from 0 in each segment."""
    B, T = tokens_BT.shape
    starts_BT = np.zeros((B, T), bool)
    starts_BT[:, 1:] = tokens_BT[:, :-1] == eot
    segments_BT = 1 + np.cumsum(starts_BT, axis=1, dtype=np.int32)
    t = np.arange(T, dtype=np.int32)
    first_BT = np.maximum.accumulate(np.where(starts_BT, t, 0), axis=1)
    return segments_BT, (t - first_BT).astype(np.int32)


def lm_batch(windows_BW: np.ndarray, eot: int | None) -> dict:
    """Inputs and targets of blocks of T + 1 tokens; with an `eot` id, their document segments and positions."""
    batch = {"inputs": windows_BW[:, :-1], "targets": windows_BW[:, 1:]}
    if eot is not None:
        batch["segments"], batch["positions"] = document_segments(batch["inputs"], eot)
    return batch


class ShardPipeline:
    """The language-modelling pipeline over prepared shards: `next(step, rows)` gives this host's rows of the next
    global batch; `state()` is the number of batches served."""

    def __init__(self, cache_dir: str, *, T: int, batch_rows: int, eval_rows: int, n_eval: int, seed: int,
                 segments: bool = True, prefetch: int = 4):
        train = TokenShards(cache_dir, "train")
        self.eot = train.eot if segments else None
        self.batch_rows, self.prefetch = batch_rows, prefetch
        self.order = grain.MapDataset.source(ShardBlocks(train, T)).seed(seed).shuffle().repeat()
        self.val = self._val_batches(cache_dir, T, eval_rows, n_eval)
        self.batch = 0
        self._it, self._it_key = None, None

    def _val_batches(self, cache_dir: str, T: int, rows: int, n: int) -> list[dict]:
        """The first n * rows blocks of the validation shards, in order, as fixed batches (fewer blocks than one
        batch: a single batch repeating them cyclically, so the eval step's shapes stay fixed)."""
        blocks = ShardBlocks(TokenShards(cache_dir, "val"), T)
        n_full = min(n, len(blocks) // rows)
        if n_full == 0:
            return [lm_batch(np.stack([blocks[i % len(blocks)] for i in range(rows)]), self.eot)]
        return [lm_batch(np.stack([blocks[k * rows + i] for i in range(rows)]), self.eot) for k in range(n_full)]

    def _rows(self, b: int, rows: np.ndarray) -> dict:
        return lm_batch(np.stack([self.order[b * self.batch_rows + int(r)] for r in rows]), self.eot)

    def next(self, step: int, rows) -> dict:
        mine = np.asarray(rows(self.batch_rows))
        if self._it is None or self._it_key != (self.batch, mine.tobytes()):
            ds = grain.MapDataset.range(self.batch, sys.maxsize).map(lambda b: self._rows(b, mine))
            self._it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch)))
        batch = next(self._it)
        self.batch += 1
        self._it_key = (self.batch, mine.tobytes())
        return batch

    def state(self) -> dict:
        return {"batch": self.batch}

    def restore(self, state: dict) -> None:
        if "batch" not in state or int(state["batch"]) < 0:
            raise ConfigError(f"data iterator state {state} is not one of prepared shards; was the data changed "
                              "since the checkpoint?")
        self.batch, self._it = int(state["batch"]), None
