"""Setting a run up: its directory, its data through the task, its model config, and its train state (fresh,
restored from the run's latest checkpoint, or started from another run's weights with `train.init_from`)."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.checkpoint import (
    WEIGHT_ITEMS,
    abstract_like,
    laid_over,
    read_run_config,
    write_run_config,
)
from transformer.config import RUN_CHOICES, Config, ConfigError, check_lora, first_line
from transformer.infer.loading import LoadedRun, load_run
from transformer.model import abstract_model, build_model
from transformer.model.layers import DTYPES
from transformer.model.lora import adapter_state
from transformer.model.stack import stack_layers
from transformer.tasks import Task, TaskData, task_of
from transformer.train.optim import make_optimizer
from transformer.train.step import init_state


def run_dir_of(cfg: Config) -> str:
    return cfg.train.run_dir or os.path.join("runs", cfg.preset)


def check_run_dir(cfg: Config, run_dir: str) -> None:
    """An existing run dir must hold the same model and data, or resuming would silently mix two experiments."""
    saved = read_run_config(run_dir)
    if saved is None:
        return
    # With train.init_from the model config comes from that run, so only the data must match.
    for section in ("data",) if cfg.train.init_from else ("model", "data"):
        ours = dataclasses.asdict(getattr(cfg, section))
        theirs = dict(saved.get(section, {}))
        if section == "model":
            # from the tokenizer and the labels; and how this machine multiplies or the layers run, which changes
            # no parameter
            for derived in ("vocab_size", "n_classes", "matmul_dtype", "remat", "attention", "attention_chunk"):
                ours.pop(derived), theirs.pop(derived, None)
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            k = diff[0]
            hint = (f"; a new run in the other layout starts from it with --train.init_from={run_dir}"
                    if k == "scan_layers" else "")
            raise ConfigError(f"run dir {run_dir} holds a different {section} ({section}.{k}={theirs.get(k)!r}, "
                              f"now {ours.get(k)!r}); use another --train.run_dir or delete that directory{hint}")


def prepare_run(cfg: Config, run_dir: str, mesh) -> tuple[Config, Task, TaskData, object, LoadedRun | None]:
    """(the resolved config, the task, its data, its pipeline, the `train.init_from` run or None). The resolved
    config (vocabulary and class count from the data) is written to the run dir."""
    source = None
    if os.path.exists(cfg.train.init_from):  # saved absolute: a LoRA run reads its base from there when it loads
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                 init_from=os.path.abspath(cfg.train.init_from)))
    if cfg.train.init_from:  # start from another run's model (e.g. an MLM run): its config, tokenizer, weights
        source = load_run(cfg.train.init_from, mesh=mesh)
        # its architecture; this run's dropout, LoRA, matmul inputs (how this machine multiplies, resolved above),
        # weights' dtype and how the layers run (scanned or not, what is rematerialised, which attention formulation)
        ours = {k: getattr(cfg.model, k) for k in ("dropout", "matmul_dtype", "param_dtype", *RUN_CHOICES,
                                                   "lora_rank", "lora_alpha", "lora_targets", "lora_dropout")}
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(source.cfg.model, n_classes=0, **ours))
        if cfg.model.lora_rank:
            check_lora(cfg.model)
    task = task_of(cfg)
    data = task.prepare(cfg, run_dir, source and source.tokenizer)
    pipeline, vocab = task.pipeline(cfg, data, sharding.batch_shards(mesh))
    if source is not None and vocab != source.cfg.model.vocab_size:
        raise ConfigError(f"{cfg.train.init_from} has a vocabulary of {source.cfg.model.vocab_size}, this task needs "
                          f"{vocab}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab,
                                                             n_classes=len(data.labels or ()))).validate()
    if jax.process_index() == 0:
        write_run_config(run_dir, cfg.to_dict())
    return cfg, task, data, pipeline, source


def build_state(cfg: Config, mesh):
    """Graph, sharded train state created directly on the devices (never whole on one host), and its shardings."""
    bf16 = cfg.model.param_dtype == "bfloat16"
    tx = make_optimizer(cfg.optim, cfg.train.steps, mu_dtype=jnp.bfloat16 if bf16 else None)

    def create(base: dict | None = None):
        """A fresh state; with `base` (pure-dict weights, e.g. a pretrained model's) those replace the random ones
        leaf by leaf wherever the paths match, inside the jitted function: XLA then never computes (nor compiles)
        the random init of the replaced weights, which for a 30-layer model took 90 s of compilation on XLA:CPU."""
        model = build_model(cfg.model, nnx.Rngs(cfg.train.seed))
        if base is not None:
            nnx.update(model, laid_over(nnx.state(model, nnx.Param), base))
        frozen_dtype = jnp.bfloat16 if cfg.model.matmul_dtype == "bfloat16" or bf16 else None
        return init_state(model, tx, cfg.train.seed, ema=cfg.optim.ema_decay > 0, lora=cfg.model.lora_rank > 0,
                          frozen_dtype=frozen_dtype, param_dtype=DTYPES[cfg.model.param_dtype])[1]

    abstract = jax.eval_shape(create)
    graphdef = nnx.graphdef(abstract_model(cfg.model))
    shardings = sharding.tree_shardings(abstract, mesh)
    return graphdef, tx, abstract, shardings, jax.jit(create, out_shardings=shardings)


def checkpoint_meta(cfg: Config, pipeline, tok, labels=None) -> dict:
    """A checkpoint's JSON item: the resolved config, the data-iterator state, the tokenizer, the class labels."""
    return {"config": cfg.to_dict(), "data_state": pipeline.state(), "tokenizer": tok.to_json(), "labels": labels}


def checkpoint_state(state: dict, cfg: Config) -> dict:
    """What a checkpoint holds: the train state, or for LoRA over a base model (`cfg.lora_base`) the same without the
    frozen base weights: adapters (and their moving average), optimizer state, step, RNG."""
    if not cfg.lora_base:
        return state
    return {k: adapter_state(v) if k in WEIGHT_ITEMS else v for k, v in state.items()}


def init_or_restore(cfg: Config, ckpt, latest: int | None, run_dir: str, abstract, shardings, create, pipeline,
                    source: LoadedRun | None) -> dict:
    """The train state: the run's latest checkpoint (and the pipeline moved to where it was), or a fresh one, with
    the `init_from` source's weights wherever this model has the same modules (new heads stay fresh). A LoRA
    checkpoint's adapters are laid over the base weights read from `init_from` again."""
    base = None if source is None else nnx.to_pure_dict(source.params)  # unrolled, as every loaded run
    if base is not None and cfg.model.scan_layers:
        base = stack_layers(base)
    if latest is not None:
        try:
            state, meta = ckpt.restore(latest, checkpoint_state(abstract_like(abstract, shardings), cfg))
        except ValueError as e:
            raise ConfigError(f"checkpoint {latest} in {run_dir} does not match this configuration "
                              f"({first_line(e)}); use another --train.run_dir") from None
        pipeline.restore(meta["data_state"])
        if cfg.lora_base:
            fresh = create(base)
            state.update({k: laid_over(fresh[k], nnx.to_pure_dict(state[k])) for k in WEIGHT_ITEMS if k in state})
        return state
    return create(base)  # leaf by leaf: new heads, LoRA adapters keep their fresh values
