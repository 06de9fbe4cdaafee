"""The protocol between a task and the trainer. A task owns its whole data path and objective:

    prepare    read the data and get a tokenizer (given, cached in the run dir, or trained here)  -> TaskData
    pipeline   batches of numpy arrays (the arrays `keys` names) and the model's vocabulary size
    logits     the model's outputs for one batch, compared with batch["targets"] weighted by `weights`
    metrics    figures beyond loss and accuracy at each evaluation (BLEU for translation)

The trainer knows nothing else about a task, so a new task is one new module (and one line in `tasks/__init__.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax.numpy as jnp

from transformer.config import Config
from transformer.tasks.losses import loss_sums


@dataclasses.dataclass
class TaskData:
    """A task's prepared data: token streams, (text, label) examples or (source, target) pairs."""
    tokenizer: Any
    train: Any
    val: Any
    labels: list[str] | None = None


class Pipeline(Protocol):
    """A task's batches. `next(step, rows)` gives the rows of the step's global batch that this process asks for
    (`rows(n)`: this process's row indices of an n-row batch); `val` is a fixed list of validation batches;
    `state()` / `restore()` carry the position through a checkpoint, so a resumed run sees the same batches."""
    val: list[dict]

    def next(self, step: int, rows: Callable[[int], Any]) -> dict: ...

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


class Task:
    name: str
    keys: tuple[str, ...]  # the arrays of one batch, each with the batch axis first
    unit = "tokens"  # what `len(TaskData.train)` counts
    accuracy = True  # report the weighted argmax accuracy at evaluations
    smoothed = False  # whether optim.label_smoothing applies (translation only)

    def prepare(self, cfg: Config, run_dir: str, tok=None) -> TaskData:
        raise NotImplementedError

    def pipeline(self, cfg: Config, data: TaskData, row_multiple: int = 1) -> tuple[Pipeline, int]:
        """The batches and the model's vocabulary size (the tokenizer's, plus any special ids the task appends).
        `row_multiple`: the data-parallel shards, which a batch's row count must be a multiple of."""
        raise NotImplementedError

    def logits(self, model, batch: dict, key):
        raise NotImplementedError

    def weights(self, batch: dict):
        """How much each loss term counts, shaped like batch["targets"]: every one by default."""
        return jnp.ones(batch["targets"].shape, jnp.float32)

    def real_tokens(self, batch: dict):
        """The non-padding tokens a batch trains on (for tokens/s)."""
        return batch["valid"].sum() if "valid" in batch else jnp.asarray(batch["inputs"].size)

    def sums(self, model, batch: dict, key, label_smoothing: float = 0.0) -> dict:
        """Summed loss terms of one batch (`losses.loss_sums`); `key` drives dropout (None: off)."""
        return loss_sums(self.logits(model, batch, key), batch["targets"], self.weights(batch),
                         label_smoothing if self.smoothed else 0.0)

    def metrics(self, cfg: Config, graphdef, params, data: TaskData) -> tuple[dict, str]:
        """Extra evaluation figures and their message; none by default."""
        return {}, ""


def pipeline_sizes(cfg: Config) -> dict:
    """The pipeline arguments every task shares."""
    return {"T": cfg.model.max_len, "batch_rows": cfg.train.batch_size * cfg.train.grad_accum,
            "eval_rows": cfg.train.batch_size, "n_eval": cfg.train.eval_batches, "seed": cfg.train.seed}
