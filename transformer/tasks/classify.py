"""Sequence classification (encoder + [CLS] head): labelled texts framed as [CLS] text [SEP]."""
from __future__ import annotations

import numpy as np

from transformer.config import Config, ConfigError
from transformer.data.blocks import checked_position, take_across_epochs
from transformer.data.prepare import hold_out, text_tokenizer
from transformer.data.sources import label_names, load_examples
from transformer.data.specials import Specials, specials_for
from transformer.tasks.base import Task, TaskData, pipeline_sizes


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
        self._order_epoch = None

    def _encode(self, examples, encode, ids) -> dict:
        T, sp = self.T, self.sp
        inputs = np.full((len(examples), T), sp.pad, np.int32)
        for i, (text, _) in enumerate(examples):
            row = np.concatenate([[sp.cls], encode(text)[:T - 2], [sp.sep]])
            inputs[i, :len(row)] = row
        targets = np.array([ids[lab] for _, lab in examples], np.int32)
        return {"inputs": inputs, "targets": targets, "valid": inputs != sp.pad}

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:  # drawn once per epoch, not once per step
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.train["targets"]))
            self._order_epoch = epoch
        return self._perm

    def next(self, step: int, rows) -> dict:
        idx, self.epoch, self.index = take_across_epochs(self._order, self.epoch, self.index, self.batch_rows)
        return {k: a[idx[rows(self.batch_rows)]] for k, a in self.train.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = checked_position(state, lambda e: len(self._order(e)), "classification examples")


class Classification(Task):
    name = "classify"
    keys = ("inputs", "targets", "valid")
    unit = "examples"

    def prepare(self, cfg: Config, run_dir: str, tok=None) -> TaskData:
        """Labelled examples (train, val), their label names, and the tokenizer."""
        train, val = load_examples(cfg.data)
        if val is None:  # files are often sorted by label: hold out a random fraction
            train, val = hold_out(train, cfg.data.val_fraction, "data.val_path")
        labels = label_names(train)
        if len(labels) < 2:
            raise ConfigError(f"classification needs at least 2 labels in column {cfg.data.label_column!r}, found "
                              f"{labels}")
        tok = text_tokenizer(cfg, run_dir, tok, [t for t, _ in train], [t for t, _ in val])
        return TaskData(tok, train, val, labels)

    def pipeline(self, cfg: Config, data: TaskData, row_multiple: int = 1):
        tok = data.tokenizer
        specials, vocab = specials_for(tok)
        plain = getattr(tok, "mask_id", None) is None  # WordPiece adds [CLS] / [SEP] itself unless told not to
        encode = tok.encode if plain else (lambda t: tok.encode(t, add_special_tokens=False))
        return ClassifyPipeline(data.train, data.val, encode=encode, specials=specials, labels=data.labels,
                                **pipeline_sizes(cfg)), vocab

    def logits(self, model, batch: dict, key):
        return model.classify(batch["inputs"], valid_BT=batch["valid"], dropout_key=key)
