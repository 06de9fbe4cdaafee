"""Resumable, seed-determined orders over training data: packed next-token blocks (`BlockIterator`), a fixed
validation set (`eval_batches`), and the epoch bookkeeping shared by every task's iterator."""
from __future__ import annotations

import numpy as np

from transformer.config import ConfigError


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


def bucketed_plan(seed: int, epoch: int, lengths, buckets: list[int], per_batch) -> list[np.ndarray]:
    """An epoch's batches of example indices: the examples grouped by the smallest length bucket that holds them,
    shuffled within buckets, cut into batches of `per_batch(bucket length)`, and the batches shuffled; seeded by
    (seed, epoch) alone."""
    rng = np.random.default_rng([seed, epoch])
    bucket_of = np.searchsorted(buckets, lengths)
    batches = []
    for b in np.unique(bucket_of):
        members = rng.permutation(np.flatnonzero(bucket_of == b))
        n = per_batch(buckets[b])
        batches += [members[k:k + n] for k in range(0, len(members), n)]
    return [batches[i] for i in rng.permutation(len(batches))]


def packed_plan(seed: int, epoch: int, lengths, capacity: int, rows_per_batch: int, window: int = 16,
                targets=None, target_capacity: int = 0) -> list:
    """An epoch's batches of packed rows: each row a list of example indices whose lengths sum to at most
    `capacity` (and, with `targets`, whose target counts sum to at most `target_capacity`). The examples are visited
    in a seeded order (by (seed, epoch) alone) and each goes into the first of the `window` most recently opened rows
    with room for it, else opens a new row; rows are cut into batches of `rows_per_batch` in the order they were
    opened."""
    rng = np.random.default_rng([seed, epoch])
    if targets is None:
        targets, target_capacity = np.zeros(len(lengths), int), 0
    rows, room, target_room, open_rows = [], [], [], []
    for i in rng.permutation(len(lengths)):
        n, t = int(lengths[i]), int(targets[i])
        r = next((r for r in open_rows if room[r] >= n and target_room[r] >= t), None)
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(capacity)
            target_room.append(target_capacity)
            open_rows = (open_rows + [r])[-window:]
        rows[r].append(int(i))
        room[r] -= n
        target_room[r] -= t
    return [rows[k:k + rows_per_batch] for k in range(0, len(rows), rows_per_batch)]


def next_in_plan(plan_of, epoch: int, index: int) -> tuple[np.ndarray, int, int]:
    """The next batch of a per-epoch plan (`plan_of(epoch)`: a list of index arrays), and the position after it."""
    plan = plan_of(epoch)
    members = plan[index]
    index += 1
    if index == len(plan):
        epoch, index = epoch + 1, 0
    return members, epoch, index


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
