"""Evaluation during training: per-token means over the whole validation set, and the task's own figures."""
from __future__ import annotations

import math
import time

import jax
import numpy as np

from transformer import sharding
from transformer.config import Config
from transformer.tasks import Task, TaskData
from transformer.tasks.losses import means


def evaluate(eval_step, params, batches: list[dict], batch_sharding) -> dict:
    """Per-token (or per-example) mean loss and accuracy over all the validation batches together: sums over the
    set divided once, so a short batch counts by its tokens. Each process puts only the rows its devices hold."""
    rows = len(batches[0]["inputs"])
    lo, hi = sharding.local_rows(batch_sharding, (rows,), axis=0)
    sums = [eval_step(params, {k: sharding.put_batch(a[lo:hi], batch_sharding, a.shape) for k, a in b.items()})
            for b in batches]
    total = jax.tree.map(lambda *x: np.sum(x, dtype=np.float64), *jax.device_get(sums))
    return {k: float(v) for k, v in means(total).items()}


def evaluation_record(step: int, cfg: Config, task: Task, data: TaskData, graphdef, params, eval_step,
                      val_batches: list[dict], batch_sharding) -> tuple[dict, str]:
    """The metrics record of one evaluation and its one-line message."""
    val = evaluate(eval_step, params, val_batches, batch_sharding)
    record = {"step": step, "val_loss": val["loss"], "val_ppl": math.exp(min(val["loss"], 50))}
    message = f"val loss {val['loss']:.4f}, perplexity {record['val_ppl']:.2f}"
    if task.accuracy:
        record["val_accuracy"] = val["accuracy"]
        message += f", accuracy {val['accuracy']:.2%}"
    extra, extra_message = task.metrics(cfg, graphdef, params, data)
    record.update(extra, time=time.time())
    return record, message + (f", {extra_message}" if extra_message else "")
