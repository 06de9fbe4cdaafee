"""One module per training task, each behind the small protocol of `base.Task`: data -> tokenizer -> pipeline ->
loss -> evaluation metrics. `TASKS` is the registry the trainer looks a run's task up in."""
from __future__ import annotations

from transformer.config import TASK_OF_ARCH, Config
from transformer.tasks.base import Task, TaskData
from transformer.tasks.classify import Classification
from transformer.tasks.lm import LanguageModelling
from transformer.tasks.mlm import MaskedLM
from transformer.tasks.seq2seq import Translation
from transformer.tasks.sft import SupervisedFineTuning

TASKS: dict[str, Task] = {t.name: t for t in (LanguageModelling(), MaskedLM(), Classification(), Translation(),
                                              SupervisedFineTuning())}


def task_name(cfg: Config) -> str:
    """What a run trains: `train.task`, or the architecture's own task ("lm" for a decoder, "mlm" for an encoder,
    "seq2seq" for an encoder-decoder)."""
    return cfg.train.task or TASK_OF_ARCH[cfg.model.arch]


def task_of(cfg: Config) -> Task:
    return TASKS[task_name(cfg)]


__all__ = ["TASKS", "Task", "TaskData", "task_name", "task_of"]
