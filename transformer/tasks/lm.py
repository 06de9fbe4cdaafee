"""Language modelling (decoder): next-token prediction on packed blocks of a token stream, the run's own (small
data) or prepared shards shared by runs (data.prepared), whose blocks carry document segments."""
from __future__ import annotations

import os

import jax

from transformer.config import Config
from transformer.data.blocks import BlockIterator, eval_batches
from transformer.data.loader import ShardPipeline
from transformer.data.prepare import prepared_shards, token_streams
from transformer.data.shards import TokenShards
from transformer.data.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer
from transformer.tasks.base import Task, TaskData, pipeline_sizes


class LMPipeline:
    """Inputs are T tokens, targets the same shifted by one."""

    def __init__(self, train_tokens, val_tokens, *, T: int, batch_rows: int, eval_rows: int, n_eval: int,
                 seed: int):
        self.blocks = BlockIterator(train_tokens, T, batch_rows, seed)
        self.val = [{"inputs": x, "targets": y} for x, y in eval_batches(val_tokens, T, eval_rows, n_eval)]

    def next(self, step: int, rows) -> dict:
        x, y = self.blocks.next(rows(self.blocks.batch_size))
        return {"inputs": x, "targets": y}

    def state(self) -> dict:
        return self.blocks.state()

    def restore(self, state: dict) -> None:
        self.blocks.restore(state)


class LanguageModelling(Task):
    name = "lm"
    keys = ("inputs", "targets")
    accuracy = False

    def prepare(self, cfg: Config, run_dir: str, tok=None) -> TaskData:
        if cfg.data.prepared:  # TaskData.train / .val: the splits' memory-mapped shards
            tok, cache = prepared_shards(cfg.data, tok or _run_tokenizer(run_dir))
            if jax.process_index() == 0:
                save_tokenizer(tok, run_dir)
            return TaskData(tok, TokenShards(cache, "train"), TokenShards(cache, "val"))
        return TaskData(*token_streams(cfg, run_dir, tok))

    def pipeline(self, cfg: Config, data: TaskData, row_multiple: int = 1):
        if cfg.data.prepared:
            pipeline = ShardPipeline(data.train.cache_dir, segments=cfg.data.segment_mask, **pipeline_sizes(cfg))
            return pipeline, data.train.vocab
        return LMPipeline(data.train, data.val, **pipeline_sizes(cfg)), data.tokenizer.vocab_size

    def logits(self, model, batch: dict, key):
        return model(batch["inputs"], segments_BT=batch.get("segments"), positions_BT=batch.get("positions"),
                     dropout_key=key)


def _run_tokenizer(run_dir: str):
    """The tokenizer a resumed run saved (its shards were prepared with it), or None for a new run."""
    return load_tokenizer(run_dir) if os.path.exists(os.path.join(run_dir, TOKENIZER_FILE)) else None
