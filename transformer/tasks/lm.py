"""Language modelling (decoder): next-token prediction on packed blocks of a token stream."""
from __future__ import annotations

from transformer.config import Config
from transformer.data.blocks import BlockIterator, eval_batches
from transformer.data.prepare import token_streams
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
        return TaskData(*token_streams(cfg, run_dir, tok))

    def pipeline(self, cfg: Config, data: TaskData, row_multiple: int = 1):
        return LMPipeline(data.train, data.val, **pipeline_sizes(cfg)), data.tokenizer.vocab_size

    def logits(self, model, batch: dict, key):
        return model(batch["inputs"], dropout_key=key)
