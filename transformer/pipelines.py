"""Batches for each training task, as dicts of numpy arrays (the keys `training.BATCH_KEYS` names).

A pipeline yields the rows of the global batch that this process asks for (`next(step, rows)`), a fixed list of
validation batches, and a small state that a checkpoint stores so a resumed run sees exactly the same batches.
Everything random is seeded by (seed, step, row), so the batches do not depend on how many hosts share them.
"""
from __future__ import annotations

import numpy as np

from transformer.config import ConfigError
from transformer.data import BlockIterator, eval_batches
from transformer.mlm import Specials, frame, mask_tokens


class LMPipeline:
    """Next-token prediction on packed blocks: inputs are T tokens, targets the same shifted by one."""

    def __init__(self, train_tokens, val_tokens, *, T: int, batch_rows: int, eval_rows: int, n_eval: int,
                 seed: int):
        self.blocks = BlockIterator(train_tokens, T, batch_rows, seed)
        self.val = [{"inputs": x, "targets": y} for x, y in eval_batches(val_tokens, T, eval_rows, n_eval)]

    def next(self, step: int, rows: np.ndarray) -> dict:
        x, y = self.blocks.next(rows)
        return {"inputs": x, "targets": y}

    def state(self) -> dict:
        return self.blocks.state()

    def restore(self, state: dict) -> None:
        self.blocks.restore(state)


class MLMPipeline:
    """Masked-LM on packed blocks framed as [CLS] text [SEP]; 15% of tokens selected per BERT's recipe."""

    def __init__(self, train_tokens, val_tokens, *, T: int, batch_rows: int, eval_rows: int, n_eval: int,
                 seed: int, specials: Specials, n_regular: int):
        self.sp, self.n_regular, self.seed = specials, n_regular, seed
        self.blocks = BlockIterator(train_tokens, T - 2, batch_rows, seed)
        self.val = [self._corrupt(frame(x, specials), (1, i), np.arange(len(x)))
                    for i, (x, _) in enumerate(eval_batches(val_tokens, T - 2, eval_rows, n_eval))]

    def _corrupt(self, tokens_BT: np.ndarray, where: tuple[int, int], rows: np.ndarray) -> dict:
        """Mask each row with its own generator, seeded by (seed, split, step or val batch, global row)."""
        parts = [mask_tokens(row[None], np.random.default_rng([self.seed, *where, int(r)]), self.sp, self.n_regular)
                 for row, r in zip(tokens_BT, rows)]
        inputs, targets, weights = (np.concatenate(p) for p in zip(*parts))
        return {"inputs": inputs, "targets": targets, "weights": weights, "valid": np.ones_like(inputs, bool)}

    def next(self, step: int, rows: np.ndarray) -> dict:
        x, _ = self.blocks.next(rows)
        return self._corrupt(frame(x, self.sp), (0, step), rows)

    def state(self) -> dict:
        return self.blocks.state()

    def restore(self, state: dict) -> None:
        self.blocks.restore(state)


class ClassifyPipeline:
    """Labelled texts as [CLS] text [SEP] (truncated to T, padded), visited in a seeded order per epoch."""

    def __init__(self, train, val, *, T: int, batch_rows: int, eval_rows: int, n_eval: int, seed: int,
                 encode, specials: Specials, labels: list[str]):
        ids = {name: i for i, name in enumerate(labels)}
        unknown = sorted({lab for _, lab in val} - set(ids))
        if unknown:
            raise ConfigError(f"validation label {unknown[0]!r} never occurs in the training data")
        self.sp, self.T, self.batch_rows, self.seed = specials, T, batch_rows, seed
        self.train = self._encode(train, encode, ids)
        val = self._encode(val, encode, ids)
        n = len(val["targets"])
        n_full = min(n_eval, n // eval_rows)
        order = np.arange(max(n_full, 1) * eval_rows) % n  # fewer than one batch: repeat examples cyclically
        self.val = [{k: a[order[i * eval_rows:(i + 1) * eval_rows]] for k, a in val.items()}
                    for i in range(max(n_full, 1))]
        self.epoch, self.index = 0, 0

    def _encode(self, examples, encode, ids) -> dict:
        T, sp = self.T, self.sp
        inputs = np.full((len(examples), T), sp.pad, np.int32)
        for i, (text, _) in enumerate(examples):
            row = np.concatenate([[sp.cls], encode(text)[:T - 2], [sp.sep]])
            inputs[i, :len(row)] = row
        targets = np.array([ids[lab] for _, lab in examples], np.int32)
        return {"inputs": inputs, "targets": targets, "valid": inputs != sp.pad}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train["targets"]))

    def next(self, step: int, rows: np.ndarray) -> dict:
        picked, need = [], self.batch_rows
        while need:
            order = self._order(self.epoch)
            take = order[self.index:self.index + need]
            picked.append(take)
            self.index += len(take)
            need -= len(take)
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        idx = np.concatenate(picked)[rows]
        return {k: a[idx] for k, a in self.train.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
