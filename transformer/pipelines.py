"""Batches for each training task, as dicts of numpy arrays (the keys `training.BATCH_KEYS` names).

A pipeline yields the rows of the global batch that this process asks for (`next(step, rows)`), a fixed list of
validation batches, and a small state that a checkpoint stores so a resumed run sees exactly the same batches.
Everything random is seeded by (seed, step, row), so the batches do not depend on how many hosts share them.
"""
from __future__ import annotations

import numpy as np

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
