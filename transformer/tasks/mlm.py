"""Masked language modelling (encoder): BERT's corruption recipe, applied in the input pipeline with a seed.

Of the real tokens of each sequence, `rate` (15%) are selected; a selected token becomes [MASK] with probability
0.8, a random vocabulary token with 0.1, and stays unchanged with 0.1. The loss is taken on selected positions only.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from transformer.config import Config, ConfigError
from transformer.data.blocks import BlockIterator, eval_batches
from transformer.data.prepare import token_streams
from transformer.data.specials import Specials, specials_for
from transformer.tasks.base import Task, TaskData, pipeline_sizes


def frame(chunks_BL: np.ndarray, sp: Specials) -> np.ndarray:
    """[CLS] chunk [SEP] for each row: packed text blocks become encoder inputs of length L + 2."""
    B = chunks_BL.shape[0]
    return np.concatenate([np.full((B, 1), sp.cls), chunks_BL, np.full((B, 1), sp.sep)], axis=1).astype(np.int32)


def mask_tokens(tokens_BT: np.ndarray, rng: np.random.Generator, sp: Specials, n_regular: int,
                rate: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (inputs, targets, weights): corrupted inputs, the original tokens, and 1.0 at the selected positions.

    Special tokens are never selected; random replacements are drawn from the `n_regular` ordinary token ids.
    """
    tokens_BT = np.asarray(tokens_BT, np.int32)
    special = np.isin(tokens_BT, np.asarray(sp, np.int32))
    selected = (rng.random(tokens_BT.shape) < rate) & ~special
    roll = rng.random(tokens_BT.shape)
    to_mask = selected & (roll < 0.8)
    to_random = selected & (roll >= 0.8) & (roll < 0.9)
    inputs = np.where(to_mask, sp.mask, tokens_BT)
    inputs = np.where(to_random, rng.integers(0, n_regular, tokens_BT.shape), inputs).astype(np.int32)
    return inputs, tokens_BT, selected.astype(np.float32)


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

    def next(self, step: int, rows) -> dict:
        rows = rows(self.blocks.batch_size)
        x, _ = self.blocks.next(rows)
        return self._corrupt(frame(x, self.sp), (0, step), rows)

    def state(self) -> dict:
        return self.blocks.state()

    def restore(self, state: dict) -> None:
        self.blocks.restore(state)


class MaskedLM(Task):
    name = "mlm"
    keys = ("inputs", "targets", "weights", "valid")

    def prepare(self, cfg: Config, run_dir: str, tok=None) -> TaskData:
        return TaskData(*token_streams(cfg, run_dir, tok))

    def pipeline(self, cfg: Config, data: TaskData, row_multiple: int = 1):
        if cfg.model.max_len < 3:
            raise ConfigError("model.max_len must be >= 3 for masked-LM blocks ([CLS] text [SEP])")
        specials, vocab = specials_for(data.tokenizer)
        return MLMPipeline(data.train, data.val, specials=specials, n_regular=data.tokenizer.vocab_size,
                           **pipeline_sizes(cfg)), vocab

    def logits(self, model, batch: dict, key):
        return model(batch["inputs"], valid_BT=batch["valid"], dropout_key=key)

    def weights(self, batch: dict):
        return batch["weights"].astype(jnp.float32)  # the selected positions
